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
from kvfabric.store.counters import StoreStats, published
from kvfabric.store.tier import TierStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
"""From a RAM hit (tens of microseconds) to a slow object-store GET (seconds)."""

_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


def _families(record: type, labels: list[str]) -> dict[str, Metric]:
    """One metric family per published field of a statistics dataclass (``kvfabric.store.counters.stat``)."""
    return {
        f.name: _FAMILIES[f.metadata["kind"]](f.metadata["metric"], f.metadata["help"], labels=labels)
        for f in published(record)
    }


class StoreCollector:
    """Turns a store snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # names are dynamic per tier; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _live_tier_families(snap)
        tier_families = _families(TierStats, ["tier"])
        for tier in snap.tiers:
            for name, family in tier_families.items():
                value = getattr(tier, name)
                if value is not None:  # a tier without a capacity has no capacity series
                    family.add_metric([tier.tier], value)
        yield from tier_families.values()

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
        for name, family in _families(StoreStats, []).items():
            family.add_metric([], getattr(snap.counters, name))
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
    for tier, d in snap.disk_tiers.items():
        full.add_metric([tier], 1 if d.full else 0)
        free.add_metric([tier], d.free_bytes)
        episodes.add_metric([tier], d.full_episodes)
        refused.add_metric([tier], d.refused_puts)
        reopens.add_metric([tier], d.index_reopens)
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
    up = GaugeMetricFamily(
        "kvfabric_object_store_up", "1 while the object store answers, 0 while down.", labels=["tier"]
    )
    failures = CounterMetricFamily(
        "kvfabric_object_upload_failures", "Uploads to the object store that failed (retried later).", labels=["tier"]
    )
    misses = CounterMetricFamily(
        "kvfabric_object_unavailable_misses",
        "Reads answered as misses because the object store was down.",
        labels=["tier"],
    )
    for tier, o in snap.object_tiers.items():
        uploaded.add_metric([tier], o.uploaded_blocks)
        pending.add_metric([tier], o.pending_blocks)
        items.add_metric([tier], o.backlog_items)
        up.add_metric([tier], 0 if o.store_down else 1)
        failures.add_metric([tier], o.upload_failures)
        misses.add_metric([tier], o.unavailable_misses)
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
