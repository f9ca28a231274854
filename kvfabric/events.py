"""KV events: a closed set of three types. Every tier of every node emits them; the index consumes them.

Handle them with ``match``; a new kind of event is a format change, not a new subclass somewhere else.

On the wire a batch of events is one msgpack array (``docs/events.md``)::

    [version, seq, ts, [event, ...]]
    BlockStored:  [1, source, medium, namespace, model, hashes, parent, tokens_per_block]
    BlockRemoved: [2, source, medium, namespace, model, hashes]
    AllCleared:   [3, source, medium | nil]

``hashes`` is the concatenation of the 32-byte hashes (one bin), which keeps a batch compact and its decoding cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgpack

from kvfabric.errors import EventFormatError
from kvfabric.ids import HASH_BYTES, NULL_HASH, ModelFingerprint, Namespace, PrefixHash, TierId


@dataclass(frozen=True, slots=True)
class BlockStored:
    """``hashes`` (a consecutive run of one chain, parent first) now live at ``source`` in ``medium``."""

    source: str
    medium: TierId
    namespace: Namespace
    model: ModelFingerprint
    hashes: tuple[PrefixHash, ...]
    parent: PrefixHash = NULL_HASH
    tokens_per_block: int = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """``hashes`` no longer live at ``source`` in ``medium``."""

    source: str
    medium: TierId
    namespace: Namespace
    model: ModelFingerprint
    hashes: tuple[PrefixHash, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """Everything at ``source`` is gone (in ``medium``, or in every medium when it is ``None``)."""

    source: str
    medium: TierId | None = None


KVEvent = BlockStored | BlockRemoved | AllCleared


class EventSink(Protocol):
    """Where events go: an in-process index, a NATS publisher, a list in a test."""

    def publish(self, event: KVEvent) -> None: ...


@dataclass(slots=True)
class EventLog:
    """An EventSink that keeps events until :meth:`take_events` hands them over (tests, batching)."""

    events: list[KVEvent] = field(default_factory=list)

    def publish(self, event: KVEvent) -> None:
        self.events.append(event)

    def take_events(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out


class EventBus:
    """In-process publisher: every event published is handed, in order, to each subscribed sink.

    A sink that raises does not stop delivery to the others; the error is re-raised after all sinks had the event,
    so a broken subscriber is loud but cannot starve the rest.
    """

    __slots__ = ("_sinks",)

    def __init__(self) -> None:
        self._sinks: list[EventSink] = []

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Deliver future events to ``sink``; returns a function that unsubscribes it."""
        self._sinks.append(sink)

        def unsubscribe() -> None:  # by identity: two sinks may compare equal
            self._sinks = [s for s in self._sinks if s is not sink]

        return unsubscribe

    def publish(self, event: KVEvent) -> None:
        error: Exception | None = None
        for sink in tuple(self._sinks):
            try:
                sink.publish(event)
            except Exception as exc:  # noqa: BLE001 - delivered to the others first, then re-raised
                error = error or exc
        if error is not None:
            raise error


# --- wire format ---------------------------------------------------------------------------------------------------

EVENT_FORMAT_VERSION: Final = 1
MAX_EVENT_BATCH_BYTES: Final = 64 << 20
_STORED: Final = 1
_REMOVED: Final = 2
_CLEARED: Final = 3


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events in publication order, with the publisher's sequence number (gaps reveal lost batches) and its clock."""

    seq: int
    ts: float
    events: tuple[KVEvent, ...]


@dataclass(frozen=True, slots=True)
class HashRun:
    """Consecutive ``BlockStored`` (``stored``) or ``BlockRemoved`` events of one location and scope with their
    hashes joined in order: what the index takes from them, in the form it applies in bulk. Parents and
    ``tokens_per_block`` are left out (the index does not use them)."""

    stored: bool
    location: tuple[str, TierId]
    scope: tuple[Namespace, ModelFingerprint]
    hashes: list[PrefixHash]


