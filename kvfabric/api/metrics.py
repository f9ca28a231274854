"""Prometheus metrics of a node, in a per-app registry (tests build many apps; the global registry would clash).

Store-side counters are read from the store at scrape time by :class:`StoreCollector` (the store never imports
prometheus). Latencies are recorded by whoever performs the operation: the transport server calls
:meth:`Metrics.observe_get` / :meth:`Metrics.observe_put` with the tier that served it.

Names follow Prometheus conventions: base units (``_bytes``, ``_seconds``), ``_total`` on counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvfabric.api.storeview import StoreSnapshot

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
"""From a RAM hit (tens of microseconds) to a slow object-store GET (seconds)."""

_TIER_COUNTERS = (
    # (TierSnapshot field, metric base name, help)
    ("hits", "kvfabric_tier_hits", "Client reads served by the tier (the store's internal reads not counted)."),
    ("misses", "kvfabric_tier_misses", "Client reads asked of the tier that it could not serve."),
    ("corrupt", "kvfabric_tier_corrupt_blocks", "Blocks whose checksum failed on read (dropped, never served)."),
    ("puts", "kvfabric_tier_puts", "Blocks written to the tier."),
    ("deletes", "kvfabric_tier_deletes", "Blocks deleted from the tier."),
    ("evictions", "kvfabric_tier_evictions", "Blocks evicted from the tier for space."),
    ("bytes_read", "kvfabric_tier_read_bytes", "Payload bytes read from the tier."),
    ("bytes_written", "kvfabric_tier_written_bytes", "Payload bytes written to the tier."),
)


_STORE_COUNTERS = (
    ("promotions", "kvfabric_store_promotions", "Blocks copied up into RAM on a hit below."),
    ("promotions_refused", "kvfabric_store_promotions_refused", "Hits below that RAM's policy did not admit."),
    ("demotions", "kvfabric_store_demotions", "Blocks written down when RAM evicted them."),
    ("expired", "kvfabric_store_expired_blocks", "Blocks dropped for their namespace's TTL."),
    ("quota_evictions", "kvfabric_store_quota_evictions", "Blocks evicted to keep a namespace under its quota."),
    ("writeback_dropped", "kvfabric_store_writeback_dropped", "Write-back copies skipped (backlog overflow)."),
    ("flush_errors", "kvfabric_store_flush_errors", "Failed write-back flushes (retried later)."),
    ("unavailable", "kvfabric_store_unavailable",
     "Reads or writes a shared tier could not serve (its failed uploads and outage misses included)."),
)


class StoreCollector:
    """Turns a store snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # names are dynamic per tier; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _live_tier_families(snap)
        blocks = GaugeMetricFamily(
            "kvfabric_tier_blocks",
            "Blocks held by the tier (object tier: uploaded plus pending upload, see kvfabric_object_*_blocks).",
            labels=["tier"],
        )
        stored = GaugeMetricFamily("kvfabric_tier_stored_bytes", "Payload bytes held by the tier.", labels=["tier"])
        capacity = GaugeMetricFamily("kvfabric_tier_capacity_bytes", "Capacity of the tier.", labels=["tier"])
        counters = {field: CounterMetricFamily(name, help_, labels=["tier"]) for field, name, help_ in _TIER_COUNTERS}
        for tier in snap.tiers:
            blocks.add_metric([tier.tier], tier.blocks)
            stored.add_metric([tier.tier], tier.bytes)
            if tier.capacity_bytes is not None:
                capacity.add_metric([tier.tier], tier.capacity_bytes)
            for field, family in counters.items():
                family.add_metric([tier.tier], getattr(tier, field))
        yield blocks
        yield stored
        yield capacity
        yield from counters.values()

        ns_blocks = GaugeMetricFamily("kvfabric_namespace_blocks", "Blocks held per namespace.", labels=["namespace"])
        ns_bytes = GaugeMetricFamily(
            "kvfabric_namespace_stored_bytes", "Payload bytes held per namespace.", labels=["namespace"]
        )
        model_bytes = GaugeMetricFamily(
            "kvfabric_model_stored_bytes", "Payload bytes held per namespace and model.",
            labels=["namespace", "model", "fingerprint"],
        )  # fmt: skip
        for ns in snap.namespaces:
            ns_blocks.add_metric([ns.namespace], ns.blocks)
            ns_bytes.add_metric([ns.namespace], ns.bytes)
            for m in ns.models:
                model_bytes.add_metric([ns.namespace, m.model or "", m.fingerprint[:16]], m.bytes)
        yield ns_blocks
        yield ns_bytes
        yield model_bytes

        backlog = GaugeMetricFamily(
            "kvfabric_upload_backlog_bytes", "Bytes accepted by the object tier and not uploaded yet."
        )
        backlog.add_metric([], snap.upload_backlog_bytes)
        yield backlog
        pending = GaugeMetricFamily(
            "kvfabric_writeback_pending_blocks", "Blocks waiting to be copied to a write-back tier.", labels=["tier"]
        )
        for tier, n in sorted(snap.counters.writeback_pending.items()):
            pending.add_metric([tier], n)
        yield pending
        for field, name, help_ in _STORE_COUNTERS:
            family = CounterMetricFamily(name, help_)
            family.add_metric([], getattr(snap.counters, field))
            yield family


