"""/metrics: parses with prometheus_client's parser, follows naming conventions, and moves with puts and gets."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from kvfabric.store.tiered import TieredStore
from prometheus_client.parser import text_string_to_metric_families

from kvfabric.api.app import create_app
from kvfabric.api.metrics import Metrics
from kvfabric.config import Settings
from kvfabric.record import Block
from tests.api.conftest import bearer
from tests.blocks import make_chain

REPO = Path(__file__).resolve().parents[2]


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics", headers=bearer("ops-read"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(client: TestClient) -> dict[str, str]:
    text = client.get("/metrics", headers=bearer("ops-read")).text
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_follow_conventions(client: TestClient) -> None:
    fams = families(client)
    assert fams, "no metric families"
    for name, kind in fams.items():
        assert name.startswith("kvfabric_"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    for name in ("kvfabric_tier_hits", "kvfabric_tier_misses", "kvfabric_tier_corrupt_blocks",
                 "kvfabric_tier_evictions", "kvfabric_tier_read_bytes", "kvfabric_tier_written_bytes"):  # fmt: skip
        assert fams[name] == "counter", name  # the parser strips _total from counter family names
    for name in ("kvfabric_tier_stored_bytes", "kvfabric_tier_capacity_bytes", "kvfabric_tier_blocks",
                 "kvfabric_namespace_stored_bytes", "kvfabric_model_stored_bytes", "kvfabric_upload_backlog_bytes"):  # fmt: skip
        assert fams[name] == "gauge", name
    assert fams["kvfabric_get_seconds"] == "histogram"
    assert fams["kvfabric_put_seconds"] == "histogram"


def test_counters_move_with_puts_and_gets(
    client: TestClient, store: TieredStore, blocks: dict[str, list[Block]]
) -> None:
    ram = (("tier", "ram"),)
    before = scrape(client)
    assert before[("kvfabric_tier_blocks", ram)] == 10
    assert before[("kvfabric_namespace_blocks", (("namespace", "tenant-a"),))] == 7

    new = make_chain(4, namespace="tenant-a", seed=42)
    store.put_many(new)
    for b in new:
        assert store.get(b.key) is not None
    assert store.get(make_chain(1, namespace="tenant-a", seed=99)[0].key) is None

    after = scrape(client)
    assert after[("kvfabric_tier_puts_total", ram)] >= before[("kvfabric_tier_puts_total", ram)] + 4
    assert after[("kvfabric_tier_hits_total", ram)] >= before[("kvfabric_tier_hits_total", ram)] + 4
    assert after[("kvfabric_tier_misses_total", ram)] >= before[("kvfabric_tier_misses_total", ram)] + 1
    assert after[("kvfabric_tier_read_bytes_total", ram)] > before[("kvfabric_tier_read_bytes_total", ram)]
    assert after[("kvfabric_tier_written_bytes_total", ram)] > before[("kvfabric_tier_written_bytes_total", ram)]
    assert after[("kvfabric_tier_blocks", ram)] == 14
    assert after[("kvfabric_namespace_blocks", (("namespace", "tenant-a"),))] == 11
    assert after[("kvfabric_tier_stored_bytes", ram)] > before[("kvfabric_tier_stored_bytes", ram)]


def test_latency_histograms_record_what_the_server_observes(
    store: TieredStore, settings: Settings, blocks: dict[str, list[Block]]
) -> None:
    metrics = Metrics()
    with TestClient(create_app(store, settings, metrics=metrics)) as c:
        metrics.observe_get("ram", 0.0002)
        metrics.observe_get("ram", 0.003)
        metrics.observe_get("disk", 0.02)
        metrics.observe_put("ram", 0.001)
        m = scrape(c)
    assert m[("kvfabric_get_seconds_count", (("tier", "ram"),))] == 2
    assert m[("kvfabric_get_seconds_count", (("tier", "disk"),))] == 1
    assert m[("kvfabric_get_seconds_bucket", (("le", "0.00025"), ("tier", "ram")))] == 1
    assert abs(m[("kvfabric_get_seconds_sum", (("tier", "ram"),))] - 0.0032) < 1e-9
    assert m[("kvfabric_put_seconds_count", (("tier", "ram"),))] == 1


def test_each_app_has_its_own_registry(store: TieredStore, settings: Settings, blocks: object) -> None:
    a, b = create_app(store, settings), create_app(store, settings)
    assert a.state.kvfabric.metrics.registry is not b.state.kvfabric.metrics.registry


def test_admin_requests_are_counted(client: TestClient) -> None:
    client.get("/v1/stats", headers=bearer("a-read"))
    client.get("/v1/stats")  # 401
    m = scrape(client)
    ok = (("method", "GET"), ("route", "/v1/stats"), ("status", "200"))
    denied = (("method", "GET"), ("route", "/v1/stats"), ("status", "401"))
    assert m[("kvfabric_admin_requests_total", ok)] >= 1
    assert m[("kvfabric_admin_requests_total", denied)] >= 1


def test_grafana_dashboard_uses_only_metrics_that_exist(client: TestClient) -> None:
    dash = json.loads((REPO / "deploy" / "grafana" / "kvfabric-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exposed = {name + sfx for name, kind in families(client).items() for sfx in suffixes[kind]}
    used = {name for e in exprs for name in re.findall(r"\bkvfabric_[a-z_]+", e)}
    missing = used - exposed
    assert not missing, f"Grafana panels query metrics /metrics does not expose: {sorted(missing)}"
