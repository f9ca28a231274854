"""The per-app state every admin route reads: the store, settings, metrics, auth and the over-time buffers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from kvfabric.api.auth import Authenticator
from kvfabric.api.history import ErrorLog, StatsHistory
from kvfabric.api.metrics import Metrics
from kvfabric.api.storeview import StoreSnapshot, take_snapshot
from kvfabric.config import Settings
from kvfabric.store.tiered import TieredStore


@dataclass(slots=True)
class AdminContext:
    """What every route needs, kept on ``app.state.kvfabric``."""

    store: TieredStore
    settings: Settings
    metrics: Metrics
    auth: Authenticator
    history: StatsHistory
    errors: ErrorLog
    started: float = field(default_factory=time.time)
    _last_corrupt: dict[str, int] = field(default_factory=dict)
    _last_flush_error: str | None = None
    _last_conditions: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> StoreSnapshot:
        return take_snapshot(self.store)

    def sample(self) -> StoreSnapshot:
        """Take a snapshot, keep it in the history, and log newly corrupt blocks as errors."""
        snap = self.snapshot()
        for tier in snap.tiers:
            before = self._last_corrupt.get(tier.tier, tier.corrupt)  # first sight of a tier is the baseline
            if tier.corrupt > before:
                self.errors.record(
                    "corrupt_block", f"{tier.corrupt - before} corrupt block(s) dropped by the {tier.tier} tier"
                )
            self._last_corrupt[tier.tier] = tier.corrupt
        error = snap.counters.last_flush_error
        if error is not None and error != self._last_flush_error:
            self.errors.record("flush", error)
        self._last_flush_error = error
        for tier, condition in snap.conditions.items():
            if tier not in self._last_conditions:  # once per episode: it became full
                self.errors.record("tier_full", f"the {tier} tier refuses puts: {condition}")
                self.metrics.errors.labels("tier_full").inc()
        self._last_conditions = dict(snap.conditions)
        self.history.record(snap)
        return snap


def get_context(request: Request) -> AdminContext:
    """FastAPI dependency: the app's :class:`AdminContext`."""
    ctx: AdminContext = request.app.state.kvfabric
    return ctx
