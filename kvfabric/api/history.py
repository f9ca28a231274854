"""Over-time views for the dashboard: a ring buffer of store snapshots, and a ring buffer of recent errors.

Prometheus is the real time series store; these buffers exist so the built-in dashboard can draw the last hour
without one.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

from kvfabric.api.storeview import StoreSnapshot, TierSnapshot


@dataclass(frozen=True, slots=True)
class TierRates:
    """What one tier did between two snapshots."""

    tier: str
    bytes: int
    capacity_bytes: int | None
    hits: int
    misses: int
    hit_rate: float | None
    """hits / (hits + misses) over the interval; None when there were no reads."""
    read_bytes_per_s: float
    write_bytes_per_s: float


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    time: float
    interval_s: float
    tiers: tuple[TierRates, ...]
    hit_rate: float | None
    """Node-wide: reads served by any tier / all reads, over the interval."""
    read_bytes_per_s: float
    write_bytes_per_s: float
    upload_backlog_bytes: int


def _delta(new: int, old: int) -> int:
    return max(0, new - old)  # a counter that went down was reset; count from zero


def tier_rates(new: TierSnapshot, old: TierSnapshot | None, dt: float) -> TierRates:
    if old is None or dt <= 0:
        return TierRates(new.tier, new.bytes, new.capacity_bytes, 0, 0, None, 0.0, 0.0)
    hits, misses = _delta(new.hits, old.hits), _delta(new.misses, old.misses)
    return TierRates(
        new.tier, new.bytes, new.capacity_bytes, hits, misses, hits / (hits + misses) if hits + misses else None,
        _delta(new.bytes_read, old.bytes_read) / dt, _delta(new.bytes_written, old.bytes_written) / dt,
    )  # fmt: skip


def node_hit_rate(tiers: tuple[TierRates, ...]) -> float | None:
    """A read misses the node only when it misses the last tier it tried, so node hits = sum of tier hits and node
    reads = hits + misses of the slowest tier that saw any reads."""
    hits = sum(t.hits for t in tiers)
    tried = [t for t in tiers if t.hits or t.misses]
    if not tried:
        return None
    misses = tried[-1].misses
    return hits / (hits + misses) if hits + misses else None


class StatsHistory:
    """The last ``maxlen`` snapshots, reported as per-interval rates. Thread-safe (sampler vs. request threads)."""

    def __init__(self, maxlen: int) -> None:
        self._snapshots: deque[StoreSnapshot] = deque(maxlen=maxlen + 1)  # +1: the first point needs a predecessor
        self._lock = threading.Lock()

    def record(self, snapshot: StoreSnapshot) -> None:
        with self._lock:
            self._snapshots.append(snapshot)

    def latest(self) -> StoreSnapshot | None:
        with self._lock:
            return self._snapshots[-1] if self._snapshots else None

    def points(self) -> list[HistoryPoint]:
        with self._lock:
            snaps = list(self._snapshots)
        return [interval(old, new) for old, new in itertools.pairwise(snaps)]


def interval(old: StoreSnapshot, new: StoreSnapshot) -> HistoryPoint:
    dt = new.time - old.time
    tiers = tuple(tier_rates(t, old.tier(t.tier), dt) for t in new.tiers)
    return HistoryPoint(
        new.time, dt, tiers, node_hit_rate(tiers), sum(t.read_bytes_per_s for t in tiers),
        sum(t.write_bytes_per_s for t in tiers), new.upload_backlog_bytes,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    time: float
    kind: str
    message: str


class ErrorLog:
    """The most recent errors, newest last. Thread-safe."""

    def __init__(self, maxlen: int = 200) -> None:
        self._entries: deque[ErrorEntry] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def record(self, kind: str, message: str) -> None:
        with self._lock:
            self._entries.append(ErrorEntry(time.time(), kind, message))

    def entries(self) -> list[ErrorEntry]:
        with self._lock:
            return list(self._entries)
