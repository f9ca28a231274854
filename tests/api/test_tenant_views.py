"""Two tenants on one node: each token sees only its own namespaces' numbers and models, and node-wide views and
operations need a token for all namespaces, whatever its scope. (tenant-a: 5 SPEC + 2 SPEC_B blocks; tenant-b: 3
SPEC blocks.)"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from kvfabric.store.tiered import TieredStore
from tests.api.conftest import SPEC_B, bearer
from tests.blocks import SPEC, make_chain

NODE_WIDE_READS = ("/v1/stats/history", "/v1/tiers", "/v1/errors", "/metrics")  # /v1/index/stats: tests/index


def fingerprints(models: list[dict[str, Any]]) -> set[str]:
    return {m["fingerprint"] for m in models}


def test_a_tenant_sees_its_own_totals_and_no_node_wide_numbers(client: TestClient) -> None:
    a = client.get("/v1/stats", headers=bearer("a-read")).json()
    assert a["view"] == "namespaces"
    assert [n["namespace"] for n in a["namespaces"]] == ["tenant-a"]
    assert a["totals"]["blocks"] == 7 and a["totals"]["hit_rate"] is None
    assert a["tiers"] == [] and a["store"] is None and a["upload_backlog_bytes"] is None
    b = client.get("/v1/stats", headers=bearer("b-write")).json()
    assert [n["namespace"] for n in b["namespaces"]] == ["tenant-b"] and b["totals"]["blocks"] == 3
    assert b["totals"]["bytes"] == 3 * SPEC.block_nbytes
    node = client.get("/v1/stats", headers=bearer("ops-read")).json()
    assert node["view"] == "node" and node["totals"]["blocks"] == 10 and node["tiers"] and node["store"] is not None


def test_a_tenant_lists_only_the_models_its_namespaces_hold(client: TestClient, store: TieredStore) -> None:
    b = fingerprints(client.get("/v1/models", headers=bearer("b-write")).json())
    assert b == {SPEC.fingerprint().hex()}  # not tenant-a's SPEC_B
    a = fingerprints(client.get("/v1/models", headers=bearer("a-read")).json())
    assert a == {SPEC.fingerprint().hex(), SPEC_B.fingerprint().hex()}
    assert fingerprints(client.get("/v1/models", headers=bearer("admin")).json()) >= a
    # tenant-b publishes a block of tenant-a's other model: now (and only now) b sees that model, with b's counts
    store.put_many(make_chain(1, spec=SPEC_B, namespace="tenant-b", seed=9))
    b_models = {m["fingerprint"]: m for m in client.get("/v1/models", headers=bearer("b-write")).json()}
    assert b_models[SPEC_B.fingerprint().hex()]["blocks"] == 1


@pytest.mark.parametrize("who", ["a-read", "a-write", "a-admin", "b-write"])
@pytest.mark.parametrize("path", NODE_WIDE_READS)
def test_node_wide_views_need_all_namespaces(client: TestClient, who: str, path: str) -> None:
    assert client.get(path, headers=bearer(who)).status_code == 403
    assert client.get(path, headers=bearer("ops-read")).status_code == 200


def test_node_wide_operations_and_config_need_an_admin_for_all_namespaces(client: TestClient, store: TieredStore) -> None:
    before = store.tier_stats()["ram"].bytes
    for who in ("a-admin", "a-write", "ops-read"):
        assert client.post("/v1/evict", json={"tier": "ram", "bytes": 1 << 30}, headers=bearer(who)).status_code == 403
        assert client.post("/v1/compact", headers=bearer(who)).status_code == 403
        assert client.get("/v1/config", headers=bearer(who)).status_code == 403
    assert store.tier_stats()["ram"].bytes == before  # refused: nothing evicted
    assert client.get("/v1/config", headers=bearer("admin")).status_code == 200
    assert client.post("/v1/compact", headers=bearer("admin")).status_code == 200
    # a namespace-scoped admin still runs its own namespace
    r = client.put("/v1/namespaces/tenant-a/policy", json={"ttl_s": 60}, headers=bearer("a-admin"))
    assert r.status_code == 200 and r.json()["ttl_s"] == 60
    assert client.put("/v1/namespaces/tenant-b/policy", json={"ttl_s": 60}, headers=bearer("a-admin")).status_code == 403