def _live_tier_families(snap: StoreSnapshot) -> Iterator[Metric]:
    """Disk tiers' space condition and object tiers' upload state."""
    full = GaugeMetricFamily(
        "kvfabric_tier_full", "1 while the tier refuses puts because its filesystem is full.", labels=["tier"]
    )
    free = GaugeMetricFamily("kvfabric_disk_free_bytes", "Free space on the disk tier's filesystem.", labels=["tier"])
    episodes = CounterMetricFamily("kvfabric_tier_full_episodes", "Times the disk tier became full.", labels=["tier"])
    refused = CounterMetricFamily(
        "kvfabric_tier_full_refused_puts", "Puts refused because the disk was full.", labels=["tier"]
    )
    reopens = CounterMetricFamily(
        "kvfabric_disk_index_reopens", "RocksDB index reopens that cleared a sticky write error.", labels=["tier"]
    )
    for d in snap.disk_tiers:
        full.add_metric([d.tier], 1 if d.full else 0)
        free.add_metric([d.tier], d.free_bytes)
        episodes.add_metric([d.tier], d.full_episodes)
        refused.add_metric([d.tier], d.refused_puts)
        reopens.add_metric([d.tier], d.index_reopens)
    yield from (full, free, episodes, refused, reopens)
    uploaded = GaugeMetricFamily(
        "kvfabric_object_uploaded_blocks", "Blocks whose current copy is committed in the object store.",
        labels=["tier"],
    )  # fmt: skip
    pending = GaugeMetricFamily(
        "kvfabric_object_pending_blocks", "Blocks accepted by the object tier and not uploaded yet.", labels=["tier"]
    )
    items = GaugeMetricFamily(
        "kvfabric_object_backlog_items", "Segments and tombstone lists waiting to upload.", labels=["tier"]
    )
    up = GaugeMetricFamily("kvfabric_object_store_up", "1 while the object store answers, 0 while down.", labels=["tier"])
    failures = CounterMetricFamily(
        "kvfabric_object_upload_failures", "Uploads to the object store that failed (retried later).", labels=["tier"]
    )
    misses = CounterMetricFamily(
        "kvfabric_object_unavailable_misses", "Reads answered as misses because the object store was down.", labels=["tier"]
    )
    for o in snap.object_tiers:
        uploaded.add_metric([o.tier], o.uploaded_blocks)
        pending.add_metric([o.tier], o.pending_blocks)
        items.add_metric([o.tier], o.backlog_items)
        up.add_metric([o.tier], 0 if o.store_down else 1)
        failures.add_metric([o.tier], o.upload_failures)
        misses.add_metric([o.tier], o.unavailable_misses)
    yield from (uploaded, pending, items, up, failures, misses)


class Metrics:
    """Every collector of one node. Create one per app/server; pass it to the transport server for latencies."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.get_seconds = Histogram(
            "kvfabric_get_seconds",
            "Latency of get requests by where they were served: ram, lower (a tier below RAM), miss.",
            ["tier"], registry=self.registry, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.put_seconds = Histogram(
            "kvfabric_put_seconds", "Latency of put requests (every put lands in RAM first).", ["tier"],
            registry=self.registry, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.admin_requests = Counter(
            "kvfabric_admin_requests", "Admin API requests by route and status code.", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "kvfabric_errors", "Errors recorded by the node, by kind.", ["kind"], registry=self.registry
        )
        self.start_time = Gauge("kvfabric_start_time_seconds", "Unix time the node started.", registry=self.registry)
        self.start_time.set(time.time())
        self._store_collector: StoreCollector | None = None

    def observe_get(self, tier: str, seconds: float) -> None:
        self.get_seconds.labels(tier).observe(seconds)

    def observe_put(self, tier: str, seconds: float) -> None:
        self.put_seconds.labels(tier).observe(seconds)

    def attach_store(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        """Expose the store's counters (once; a second store would duplicate every series)."""
        if self._store_collector is not None:
            raise ValueError("a store is already attached to these metrics")
        self._store_collector = StoreCollector(snapshot)
        self.registry.register(self._store_collector)

    def exposition(self) -> bytes:
        """The text exposition format, as served on ``/metrics``."""
        return generate_latest(self.registry)
