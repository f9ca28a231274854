"""The node's own tiers as an event feed: tiers publish KV events from whatever thread touched them (request
handlers in worker threads, the store's flusher); the index belongs to one asyncio loop.

:class:`LoopEventSink` is the bridge. ``publish`` (any thread) appends to a list under a lock and, when the list was
idle, schedules one drain on the loop with ``call_soon_threadsafe``; the drain applies up to ``batch`` events at a
time, yielding to the loop between batches. So a burst costs one wake-up, not one per event, and events reach the
index in the order they were published. ``publish`` never blocks a store operation: past ``max_pending`` queued
events it drops and counts (the index is a routing hint; a lost event costs a cache miss, never wrong KV).

The sink can exist before the loop does (``TieredStore.open(events=...)`` runs first): events wait until
:meth:`LoopEventSink.attach`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvfabric.events import BlockStored, KVEvent
from kvfabric.ids import BlockKey, TierId

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LocalFeedStats:
    published: int = 0
    applied: int = 0
    dropped: int = 0
    """Events refused because ``max_pending`` were already queued."""
    errors: int = 0
    """Batches the index refused (logged)."""


class LoopEventSink:
    """An :class:`~kvfabric.events.EventSink` for any thread that applies events on one asyncio loop, in batches."""

    def __init__(self, *, max_pending: int = 1_000_000, batch: int = 4096) -> None:
        if max_pending <= 0 or batch <= 0:
            raise ValueError("max_pending and batch must be positive")
        self._max_pending = max_pending
        self._batch = batch
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending: list[KVEvent] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._apply: Callable[[list[KVEvent]], object] | None = None
        self._scheduled = False  # a drain is queued on the loop
        self.stats = LocalFeedStats()

    # --- any thread ------------------------------------------------------------------------------------------------
    def publish(self, event: KVEvent) -> None:
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self.stats.dropped += 1
                return
            self._pending.append(event)
            self.stats.published += 1
            loop = self._claim_wakeup()
        if loop is not None:
            self._wake(loop)

    def publish_many(self, events: Iterable[KVEvent], *, timeout_s: float | None = None) -> bool:
        """Queue ``events``, first waiting (up to ``timeout_s``) until the queue is below half of ``max_pending``:
        for bulk producers that can afford to wait (the start-up announcement), never for tiers. Returns ``False``,
        queuing nothing, when the wait timed out."""
        batch = list(events)
        with self._drained:
            if not self._drained.wait_for(lambda: len(self._pending) < self._max_pending // 2, timeout_s):
                return False
            self._pending.extend(batch)
            self.stats.published += len(batch)
            loop = self._claim_wakeup()
        if loop is not None:
            self._wake(loop)
        return True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _claim_wakeup(self) -> asyncio.AbstractEventLoop | None:
        """Under the lock: the loop to wake when no drain is queued yet (and mark one queued)."""
        if self._scheduled or self._loop is None or not self._pending:
            return None
        self._scheduled = True
        return self._loop

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed meanwhile (shutdown): the events stay queued, undelivered
            with self._lock:
                self._scheduled = False

    # --- the loop --------------------------------------------------------------------------------------------------
    def attach(self, apply: Callable[[list[KVEvent]], object]) -> None:
        """Deliver events to ``apply`` on the running loop from now on, starting with those already queued."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop, self._apply = loop, apply
            wake = self._claim_wakeup()
        if wake is not None:
            loop.call_soon(self._drain)

    def detach(self) -> None:
        """Stop delivering (events published later stay queued, up to ``max_pending``)."""
        with self._lock:
            self._loop = self._apply = None
            self._scheduled = False
            self._drained.notify_all()

    def _drain(self) -> None:
        with self._lock:
            apply, loop = self._apply, self._loop
            if apply is None or loop is None:
                self._scheduled = False
                return
            events = self._pending[: self._batch]
            del self._pending[: self._batch]
            more = bool(self._pending)
            if not more:
                self._scheduled = False
            self._drained.notify_all()
        try:
            apply(events)
            self.stats.applied += len(events)
        except Exception:  # a refused batch must not stall the feed: log it, count it, go on with the next
            self.stats.errors += 1
            log.exception("the index refused a batch of %d local KV events", len(events))
        if more:
            loop.call_soon(self._drain)


def announce_held(
    sink: LoopEventSink,
    source: str,
    tiers: Iterable[tuple[TierId, Iterable[BlockKey]]],
    stop: threading.Event,
    *,
    chunk: int = 4096,
) -> int:
    """Publish a ``BlockStored`` for every key each tier already holds: blocks that persisted across a restart are
    not announced again by their tiers. Blocking; run it in a worker thread. Returns the blocks announced.

    A key deleted while this runs may be announced after its removal and linger in the index as a stale hint (a
    miss for whoever follows it), which is why this runs once at start, not periodically."""
    announced = 0
    for tier, keys in tiers:
        batch: list[KVEvent] = []
        for key in keys:
            batch.append(BlockStored(source, tier, key.namespace, key.model, (key.prefix,)))
            if len(batch) >= chunk:
                announced += _publish_until_stopped(sink, batch, stop)
                batch = []
                if stop.is_set():
                    return announced
        if batch:
            announced += _publish_until_stopped(sink, batch, stop)
        if stop.is_set():
            break
    return announced


def _publish_until_stopped(sink: LoopEventSink, batch: list[KVEvent], stop: threading.Event) -> int:
    while not stop.is_set():
        if sink.publish_many(batch, timeout_s=0.1):
            return len(batch)
    return 0
