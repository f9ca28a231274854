"""Every admin endpoint: what it returns, who may call it (401/403), and that bad input is a 422 naming the problem
with nothing changed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from kvfabric.api.app import create_app
from kvfabric.config import Settings
from kvfabric.hashing import block_hash
from kvfabric.ids import BlockKey, PrefixHash
from kvfabric.record import Block, BlockMeta
from kvfabric.store.tiered import TieredStore
from tests.api.conftest import SPEC_B, bearer
from tests.blocks import SPEC, make_chain

ADMIN, OPS_READ, A_READ, A_WRITE, B_WRITE = "admin", "ops-read", "a-read", "a-write", "b-write"


def state(store: TieredStore) -> Any:
    """Everything an admin call could change, for 'nothing changed' checks."""
    return (
        {ns: (s.blocks, s.bytes, dict(s.models)) for ns, s in store.namespace_stats().items()},
        dict(store.config.namespaces),
        store.pinned(),
    )


def block_path(b: Block) -> str:
    k = b.key
    return f"/v1/namespaces/{k.namespace}/models/{k.model.hex()}/blocks/{k.prefix.hex()}"


def wait_for(cond: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


# --- health, openapi --------------------------------------------------------------------------------------------------
def test_health_and_readiness_need_no_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True


def test_openapi_is_served_and_lists_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for p in (
        "/healthz", "/readyz", "/metrics", "/v1/stats", "/v1/stats/history", "/v1/errors", "/v1/config",
        "/v1/namespaces", "/v1/namespaces/{namespace}", "/v1/namespaces/{namespace}/policy", "/v1/models",
        "/v1/namespaces/{namespace}/models/{fingerprint}",
        "/v1/namespaces/{namespace}/models/{fingerprint}/blocks/{prefix}",
        "/v1/namespaces/{namespace}/models/{fingerprint}/blocks/{prefix}/pin", "/v1/tiers", "/v1/evict",
        "/v1/namespaces/{namespace}/models/{fingerprint}/blocks", "/v1/pins",
        "/v1/namespaces/{namespace}/models/{fingerprint}/prefixes/{prefix}",
        "/v1/compact",
    ):  # fmt: skip
        assert p in paths, p


def test_dashboard_is_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and 'id="tiers"' in r.text
    assert client.get("/dashboard/dashboard.js").status_code == 200
    assert client.get("/dashboard/dashboard.css").status_code == 200


# --- authentication ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": "Basic YWRtaW46cHc="},
     {"Authorization": "Bearer "}],
)  # fmt: skip
def test_401_without_a_valid_bearer_token(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/stats"), ("GET", "/metrics"), ("GET", "/v1/namespaces"), ("POST", "/v1/compact")):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["detail"] or "Authorization" in r.json()["detail"]


def test_auth_disabled_means_one_operator_with_every_scope(store: TieredStore, blocks: Any, tmp_path: Any) -> None:
    settings = Settings(store={"node_id": "open"})
    with TestClient(create_app(store, settings)) as c:
        assert c.get("/v1/stats").status_code == 200
        assert c.get("/v1/config").status_code == 200
        assert c.get("/metrics").status_code == 200


# --- stats --------------------------------------------------------------------------------------------------------
def test_stats_per_tier_namespace_and_model(client: TestClient, blocks: dict[str, list[Block]]) -> None:
    s = client.get("/v1/stats", headers=bearer(ADMIN)).json()
    assert s["node_id"] == "test-node"
    tiers = {t["tier"]: t for t in s["tiers"]}
    assert "ram" in tiers
    ram = tiers["ram"]
    assert ram["capacity_bytes"] == 64 << 20
    assert ram["blocks"] == 10
    assert 0 < ram["occupancy"] < 1
    ns = {n["namespace"]: n for n in s["namespaces"]}
    assert set(ns) == {"tenant-a", "tenant-b"}
    a = ns["tenant-a"]
    assert a["blocks"] == 7
    assert a["bytes"] == 5 * SPEC.block_nbytes + 2 * SPEC_B.block_nbytes
    assert a["policy"] == {"ttl_s": 3600.0, "quota_bytes": 128 << 20}
    models = {m["fingerprint"]: m for m in a["models"]}
    assert models[SPEC.fingerprint().hex()] == {
        "fingerprint": SPEC.fingerprint().hex(), "model": SPEC.model, "blocks": 5, "bytes": 5 * SPEC.block_nbytes,
    }  # fmt: skip
    assert models[SPEC_B.fingerprint().hex()]["blocks"] == 2
    assert s["totals"]["blocks"] == 10


def test_stats_show_only_the_tokens_namespaces(client: TestClient) -> None:
    s = client.get("/v1/stats", headers=bearer(A_READ)).json()
    assert [n["namespace"] for n in s["namespaces"]] == ["tenant-a"]
    assert s["totals"]["blocks"] == 7


def test_hits_and_misses_show_in_stats(client: TestClient, store: TieredStore, blocks: Any) -> None:
    before = {t["tier"]: t for t in client.get("/v1/stats", headers=bearer(OPS_READ)).json()["tiers"]}
    assert store.get(blocks["a"][0].key) is not None
    after = {t["tier"]: t for t in client.get("/v1/stats", headers=bearer(OPS_READ)).json()["tiers"]}
    assert after["ram"]["hits"] == before["ram"]["hits"] + 1
    assert after["ram"]["hit_rate"] is not None


def test_history_collects_points(client: TestClient, store: TieredStore, blocks: Any) -> None:
    wait_for(lambda: len(client.get("/v1/stats/history", headers=bearer(OPS_READ)).json()["points"]) >= 2, "samples")
    store.get(blocks["a"][1].key)
    n = len(client.get("/v1/stats/history", headers=bearer(OPS_READ)).json()["points"])
    wait_for(lambda: len(client.get("/v1/stats/history", headers=bearer(OPS_READ)).json()["points"]) > n, "a sample")
    h = client.get("/v1/stats/history", headers=bearer(OPS_READ)).json()
    assert h["interval_s"] == 0.05
    assert any(t["hits"] >= 1 for p in h["points"] for t in p["tiers"])
    assert all(p["interval_s"] > 0 for p in h["points"])
    assert any(p["read_bytes_per_s"] > 0 for p in h["points"])


def test_errors_need_a_node_wide_token(client: TestClient) -> None:
    assert client.get("/v1/errors", headers=bearer(OPS_READ)).json() == []
    r = client.get("/v1/errors", headers=bearer(A_READ))
    assert r.status_code == 403 and "all namespaces" in r.json()["detail"]


def test_config_view_is_admin_only_and_masked(client: TestClient) -> None:
    r = client.get("/v1/config", headers=bearer(ADMIN))
    assert r.status_code == 200
    text = r.text
    assert "test-server-secret" not in text and "admin-token-0123456789" not in text
    assert r.json()["config"]["server"]["server_secret"] == "**********"
    assert r.json()["config"]["store"]["node_id"] == "test-node"
    for who in (OPS_READ, A_WRITE):
        r = client.get("/v1/config", headers=bearer(who))
        assert r.status_code == 403 and "admin" in r.json()["detail"]


def test_tiers_view(client: TestClient) -> None:
    tiers = client.get("/v1/tiers", headers=bearer(OPS_READ)).json()["tiers"]
    assert [t["tier"] for t in tiers] == ["ram", "disk"]
    ram, disk = tiers
    assert ram == {"tier": "ram", "capacity_bytes": 64 << 20, "persistent": False, "shared": False, "codec": "raw",
                   "write_policy": "first", "recovery": None, "disk_state": None, "object_state": None}  # fmt: skip
    recovery = disk.pop("recovery")
    state = disk.pop("disk_state")
    assert disk == {"tier": "disk", "capacity_bytes": 256 << 20, "persistent": True, "shared": False,
                    "codec": "raw", "write_policy": "write-through", "object_state": None}  # fmt: skip
    assert state["full"] is False and state["reason"] is None and state["reserve_held"] is True
    assert state["free_bytes"] > 0 and state["full_episodes"] == state["refused_puts"] == 0
    assert {k: recovery[k] for k in ("reindexed", "dropped", "truncated_bytes")} == dict.fromkeys(
        ("reindexed", "dropped", "truncated_bytes"), 0
    )  # a fresh data dir: nothing to repair


# --- namespaces and models ----------------------------------------------------------------------------------------
def test_list_namespaces_by_token(client: TestClient) -> None:
    assert {n["namespace"] for n in client.get("/v1/namespaces", headers=bearer(ADMIN)).json()} == {
        "tenant-a", "tenant-b",
    }  # fmt: skip
    assert [n["namespace"] for n in client.get("/v1/namespaces", headers=bearer(A_READ)).json()] == ["tenant-a"]


def test_get_namespace(client: TestClient) -> None:
    r = client.get("/v1/namespaces/tenant-a", headers=bearer(A_READ))
    assert r.status_code == 200 and r.json()["blocks"] == 7 and len(r.json()["models"]) == 2
    r = client.get("/v1/namespaces/tenant-b", headers=bearer(A_READ))
    assert r.status_code == 403 and "tenant-b" in r.json()["detail"]
    r = client.get("/v1/namespaces/nobody", headers=bearer(ADMIN))
    assert r.status_code == 404 and "nobody" in r.json()["detail"]


def test_namespace_name_too_long_is_422(client: TestClient, store: TieredStore) -> None:
    before = state(store)
    name = "é" * 200  # 200 characters, 400 UTF-8 bytes
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/v1/namespaces/{name}", headers=bearer(ADMIN))
        assert r.status_code == 422
        assert "255" in str(r.json()["detail"])
    assert state(store) == before


def test_delete_namespace(client: TestClient, store: TieredStore) -> None:
    before = state(store)
    assert client.delete("/v1/namespaces/tenant-b", headers=bearer(A_READ)).status_code == 403  # scope
    assert client.delete("/v1/namespaces/tenant-b", headers=bearer(A_WRITE)).status_code == 403  # namespace
    assert state(store) == before
    r = client.delete("/v1/namespaces/tenant-b", headers=bearer(B_WRITE))
    assert r.status_code == 200 and r.json() == {"deleted": 3}
    assert "tenant-b" not in store.namespace_stats()
    assert store.namespace_stats()["tenant-a"].blocks == 7
    assert client.delete("/v1/namespaces/tenant-b", headers=bearer(B_WRITE)).json() == {"deleted": 0}


def test_set_policy(client: TestClient, store: TieredStore) -> None:
    url = "/v1/namespaces/tenant-a/policy"
    r = client.put(url, json={"ttl_s": 60}, headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json() == {"ttl_s": 60.0, "quota_bytes": 128 << 20}  # quota kept
    r = client.put(url, json={"quota_bytes": "1GiB"}, headers=bearer(ADMIN))
    assert r.json() == {"ttl_s": 60.0, "quota_bytes": 1 << 30}
    r = client.put(url, json={"ttl_s": None}, headers=bearer(ADMIN))
    assert r.json() == {"ttl_s": None, "quota_bytes": 1 << 30}
    p = store.config.namespace_policy("tenant-a")
    assert p is not None and (p.ttl_s, p.quota_bytes) == (None, 1 << 30)
    assert client.get("/v1/namespaces/tenant-a", headers=bearer(A_READ)).json()["policy"]["quota_bytes"] == 1 << 30


@pytest.mark.parametrize(
    ("body", "field"),
    [({"ttl_s": -1}, "ttl_s"), ({"ttl_s": "soon"}, "ttl_s"), ({"quota_bytes": "12XB"}, "quota_bytes"),
     ({"quota_bytes": -5}, "quota_bytes"), ({"ttl": 5}, "ttl"), ([], "body")],
)  # fmt: skip
def test_set_policy_rejects_bad_input_and_changes_nothing(
    client: TestClient, store: TieredStore, body: Any, field: str
) -> None:
    before = state(store)
    r = client.put("/v1/namespaces/tenant-a/policy", json=body, headers=bearer(ADMIN))
    assert r.status_code == 422
    assert any(field in [str(x) for x in d["loc"]] for d in r.json()["detail"]), r.json()
    assert state(store) == before


def test_set_policy_needs_admin(client: TestClient, store: TieredStore) -> None:
    before = state(store)
    r = client.put("/v1/namespaces/tenant-a/policy", json={"ttl_s": 1}, headers=bearer(A_WRITE))
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    assert state(store) == before


def test_models(client: TestClient) -> None:
    models = {m["fingerprint"]: m for m in client.get("/v1/models", headers=bearer(ADMIN)).json()}
    assert models[SPEC.fingerprint().hex()]["blocks"] == 8
    assert models[SPEC.fingerprint().hex()]["spec"]["model"] == SPEC.model
    assert models[SPEC_B.fingerprint().hex()]["blocks"] == 2
    a_view = {m["fingerprint"]: m for m in client.get("/v1/models", headers=bearer(A_READ)).json()}
    assert a_view[SPEC.fingerprint().hex()]["blocks"] == 5  # tenant-b's blocks are not counted for tenant-a


def test_delete_model(client: TestClient, store: TieredStore) -> None:
    url = f"/v1/namespaces/tenant-a/models/{SPEC_B.fingerprint().hex()}"
    before = state(store)
    assert client.delete(url, headers=bearer(A_READ)).status_code == 403
    assert client.delete(url, headers=bearer(B_WRITE)).status_code == 403
    bad = client.delete("/v1/namespaces/tenant-a/models/not-hex", headers=bearer(A_WRITE))
    assert bad.status_code == 422 and "fingerprint" in str(bad.json()["detail"])
    assert state(store) == before
    assert client.delete(url, headers=bearer(A_WRITE)).json() == {"deleted": 2}
    usage = store.namespace_stats()["tenant-a"]
    assert usage.blocks == 5 and SPEC_B.fingerprint() not in usage.models


# --- blocks and pins ---------------------------------------------------------------------------------------------
def test_get_block(client: TestClient, blocks: dict[str, list[Block]]) -> None:
    b = blocks["a"][2]
    r = client.get(block_path(b), headers=bearer(A_READ))
    assert r.status_code == 200
    j = r.json()
    assert j["prefix"] == b.key.prefix.hex() and j["parent"] == b.meta.parent.hex()
    assert j["shape"] == list(SPEC.block_shape) and j["dtype"] == "bfloat16" and j["token_count"] == 16
    assert j["nbytes"] == SPEC.block_nbytes and j["tier"] == "ram" and j["pinned"] is False
    assert client.get(block_path(blocks["b"][0]), headers=bearer(A_READ)).status_code == 403


def test_get_block_errors(client: TestClient, blocks: dict[str, list[Block]]) -> None:
    b = blocks["a"][0]
    missing = block_path(b)[:-64] + "0" * 64
    r = client.get(missing, headers=bearer(A_READ))
    assert r.status_code == 404 and "no block" in r.json()["detail"]
    r = client.get(block_path(b)[:-64] + "zz", headers=bearer(A_READ))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "prefix"]


def test_delete_block(client: TestClient, store: TieredStore, blocks: dict[str, list[Block]]) -> None:
    b = blocks["a"][4]
    assert client.delete(block_path(b), headers=bearer(A_READ)).status_code == 403
    assert client.delete(block_path(b), headers=bearer(B_WRITE)).status_code == 403
    assert store.head(b.key) is not None
    assert client.delete(block_path(b), headers=bearer(A_WRITE)).json() == {"deleted": 1}
    assert store.head(b.key) is None
    assert client.get(block_path(b), headers=bearer(A_READ)).status_code == 404
    assert client.delete(block_path(b), headers=bearer(A_WRITE)).json() == {"deleted": 0}


def test_pin_and_unpin(client: TestClient, store: TieredStore, blocks: dict[str, list[Block]]) -> None:
    b = blocks["a"][0]
    assert client.put(block_path(b) + "/pin", headers=bearer(A_READ)).status_code == 403
    assert client.put(block_path(b) + "/pin", headers=bearer(A_WRITE)).json() == {"pinned": True}
    assert client.get(block_path(b), headers=bearer(A_READ)).json()["pinned"] is True
    assert b.key in store.pinned()
    assert client.delete(block_path(b) + "/pin", headers=bearer(A_WRITE)).json() == {"pinned": False}
    assert client.get(block_path(b), headers=bearer(A_READ)).json()["pinned"] is False
    missing = block_path(b)[:-64] + "1" * 64
    assert client.put(missing + "/pin", headers=bearer(A_WRITE)).status_code == 404


# --- operations -----------------------------------------------------------------------------------------------------
def test_evict(client: TestClient, store: TieredStore) -> None:
    r = client.post("/v1/evict", json={"tier": "ram", "bytes": "1GiB"}, headers=bearer(ADMIN))
    assert r.status_code == 200
    j = r.json()
    assert j["tier"] == "ram" and j["evicted_bytes"] > 0
    assert store.tier_stats()["ram"].blocks == 0  # everything left RAM ...
    assert store.namespace_stats()["tenant-a"].blocks == 7  # ... for the disk tier, which still holds it
    assert client.post("/v1/evict", json={"tier": "ram", "bytes": 1}, headers=bearer(A_WRITE)).status_code == 403
    r = client.post("/v1/evict", json={"tier": "tape", "bytes": 1}, headers=bearer(ADMIN))
    assert r.status_code == 404 and "tape" in r.json()["detail"]


@pytest.mark.parametrize(
    "body", [{"tier": "ram"}, {"tier": "ram", "bytes": -1}, {"tier": "", "bytes": 1}, {"tier": "ram", "bytes": "x"},
             {"tier": "ram", "bytes": 1, "now": True}],
)  # fmt: skip
def test_evict_rejects_bad_input(client: TestClient, store: TieredStore, body: dict[str, Any]) -> None:
    before = (state(store), store.tier_stats())
    r = client.post("/v1/evict", json=body, headers=bearer(ADMIN))
    assert r.status_code == 422 and r.json()["detail"]
    assert (state(store), store.tier_stats()) == before


def test_compact(client: TestClient) -> None:
    assert client.post("/v1/compact", headers=bearer(OPS_READ)).status_code == 403
    r = client.post("/v1/compact", headers=bearer(ADMIN))
    assert r.status_code == 200 and isinstance(r.json()["result"], dict)


def test_extra_routers_are_mounted(store: TieredStore, settings: Settings) -> None:
    router = APIRouter()

    @router.get("/v1/route")
    def route() -> dict[str, str]:
        return {"engine": "e1"}

    with TestClient(create_app(store, settings, extra_routers=[router])) as c:
        assert c.get("/v1/route").json() == {"engine": "e1"}


def test_admin_server_binds_real_ports_and_reports_a_taken_one(store: TieredStore, settings: Settings) -> None:
    import asyncio

    import httpx

    from kvfabric.api.server import AdminServer

    async def scenario() -> None:
        first = AdminServer(create_app(store, settings), "127.0.0.1", 0)
        await first.start()
        try:
            async with httpx.AsyncClient() as http:
                r = await http.get(f"http://127.0.0.1:{first.port}/healthz")
                assert r.json() == {"status": "ok"}
            clash = AdminServer(create_app(store, settings), "127.0.0.1", first.port)
            with pytest.raises(OSError, match=f"could not start on 127.0.0.1:{first.port}"):
                await clash.start()
        finally:
            await first.close()
            await first.close()  # idempotent

    asyncio.run(scenario())


def test_a_quota_set_through_the_api_is_enforced_by_the_store(client: TestClient, store: TieredStore) -> None:
    quota = 6 * SPEC.block_nbytes  # tenant-a holds 5 SPEC + 2 smaller SPEC_B blocks: already over 6 SPEC blocks
    r = client.put("/v1/namespaces/tenant-a/policy", json={"quota_bytes": quota}, headers=bearer(ADMIN))
    assert r.json()["quota_bytes"] == quota
    store.put_many(make_chain(3, namespace="tenant-a", seed=123))
    usage = store.namespace_stats()["tenant-a"]
    assert usage.bytes <= quota
    assert client.get("/v1/stats", headers=bearer(OPS_READ)).json()["store"]["quota_evictions"] > 0
    stats = client.get("/v1/stats", headers=bearer(A_READ)).json()
    (ns,) = stats["namespaces"]
    assert ns["bytes"] == usage.bytes <= quota and ns["policy"]["quota_bytes"] == quota
    assert store.namespace_stats()["tenant-b"].blocks == 3  # other namespaces untouched


def test_list_blocks_pages_through_a_models_blocks(client: TestClient, blocks: dict[str, list[Block]]) -> None:
    base = f"/v1/namespaces/tenant-a/models/{SPEC.fingerprint().hex()}/blocks"
    want = sorted(b.key.prefix.hex() for b in blocks["a"])
    seen, after = [], None
    while True:
        url = base + "?limit=2" + (f"&after={after}" if after else "")
        page = client.get(url, headers=bearer(A_READ)).json()
        seen += [b["prefix"] for b in page["blocks"]]
        assert all(
            b["fingerprint"] == SPEC.fingerprint().hex() and b["namespace"] == "tenant-a" for b in page["blocks"]
        )
        after = page["next"]
        if after is None:
            break
    assert seen == want
    assert client.get(base, headers=bearer(A_READ)).json()["next"] is None
    other = f"/v1/namespaces/tenant-b/models/{SPEC.fingerprint().hex()}/blocks"
    assert client.get(other, headers=bearer(A_READ)).status_code == 403
    for bad in ("?limit=0", "?limit=10001", "?after=xyz"):
        assert client.get(base + bad, headers=bearer(A_READ)).status_code == 422


def test_delete_prefix_removes_the_block_and_everything_extending_it(
    client: TestClient, store: TieredStore, blocks: dict[str, list[Block]]
) -> None:
    chain = blocks["a"]
    # A branch off chain[1]: same first two blocks, different third block onwards.
    fork_parent = chain[1]
    branch = []
    parent = fork_parent.key.prefix
    for i, b in enumerate(make_chain(2, namespace="tenant-a", seed=500)):
        prefix = block_hash(parent, [7 + i] * SPEC.block_size)
        meta = BlockMeta(BlockKey(b.key.namespace, b.key.model, prefix), b.meta.dtype, b.meta.shape,
                         b.meta.token_count, parent, b.meta.created_ms)  # fmt: skip
        branch.append(Block(meta, b.payload))
        parent = prefix
    store.put_many(branch)
    url = f"/v1/namespaces/tenant-a/models/{SPEC.fingerprint().hex()}/prefixes/{chain[2].key.prefix.hex()}"
    before = state(store)
    assert client.delete(url, headers=bearer(A_READ)).status_code == 403
    assert client.delete(url, headers=bearer(B_WRITE)).status_code == 403
    assert state(store) == before
    assert client.delete(url, headers=bearer(A_WRITE)).json() == {"deleted": 3}  # chain[2:]
    assert [store.head(b.key) is not None for b in chain] == [True, True, False, False, False]
    assert all(store.head(b.key) is not None for b in branch)  # the fork off chain[1] does not extend chain[2]
    fork = f"/v1/namespaces/tenant-a/models/{SPEC.fingerprint().hex()}/prefixes/{chain[1].key.prefix.hex()}"
    assert client.delete(fork, headers=bearer(A_WRITE)).json() == {"deleted": 3}  # chain[1] + the branch
    assert store.namespace_stats()["tenant-a"].blocks == 1 + 2  # chain[0] and the SPEC_B chain
    assert client.delete(fork, headers=bearer(A_WRITE)).json() == {"deleted": 0}


def test_pins_listing(client: TestClient, store: TieredStore, blocks: dict[str, list[Block]]) -> None:
    a, b = blocks["a"][0], blocks["b"][0]
    store.pin(a.key)
    store.pin(b.key)
    ghost = BlockKey(a.key.namespace, a.key.model, PrefixHash(bytes(range(32))))
    store.pin(ghost)  # a pin recorded before its block arrives
    mine = client.get("/v1/pins", headers=bearer(A_READ)).json()
    assert {(p["prefix"], p["stored"]) for p in mine} == {(a.key.prefix.hex(), True), (ghost.prefix.hex(), False)}
    assert len(client.get("/v1/pins", headers=bearer(ADMIN)).json()) == 3


def test_an_unexpected_failure_is_a_500_counted_and_logged(store: TieredStore, settings: Settings) -> None:
    router = APIRouter()

    @router.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("kaboom")

    app = create_app(store, settings, extra_routers=[router])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/boom")
        assert r.status_code == 500 and r.json() == {"detail": "internal error: RuntimeError"}
        errors = c.get("/v1/errors", headers=bearer(OPS_READ)).json()
        assert errors[-1]["kind"] == "RuntimeError" and "kaboom" in errors[-1]["message"]
        assert 'kvfabric_errors_total{kind="RuntimeError"} 1.0' in c.get("/metrics", headers=bearer(OPS_READ)).text


def test_unknown_query_parameters_are_rejected(client: TestClient) -> None:
    base = f"/v1/namespaces/tenant-a/models/{SPEC.fingerprint().hex()}/blocks"
    r = client.get(base + "?limt=10", headers=bearer(A_READ))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limt"]
    assert client.get("/v1/stats?verbose=1", headers=bearer(A_READ)).status_code == 422
    assert client.get(base + "?limit=10", headers=bearer(A_READ)).status_code == 200
