"""A read-only, point-in-time view of a store for the admin API, metrics and the dashboard.

This is the one place that knows the shapes of the store's statistics; routes, the metrics collector and the
history sampler all speak :class:`StoreSnapshot`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvfabric.store.tier import TierStats
from kvfabric.store.tiered import TieredStore


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    tier: str
    blocks: int
    bytes: int
    capacity_bytes: int | None
    hits: int
    misses: int
    corrupt: int
    puts: int
    deletes: int
    evictions: int
    bytes_read: int
    bytes_written: int

    @classmethod
    def of(cls, tier: str, s: TierStats) -> TierSnapshot:
        return cls(
            tier, s.blocks, s.bytes, s.capacity_bytes, s.hits, s.misses, s.corrupt, s.puts, s.deletes, s.evictions,
            s.bytes_read, s.bytes_written,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModelUsage:
    fingerprint: str
    """Hex of the model fingerprint."""
    model: str | None
    """The model's name when its spec is registered with the store."""
    blocks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class NamespaceUsage:
    namespace: str
    blocks: int
    bytes: int
    models: tuple[ModelUsage, ...]


@dataclass(frozen=True, slots=True)
class StoreCounters:
    """What the store does between its tiers (each tier counts its own reads and writes)."""

    promotions: int
    promotions_refused: int
    demotions: int
    expired: int
    quota_evictions: int
    writeback_dropped: int
    flush_errors: int
    unavailable: int
    writeback_pending: dict[str, int]
    """Blocks waiting to be copied to each write-back tier."""
    last_flush_error: str | None


@dataclass(frozen=True, slots=True)
class DiskTierState:
    """A disk tier's live condition: whether its filesystem is full, and its space reserve."""

    tier: str
    full: bool
    reason: str | None
    full_since: float | None
    free_bytes: int
    resume_free_bytes: int
    reserve_bytes: int
    reserve_held: bool
    full_episodes: int
    refused_puts: int
    index_reopens: int


@dataclass(frozen=True, slots=True)
class ObjectTierState:
    """An object tier's live state: what is uploaded, what waits, whether the store answers."""

    tier: str
    uploaded_blocks: int
    pending_blocks: int
    backlog_bytes: int
    backlog_items: int
    uploads: int
    uploaded_bytes: int
    upload_failures: int
    unavailable_misses: int
    rejected_puts: int
    store_down: bool
    last_failure: str | None


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    time: float
    """Unix time of the snapshot."""
    tiers: tuple[TierSnapshot, ...]
    namespaces: tuple[NamespaceUsage, ...]
    upload_backlog_bytes: int
    counters: StoreCounters
    conditions: dict[str, str] = field(default_factory=dict)
    """Tiers that refuse writes now, and why (a full disk)."""
    disk_tiers: tuple[DiskTierState, ...] = ()
    object_tiers: tuple[ObjectTierState, ...] = ()

    def tier(self, name: str) -> TierSnapshot | None:
        return next((t for t in self.tiers if t.tier == name), None)


def take_snapshot(store: TieredStore) -> StoreSnapshot:
    """Read every statistic the admin surface shows, once."""
    tiers = tuple(TierSnapshot.of(str(name), stats) for name, stats in store.tier_stats().items())
    names = {spec.fingerprint(): spec.model for spec in store.models()}
    namespaces = []
    for ns, usage in sorted(store.namespace_stats().items()):
        models = tuple(
            sorted(
                (ModelUsage(fp.hex(), names.get(fp), m.blocks, m.bytes) for fp, m in usage.models.items()),
                key=lambda m: (-m.bytes, m.fingerprint),
            )
        )
        namespaces.append(NamespaceUsage(str(ns), usage.blocks, usage.bytes, models))
    s = store.store_stats()
    counters = StoreCounters(
        s.promotions, s.promotions_refused, s.demotions, s.expired, s.quota_evictions, s.writeback_dropped,
        s.flush_errors, s.unavailable, {str(t): n for t, n in s.writeback_pending.items()}, s.last_flush_error,
    )  # fmt: skip
    disks, objects = live_tier_states(store)
    return StoreSnapshot(
        time.time(), tiers, tuple(namespaces), store.upload_backlog_bytes(), counters,
        {str(t): c for t, c in store.tier_conditions().items()}, disks, objects,
    )  # fmt: skip


def live_tier_states(store: TieredStore) -> tuple[tuple[DiskTierState, ...], tuple[ObjectTierState, ...]]:
    """The disk tiers' space state and the object tiers' upload state (tiers that report them)."""
    disks: list[DiskTierState] = []
    objects: list[ObjectTierState] = []
    for tier_id in store.tiers:
        info = store.tier(tier_id).info()
        if (d := info.disk) is not None:
            disks.append(
                DiskTierState(
                    str(tier_id), d.full, d.reason, d.full_since, d.free_bytes, d.resume_free_bytes,
                    d.reserve_bytes, d.reserve_held, d.full_episodes, d.refused_puts, d.index_reopens,
                )
            )  # fmt: skip
        if (o := info.objects) is not None:
            objects.append(
                ObjectTierState(
                    str(tier_id), o.uploaded_blocks, o.pending_blocks, o.backlog_bytes, o.backlog_items, o.uploads,
                    o.uploaded_bytes, o.upload_failures, o.unavailable_misses, o.rejected_puts, o.store_down,
                    o.last_failure,
                )
            )  # fmt: skip
    return tuple(disks), tuple(objects)
