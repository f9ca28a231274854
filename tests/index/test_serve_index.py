"""The index inside ``kvfabric serve``, as a real process with auth on: blocks put through the data plane (client
SDK, real sockets) reach the index through the store's tier events, a vLLM engine named in the config feeds it over
ZMQ, and ``POST /v1/route`` answers from both. Every index endpoint needs a token with the right scope, and a tenant
sees only its own namespace."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import zmq

from kvfabric.client import Client
from tests.blocks import SPEC
from tests.serve_process import start_serve

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "index-admin-token-0123456789"
ENGINE_A = "index-engine-a-token-0123456789"  # tenant-a, write, its own namespace
READER_B = "index-reader-b-token-0123456789"  # tenant-b, read, its own namespace
POOL = "index-pool-token-0123456789"  # the engines' load reporter: write on every namespace
NODE = "index-node"
TOKENS = np.arange(1000, 1000 + 6 * SPEC.block_size + 5)  # six full blocks and five tokens more


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    model = ", ".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in SPEC.to_dict().items())
    cfg.write_text(f"""
[server]
server_secret = "index-serve-secret"

[server.auth]
enabled = true

[[server.auth.tokens]]
token = "{ADMIN}"
tenant = "ops"
scopes = ["admin"]
namespaces = ["*"]

[[server.auth.tokens]]
token = "{ENGINE_A}"
tenant = "tenant-a"
scopes = ["write"]

[[server.auth.tokens]]
token = "{READER_B}"
tenant = "tenant-b"
scopes = ["read"]

[[server.auth.tokens]]
token = "{POOL}"
tenant = "engine-pool"
scopes = ["write"]
namespaces = ["*"]

[store]
data_dir = "{tmp_path / "data"}"
ram_bytes = "64MiB"
disk_bytes = "256MiB"
node_id = "{NODE}"

[index]
prefill_tokens_per_s = 1000.0

[[index.vllm_engines]]
engine = "vllm-0"
endpoint = "tcp://127.0.0.1:0"
bind = true
namespace = "tenant-a"
model = {{ {model} }}
""")
    return cfg


class Node:
    """A ``kvfabric serve`` process: its data-plane URL and an admin HTTP client per token."""

    def __init__(self, cfg: Path, tmp_path: Path) -> None:
        self.proc, self.data, self.admin = start_serve(cfg, tmp_path)

    def http(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.admin, headers=headers, timeout=30)

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(30) == 0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(write_config(tmp_path), tmp_path)
    try:
        yield n
    finally:
        n.stop()


def eventually(check: Callable[[], object], what: str, timeout_s: float = 20.0) -> object:
    """Events reach the index asynchronously: poll until ``check`` returns something true."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout_s} s")
        time.sleep(0.05)


def chain_body(**extra: object) -> dict[str, object]:
    return {"model": SPEC.fingerprint().hex(), "namespace": "tenant-a", **extra}


def node_match(http: httpx.Client) -> dict[str, object] | None:
    r = http.post("/v1/index/match", json=chain_body(tokens=TOKENS.tolist()))
    assert r.status_code == 200, r.text
    return next((m for m in r.json()["matches"] if m["source"] == NODE and m["blocks"] == 6), None)


def put_blocks(node: Node) -> list[str]:
    kv = np.random.default_rng(1).integers(0, 256, (6, SPEC.block_nbytes), dtype=np.uint8)
    with Client(node.data, token=ENGINE_A) as c:
        assert c.put(SPEC, TOKENS, kv) == 6
        return [h.hex() for h in c.block_hashes(SPEC, TOKENS)]


def register_engines(node: Node, *names: str) -> None:
    with node.http(POOL) as pool:
        for name in names:
            r = pool.put(f"/v1/engines/{name}/load", json={"pending_prefill_tokens": 0})
            assert r.status_code == 200, r.text


def test_route_finds_the_blocks_put_through_the_data_plane(node: Node) -> None:
    hashes = put_blocks(node)
    register_engines(node, "engine-1", "engine-2")
    with node.http(ENGINE_A) as a:
        m = eventually(lambda: node_match(a), "the node's blocks in the index")
        assert m == {"source": NODE, "blocks": 6, "media": {"ram": 6, "disk": 6}}
        for body in (chain_body(tokens=TOKENS.tolist()), chain_body(hashes=hashes, num_tokens=len(TOKENS))):
            r = a.post("/v1/route", json=body)
            assert r.status_code == 200, r.text
            d = r.json()
            assert d["engine"] in ("engine-1", "engine-2", "vllm-0") and d["policy"] == "kvfabric"  # all idle
            # no engine holds the prefix; all six blocks put are loaded from the node's RAM, five tokens prefilled
            assert (d["local_blocks"], d["fabric_blocks"], d["fabric_tiers"]) == (0, 6, {"ram": 6})
            assert d["prefill_tokens"] == 5
    with node.http(ADMIN) as admin:
        stats = admin.get("/v1/index/stats").json()
        assert {"source": NODE, "medium": "ram", "blocks": 6} in stats["locations"]
        assert {"source": NODE, "medium": "disk", "blocks": 6} in stats["locations"]
        assert stats["local_feeds"][0]["dropped"] == 0 and stats["local_feeds"][0]["errors"] == 0


