"""``kvfabric serve --config`` as a real process: the data plane and the admin app on their own ports, one store.
Blocks put and got through the data plane move the admin API's stats and the /metrics counters."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvfabric.client import Client
from tests.blocks import SPEC
from tests.serve_process import auth_node_config, start_serve

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "serve-admin-token-0123456789"
ENGINE_TOKEN = "serve-engine-token-0123456789"


def write_config(tmp_path: Path) -> Path:
    return auth_node_config(tmp_path, admin_token=ADMIN_TOKEN, engine_token=ENGINE_TOKEN, extra='node_id = "serve-node"')


def start_node(tmp_path: Path) -> tuple[subprocess.Popen[str], str, str]:
    """A ``kvfabric serve`` process on ``tmp_path``'s config and data dir: ``(process, data URL, admin URL)``."""
    return start_serve(write_config(tmp_path), tmp_path)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(data-plane URL, admin URL)`` of a ``kvfabric serve`` process."""
    proc, data, admin = start_node(tmp_path)
    try:
        yield data, admin
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def counters(http: httpx.Client) -> dict[tuple[str, str], float]:
    text = http.get("/metrics").text
    return {
        (s.name, s.labels.get("tier", "")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("kvfabric_tier_")
    }


def test_blocks_through_the_data_plane_show_in_the_admin_api(node: tuple[str, str]) -> None:
    data, admin = node
    tokens = np.arange(4 * SPEC.block_size)
    kv = np.random.default_rng(0).integers(0, 256, (4, SPEC.block_nbytes), dtype=np.uint8)
    with httpx.Client(base_url=admin, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["ready"] is True
        before = counters(http)

        with Client(data, token=ENGINE_TOKEN) as c:
            assert c.put(SPEC, tokens, kv) == 4
            got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
            assert all(g is not None for g in got)

        after = counters(http)
        assert after[("kvfabric_tier_puts_total", "ram")] >= before[("kvfabric_tier_puts_total", "ram")] + 4
        assert after[("kvfabric_tier_hits_total", "ram")] >= before[("kvfabric_tier_hits_total", "ram")] + 4
        assert after[("kvfabric_tier_blocks", "ram")] == before[("kvfabric_tier_blocks", "ram")] + 4
        latency = {
            (s.name, s.labels.get("tier")): s.value
            for f in text_string_to_metric_families(http.get("/metrics").text)
            for s in f.samples
        }
        assert latency[("kvfabric_put_seconds_count", "ram")] >= 1  # recorded by the data-plane server
        assert latency[("kvfabric_get_seconds_count", "ram")] >= 1

        stats = http.get("/v1/stats").json()
        assert stats["node_id"] == "serve-node"
        (ns,) = stats["namespaces"]
        assert ns["blocks"] == 4 and ns["bytes"] == 4 * SPEC.block_nbytes
        assert ns["models"][0]["fingerprint"] == SPEC.fingerprint().hex()
        models = http.get("/v1/models").json()
        assert [m["fingerprint"] for m in models] == [SPEC.fingerprint().hex()]

        # The engine's token is a data-plane write token: no admin operations with it.
        r = http.post("/v1/compact", headers={"Authorization": f"Bearer {ENGINE_TOKEN}"})
        assert r.status_code == 403
        page = httpx.get(admin + "/", timeout=30)
        assert page.status_code == 200 and "kvfabric" in page.text


def test_serve_refuses_an_open_admin_api_beside_data_plane_tokens(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "kvfabric", "serve", "--data-dir", str(tmp_path / "d"), "--port", "0",
         "--admin-port", "0", "--token", "t=tenant-a", "--no-nixl"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "server.auth.tokens" in proc.stderr


def test_a_killed_node_comes_back_with_every_block_and_says_what_recovery_did(tmp_path: Path) -> None:
    """SIGKILL right after acknowledged puts: the restarted node serves every block, and ``/v1/tiers`` shows the
    disk tier's recovery re-indexing the entries the kill took (they were still staged in memory)."""
    tokens = np.arange(5 * SPEC.block_size)
    kv = np.random.default_rng(1).integers(0, 256, (5, SPEC.block_nbytes), dtype=np.uint8)
    proc, data, _ = start_node(tmp_path)
    try:
        with Client(data, token=ENGINE_TOKEN) as c:
            assert c.put(SPEC, tokens, kv) == 5
    finally:
        proc.kill()
        proc.wait(30)
    proc, data, admin = start_node(tmp_path)
    try:
        with httpx.Client(base_url=admin, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as http:
            tiers = {t["tier"]: t for t in http.get("/v1/tiers").json()["tiers"]}
        assert tiers["ram"]["recovery"] is None
        assert tiers["disk"]["recovery"]["reindexed"] == 5
        assert tiers["disk"]["recovery"]["dropped"] == 0
        with Client(data, token=ENGINE_TOKEN) as c:
            got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
            assert all(g is not None for g in got)
            assert [bytes(memoryview(g).cast("B")) for g in got] == [row.tobytes() for row in kv]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
