"""The store's statistics records, declared once: the store and its tiers count in these dataclasses, and the admin
API derives what it publishes from their fields (the ``/v1/stats`` bodies, the Prometheus families).

A field declared with :func:`stat` is published; its metadata carries the Prometheus base name, the kind and the
help text, so the meaning of a number is written in one place. Fields declared plainly are kept for the store's own
use and tests (``room_made``, ``last_flush_error``).
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal

from kvfabric.ids import TierId

StatKind = Literal["counter", "gauge"]


def stat(help: str, *, metric: str, kind: StatKind = "counter", default: int | None = 0) -> Any:
    """A published field: ``metric`` is its Prometheus base name (``_total`` is added to counters on exposition)."""
    return field(default=default, metadata={"help": help, "metric": metric, "kind": kind})


def published(record: type) -> tuple[Field[Any], ...]:
    """The fields of a statistics dataclass declared with :func:`stat`, in declaration order."""
    return tuple(f for f in fields(record) if "metric" in f.metadata)


@dataclass(slots=True)
class StoreStats:
    """What the store does between its tiers (each tier counts its own reads and writes in ``TierStats``)."""

    promotions: int = stat("Blocks copied up into RAM on a hit below.", metric="kvfabric_store_promotions")
    promotions_refused: int = stat(
        "Hits below that RAM's policy did not admit.", metric="kvfabric_store_promotions_refused"
    )
    demotions: int = stat("Blocks written down when RAM evicted them.", metric="kvfabric_store_demotions")
    expired: int = stat("Blocks dropped for their namespace's TTL.", metric="kvfabric_store_expired_blocks")
    quota_evictions: int = stat(
        "Blocks evicted to keep a namespace under its quota.", metric="kvfabric_store_quota_evictions"
    )
    writeback_dropped: int = stat(
        "Write-back copies skipped (backlog overflow, or no source left to copy from).",
        metric="kvfabric_store_writeback_dropped",
    )
    flush_errors: int = stat("Failed write-back flushes (retried later).", metric="kvfabric_store_flush_errors")
    unavailable: int = stat(
        "Reads or writes a shared tier could not serve (its failed uploads and outage misses included).",
        metric="kvfabric_store_unavailable",
    )
    writeback_pending: dict[TierId, int] = field(default_factory=dict)
    """Blocks waiting to be copied to each write-back tier (filled in by ``TieredStore.store_stats``)."""
    room_made: int = 0
    """Times a full lower tier (disk) was evicted and compacted to take a write."""
    last_flush_error: str | None = None
