"""A read-only, point-in-time view of a store for the admin API, metrics and the dashboard.

This is the one place that knows the shapes of the store's statistics; routes, the metrics collector and the
history sampler all speak :class:`StoreSnapshot`.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, field, replace
from typing import TYPE_CHECKING

from kvfabric.store.counters import StoreStats
from kvfabric.store.tier import TierStats
from kvfabric.store.tiered import TieredStore

if TYPE_CHECKING:  # the tiers' reports, as their info() gives them (their modules need RocksDB / boto3)
    from kvfabric.store.disk.tier import DiskState
    from kvfabric.store.object.tier import ObjectTierStats


@dataclass(slots=True)
class TierSnapshot(TierStats):
    """One tier's counters (``TierStats``, the store's read counts in place of the tier's own) and its name."""

    tier: str = ""

    @classmethod
    def of(cls, tier: str, s: TierStats) -> TierSnapshot:
        return cls(*astuple(s), tier=tier)


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
class StoreSnapshot:
    time: float
    """Unix time of the snapshot."""
    tiers: tuple[TierSnapshot, ...]
    namespaces: tuple[NamespaceUsage, ...]
    upload_backlog_bytes: int
    counters: StoreStats
    conditions: dict[str, str] = field(default_factory=dict)
    """Tiers that refuse writes now, and why (a full disk)."""
    disk_tiers: dict[str, DiskState] = field(default_factory=dict)
    """The disk tiers' space state, by tier."""
    object_tiers: dict[str, ObjectTierStats] = field(default_factory=dict)
    """The object tiers' upload state, by tier."""

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
    counters = replace(s, writeback_pending={str(t): n for t, n in s.writeback_pending.items()})
    disks, objects = live_tier_states(store)
    return StoreSnapshot(
        time.time(), tiers, tuple(namespaces), store.upload_backlog_bytes(), counters,
        {str(t): c for t, c in store.tier_conditions().items()}, disks, objects,
    )  # fmt: skip


def live_tier_states(store: TieredStore) -> tuple[dict[str, DiskState], dict[str, ObjectTierStats]]:
    """The disk tiers' space state and the object tiers' upload state (of the tiers whose ``info`` reports them)."""
    infos = {str(t): store.tier(t).info() for t in store.tiers}
    disks = {t: i.disk for t, i in infos.items() if i.disk is not None}
    objects = {t: i.objects for t, i in infos.items() if i.objects is not None}
    return disks, objects