EventRun = HashRun | AllCleared
"""One step of a batch in columnar form: a run of stores or removals, or a clear."""


@dataclass(frozen=True, slots=True)
class RunBatch:
    """A batch as :func:`decode_runs` gives it: its runs in order, and how many events they came from."""

    seq: int
    ts: float
    runs: list[EventRun]
    events: int


def _join_hashes(hashes: Sequence[bytes]) -> bytes:
    for h in hashes:
        if len(h) != HASH_BYTES:
            raise ValueError(f"event hashes must be {HASH_BYTES} bytes, got one of {len(h)}")
    return b"".join(hashes)


def _event_to_wire(ev: KVEvent) -> list[object]:
    match ev:
        case BlockStored():
            return [_STORED, ev.source, ev.medium, ev.namespace, ev.model, _join_hashes(ev.hashes), ev.parent,
                    ev.tokens_per_block]  # fmt: skip
        case BlockRemoved():
            return [_REMOVED, ev.source, ev.medium, ev.namespace, ev.model, _join_hashes(ev.hashes)]
        case AllCleared():
            return [_CLEARED, ev.source, ev.medium]
        case _:
            raise TypeError(f"not a KV event: {type(ev).__name__}")


def encode_batch(events: Iterable[KVEvent], seq: int = 0, ts: float | None = None) -> bytes:
    """One batch of events as compact msgpack (the inverse of :func:`decode_batch`)."""
    wire = [_event_to_wire(ev) for ev in events]
    return msgpack.packb([EVENT_FORMAT_VERSION, seq, time.time() if ts is None else ts, wire], use_bin_type=True)


def _split_hashes(blob: object) -> tuple[PrefixHash, ...]:
    if not isinstance(blob, bytes) or len(blob) % HASH_BYTES:
        raise EventFormatError(f"event hashes must be a bin of whole {HASH_BYTES}-byte hashes")
    return tuple(blob[i : i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES))  # type: ignore[misc]


def _str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise EventFormatError(f"event {what} must be a non-empty string, got {value!r:.40}")
    return value


def _hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        raise EventFormatError(f"event {what} must be {HASH_BYTES} bytes")
    return value


def _event_from_wire(item: object) -> KVEvent:
    if not isinstance(item, list | tuple) or not item:
        raise EventFormatError("event must be a non-empty array")
    kind = item[0]
    if kind == _STORED and len(item) == 8:
        _, source, medium, ns, model, blob, parent, tpb = item
        if not isinstance(tpb, int) or tpb < 0:
            raise EventFormatError("BlockStored tokens_per_block must be a non-negative integer")
        return BlockStored(_str(source, "source"), TierId(_str(medium, "medium")), Namespace(_str(ns, "namespace")),
                           ModelFingerprint(_hash(model, "model")), _split_hashes(blob),
                           PrefixHash(_hash(parent, "parent")), tpb)  # fmt: skip
    if kind == _REMOVED and len(item) == 6:
        _, source, medium, ns, model, blob = item
        return BlockRemoved(_str(source, "source"), TierId(_str(medium, "medium")), Namespace(_str(ns, "namespace")),
                            ModelFingerprint(_hash(model, "model")), _split_hashes(blob))  # fmt: skip
    if kind == _CLEARED and len(item) == 3:
        _, source, medium = item
        return AllCleared(_str(source, "source"), None if medium is None else TierId(_str(medium, "medium")))
    raise EventFormatError(f"unknown event kind {kind!r} with {len(item)} fields")


