"""Receiving KV event batches over ZMQ: vLLM's publisher and kvfabric's own use the same framing,
``[topic, seq as 8-byte big-endian, payload]``, so one subscriber serves both; only the payload decoder differs.

The subscriber binds (``tcp://127.0.0.1:0`` picks a free port) and publishers connect, which is what vLLM does for
an endpoint without a wildcard. It runs as one asyncio task on the loop that owns the index, so applying a batch
needs no lock. A sequence gap (a batch lost to the PUB high-water mark or a restart) is counted in ``stats.gaps``;
a payload that fails to decode is counted in ``stats.errors`` and skipped, never half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from kvfabric.errors import EventFormatError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SubscriberStats:
    batches: int = 0
    gaps: int = 0
    errors: int = 0
    last_seq: int | None = None


class ZmqEventSubscriber:
    """Feeds each received payload to ``on_payload`` (which decodes and applies it) on the running event loop."""

    def __init__(
        self,
        endpoint: str,
        on_payload: Callable[[bytes], object],
        *,
        bind: bool = True,
        topic: bytes = b"",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self._requested = endpoint
        self._on_payload = on_payload
        self._bind = bind
        self._topic = topic
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint = endpoint
        self.stats = SubscriberStats()

    def open(self) -> str:
        """Create and bind (or connect) the socket; returns the actual endpoint (the port when ``:0`` was asked)."""
        if self._sock is None:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, self._topic)
            try:
                if self._bind:
                    sock.bind(self._requested)
                    self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                else:
                    sock.connect(self._requested)
            except zmq.ZMQError as exc:
                sock.close()
                raise OSError(f"cannot {'bind' if self._bind else 'connect'} KV event socket {self._requested}: "
                              f"{exc}") from exc  # fmt: skip
            self._sock = sock
        return self.endpoint

    def handle(self, frames: list[bytes]) -> None:
        """Process one multipart message (also the unit tests' entry point)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.errors += 1
            log.warning("KV event message with %d frames ignored on %s", len(frames), self.endpoint)
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        last = self.stats.last_seq
        if last is not None and seq != last + 1:
            self.stats.gaps += 1
            log.warning("KV event sequence gap on %s: %d after %d", self.endpoint, seq, last)
        self.stats.last_seq = seq
        try:
            self._on_payload(frames[2])
        except EventFormatError as exc:
            self.stats.errors += 1
            log.warning("bad KV event batch on %s: %s", self.endpoint, exc)
            return
        self.stats.batches += 1

    async def run(self) -> None:
        """Receive until cancelled."""
        if self._sock is None:
            self.open()
        sock = self._sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            self.handle(frames)

    def start(self) -> asyncio.Task[None]:
        """Open and run on the current event loop as a task."""
        self.open()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"kv-events {self.endpoint}")
        return self._task

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