def vllm_stored(block_hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": block_hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": SPEC.block_size, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip


def test_a_vllm_engine_named_in_the_config_feeds_the_index(node: Node) -> None:
    put_blocks(node)
    with node.http(ADMIN) as admin:
        (feed,) = admin.get("/v1/index/stats").json()["feeds"]
    # vLLM's engine publishes [topic, seq, msgpack batch]; its first four blocks are in its GPU cache
    payload = msgpack.packb([1.0, [vllm_stored([101, 102, 103, 104], None, TOKENS[: 4 * SPEC.block_size].tolist())]])
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(feed["endpoint"])
    seq = 0

    def engine_seen(http: httpx.Client) -> dict[str, object] | None:
        nonlocal seq
        pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])  # PUB drops until connected: resend
        seq += 1
        matches = http.post("/v1/index/match", json=chain_body(tokens=TOKENS.tolist())).json()["matches"]
        return next((m for m in matches if m["source"] == "vllm-0"), None)

    try:
        with node.http(ENGINE_A) as a:
            assert eventually(lambda: engine_seen(a), "vLLM's blocks in the index") == {
                "source": "vllm-0", "blocks": 4, "media": {"gpu": 4}}  # fmt: skip
            eventually(lambda: node_match(a), "the node's blocks in the index")
            register_engines(node, "engine-1")
            d = a.post("/v1/route", json=chain_body(tokens=TOKENS.tolist())).json()
            # vllm-0 (registered by the config) holds four blocks and loads the other two from the node
            assert (d["engine"], d["local_blocks"], d["fabric_blocks"]) == ("vllm-0", 4, 2)
    finally:
        pub.close()
        ctx.term()


def test_index_endpoints_need_a_token_and_keep_tenants_apart(node: Node) -> None:
    hashes = put_blocks(node)
    register_engines(node, "engine-1")
    route = chain_body(tokens=TOKENS.tolist())
    with node.http(None) as anon:
        for method, path, body in (("POST", "/v1/route", route), ("POST", "/v1/index/match", route),
                                   ("GET", "/v1/index/stats", None), ("PUT", "/v1/engines/x/load", {}),
                                   ("DELETE", "/v1/engines/engine-1", None)):  # fmt: skip
            r = anon.request(method, path, json=body)
            assert r.status_code == 401, (method, path, r.text)
    with node.http("not-a-token-of-this-node") as bad:
        assert bad.post("/v1/route", json=route).status_code == 401
    with node.http(ENGINE_A) as a:
        eventually(lambda: node_match(a), "the node's blocks in the index")
    with node.http(READER_B) as b:
        # tenant-a's namespace is not tenant-b's to query, by tokens or by hashes
        for path in ("/v1/route", "/v1/index/match"):
            r = b.post(path, json=route)
            assert r.status_code == 403 and "tenant-a" in r.text
            assert b.post(path, json=chain_body(hashes=hashes)).status_code == 403
        # in its own namespace the same tokens hash under tenant-b's salt: nothing of tenant-a's matches
        own = {**route, "namespace": "tenant-b"}
        assert b.post("/v1/index/match", json=own).json()["matches"] == []
        d = b.post("/v1/route", json=own).json()
        assert (d["local_blocks"], d["fabric_blocks"]) == (0, 0)
        # even tenant-a's own hashes, asked for in tenant-b's namespace, find nothing
        assert b.post("/v1/index/match", json={**own, "tokens": None, "hashes": hashes}).json()["matches"] == []
        # node-wide views and engine changes need more than a tenant's read token
        assert b.get("/v1/index/stats").status_code == 403
        assert b.put("/v1/engines/engine-9/load", json={}).status_code == 403
        assert b.delete("/v1/engines/engine-1").status_code == 403
    with node.http(ENGINE_A) as a:  # write, but on one namespace only: engines are everyone's
        assert a.put("/v1/engines/engine-9/load", json={}).status_code == 403
        assert a.get("/v1/index/stats").status_code == 403
    with node.http(POOL) as pool:  # write on every namespace: may report loads, may not drop engines
        assert pool.delete("/v1/engines/engine-1").status_code == 403
    with node.http(ADMIN) as admin:
        assert admin.delete("/v1/engines/engine-1").json() == {"engine": "engine-1", "blocks_dropped": 0}
        assert [e["engine"] for e in admin.get("/v1/index/stats").json()["engines"]] == ["vllm-0"]


def test_blocks_kept_across_a_restart_are_announced_to_the_new_index(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    first = Node(cfg, tmp_path)
    try:
        put_blocks(first)
    finally:
        first.stop()
    second = Node(cfg, tmp_path)  # RAM starts empty; the disk tier still holds the six blocks, and says nothing
    try:
        register_engines(second, "engine-1")
        with second.http(ENGINE_A) as a:

            def on_disk() -> bool:
                r = a.post("/v1/index/match", json=chain_body(tokens=TOKENS.tolist())).json()
                return r["matches"] == [{"source": NODE, "blocks": 6, "media": {"disk": 6}}]

            eventually(on_disk, "the disk tier's blocks announced at start")
            d = a.post("/v1/route", json=chain_body(tokens=TOKENS.tolist())).json()
            assert d["engine"] in ("engine-1", "vllm-0")
            assert (d["local_blocks"], d["fabric_blocks"], d["fabric_tiers"]) == (0, 6, {"disk": 6})
    finally:
        second.stop()


def test_a_vllm_endpoint_that_cannot_be_bound_stops_serve_with_a_clear_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('endpoint = "tcp://127.0.0.1:0"', 'endpoint = "tcp://not-an-address:1"'))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "kvfabric", "serve", "--config", str(cfg), "--port", "0", "--admin-port", "0",
         "--no-nixl"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "index.vllm_engines" in proc.stderr and "tcp://not-an-address:1" in proc.stderr
