"""KV events: a closed set of three types. Every tier of every node emits them; the index consumes them.

Handle them with ``match``; a new kind of event is a format change, not a new subclass somewhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kvfabric.ids import NULL_HASH, ModelFingerprint, Namespace, PrefixHash, TierId


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