def _unpack_batch(data: bytes | memoryview, use_list: bool) -> tuple[int, float, Sequence[object]]:
    """The checked header of a batch and its undecoded events (arrays as lists or, cheaper, as tuples)."""
    if len(data) > MAX_EVENT_BATCH_BYTES:
        raise EventFormatError(f"event batch of {len(data)} bytes exceeds {MAX_EVENT_BATCH_BYTES}")
    try:
        top = msgpack.unpackb(data, raw=False, use_list=use_list, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventFormatError(f"event batch is not valid msgpack: {exc}") from exc
    if not isinstance(top, list | tuple) or len(top) != 4:
        raise EventFormatError("event batch must be an array [version, seq, ts, events]")
    version, seq, ts, items = top
    if version != EVENT_FORMAT_VERSION:
        raise EventFormatError(f"event format version {version!r} is not supported (expected {EVENT_FORMAT_VERSION})")
    if not isinstance(seq, int) or not isinstance(ts, int | float) or not isinstance(items, list | tuple):
        raise EventFormatError("event batch header has the wrong types")
    return seq, float(ts), items


def decode_batch(data: bytes | memoryview) -> EventBatch:
    """Parse a batch made by :func:`encode_batch`; anything malformed raises :class:`EventFormatError`."""
    seq, ts, items = _unpack_batch(data, use_list=True)
    events: list[KVEvent] = []
    checked: set[tuple[object, ...]] = set()  # (length, kind, source, medium, namespace, model) already validated
    for item in items:
        # fast path: a well-formed store/remove whose header fields this batch has already validated
        if type(item) is list and len(item) in (6, 8) and type(item[5]) is bytes and len(item[5]) == HASH_BYTES:
            head = (len(item), item[0], item[1], item[2], item[3], item[4])
            if head in checked and (len(item) == 6 or _tail_ok(item)):
                if len(item) == 8:
                    events.append(BlockStored(item[1], item[2], item[3], item[4], (item[5],), item[6], item[7]))
                else:
                    events.append(BlockRemoved(item[1], item[2], item[3], item[4], (item[5],)))
                continue
            ev = _event_from_wire(item)
            checked.add(head)
            events.append(ev)
            continue
        events.append(_event_from_wire(item))
    return EventBatch(seq, ts, tuple(events))


def _tail_ok(item: Sequence[object]) -> bool:
    """The parent and tokens_per_block of a BlockStored array are well formed."""
    parent, tpb = item[6], item[7]
    return type(parent) is bytes and len(parent) == HASH_BYTES and type(tpb) is int and tpb >= 0


def decode_runs(data: bytes | memoryview) -> RunBatch:
    """Parse a batch made by :func:`encode_batch` into runs (the index's hot path): consecutive events of one kind,
    location and scope become one :class:`HashRun`. Validates exactly what :func:`decode_batch` does and raises
    the same :class:`EventFormatError`, before anything could be applied.

    Per event, an event continuing the current run costs a few compares against its already-validated header and
    one list append of its hash; only an event that starts a run is decoded and checked field by field."""
    seq, ts, items = _unpack_batch(data, use_list=False)
    runs: list[EventRun] = []
    width = 0  # array length of the current run's events (6 or 8; 0: no run open)
    kind: object = None
    src: object = None
    med: object = None
    ns: object = None
    model: object = None
    hashes: list[PrefixHash] = []
    for item in items:
        if (type(item) is tuple and len(item) == width and item[1] == src and item[4] == model and item[3] == ns
                and item[2] == med and item[0] == kind
                and (width == 6 or (type(item[6]) is bytes and len(item[6]) == HASH_BYTES and type(item[7]) is int
                                    and item[7] >= 0))):  # fmt: skip
            blob = item[5]
            if type(blob) is bytes and len(blob) == HASH_BYTES:
                hashes.append(blob)  # type: ignore[arg-type]
            else:
                hashes += _split_hashes(blob)
            continue
        ev = _event_from_wire(item)
        if type(ev) is AllCleared:
            runs.append(ev)
            width = 0
            continue
        assert isinstance(ev, BlockStored | BlockRemoved)
        width = len(item)  # type: ignore[arg-type]
        kind, src, med, ns, model = item[0], ev.source, ev.medium, ev.namespace, ev.model  # type: ignore[index]
        hashes = list(ev.hashes)
        runs.append(HashRun(width == 8, (ev.source, ev.medium), (ev.namespace, ev.model), hashes))
    return RunBatch(seq, ts, runs, len(items))
