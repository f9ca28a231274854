"""The numbers a real ``kvfabric serve`` reports (``/v1/stats``, ``/metrics``, ``/v1/config``) for what a client
did, on a node with RAM, disk and S3 (SeaweedFS): uploads are no hits, a miss counts once per tier, and the config
shown is the one the node runs, command-line flags included."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvfabric.client import Client
from tests.blocks import SPEC
from tests.s3server import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.serve_process import auth_node_config, start_serve

ADMIN_TOKEN = "counts-admin-token-0123456789"
ENGINE_TOKEN = "counts-engine-token-0123456789"


def write_config(tmp_path: Path, s3: SeaweedFS, bucket: str) -> Path:
    return auth_node_config(tmp_path, admin_token=ADMIN_TOKEN, engine_token=ENGINE_TOKEN, extra=f"""
[object]
endpoint_url = "{s3.endpoint.endpoint_url}"
region = "{s3.endpoint.region}"
bucket = "{bucket}"
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
seal_after_s = 0.1
""")


@pytest.fixture
def node(tmp_path: Path, s3_server: SeaweedFS) -> Iterator[tuple[str, httpx.Client]]:
    """``(data-plane URL, admin client)`` of a RAM + disk + S3 node."""
    proc, data, admin = start_serve(write_config(tmp_path, s3_server, s3_server.create_bucket()), tmp_path)
    try:
        with httpx.Client(base_url=admin, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as http:
            yield data, http
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def reads(http: httpx.Client) -> dict[str, tuple[int, int]]:
    return {t["tier"]: (t["hits"], t["misses"]) for t in http.get("/v1/stats").json()["tiers"]}


def metric_reads(http: httpx.Client) -> dict[str, tuple[float, float]]:
    samples = {
        (s.name, s.labels.get("tier")): s.value
        for f in text_string_to_metric_families(http.get("/metrics").text)
        for s in f.samples
    }
    return {
        tier: (samples[("kvfabric_tier_hits_total", tier)], samples[("kvfabric_tier_misses_total", tier)])
        for tier in ("ram", "disk", "object")
    }


def wait_for(http: httpx.Client, done: Any, what: str, deadline_s: float = 60.0) -> dict[str, Any]:
    """Poll ``/v1/stats`` until ``done(stats)`` (the deadline only stops a hung test)."""
    end = time.monotonic() + deadline_s
    while not done(stats := http.get("/v1/stats").json()):
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}: {stats}")
        time.sleep(0.05)
    return stats


def test_a_node_with_one_put_and_no_gets_has_no_hit_rate(node: tuple[str, httpx.Client]) -> None:
    data, http = node
    tokens = np.arange(SPEC.block_size)
    kv = np.random.default_rng(0).integers(0, 256, (1, SPEC.block_nbytes), dtype=np.uint8)
    with Client(data, token=ENGINE_TOKEN) as c:
        assert c.put(SPEC, tokens, kv) == 1

    def uploaded(s: dict[str, Any]) -> bool:
        obj = next(t for t in s["tiers"] if t["tier"] == "object")
        return obj["puts"] == 1 and s["store"]["writeback_pending"]["object"] == 0 and s["upload_backlog_bytes"] == 0

    stats = wait_for(http, uploaded, "the block's upload to S3")  # the upload read the block from disk
    assert reads(http) == {"ram": (0, 0), "disk": (0, 0), "object": (0, 0)}
    assert stats["totals"]["hit_rate"] is None
    assert metric_reads(http) == {"ram": (0, 0), "disk": (0, 0), "object": (0, 0)}


@pytest.mark.parametrize("shm", [True, False], ids=["shm-leases", "tcp"])
def test_gets_count_once_per_tier_asked(node: tuple[str, httpx.Client], shm: bool) -> None:
    data, http = node
    tokens = np.arange(2 * SPEC.block_size)
    kv = np.random.default_rng(1).integers(0, 256, (2, SPEC.block_nbytes), dtype=np.uint8)
    with Client(data, token=ENGINE_TOKEN, shm=shm) as c:
        hashes = c.block_hashes(SPEC, tokens)
        assert c.put(SPEC, tokens, kv) == 2
        (got,) = c.get_blocks(SPEC, hashes[:1])
        assert got is not None and bytes(memoryview(got).cast("B")) == kv[0].tobytes()
        assert reads(http) == {"ram": (1, 0), "disk": (0, 0), "object": (0, 0)}
        assert metric_reads(http) == {"ram": (1, 0), "disk": (0, 0), "object": (0, 0)}

        r = http.post("/v1/evict", json={"tier": "ram", "bytes": 2 * SPEC.block_nbytes})
        assert r.status_code == 200, r.text
        (got,) = c.get_blocks(SPEC, hashes[1:])  # from disk, promoted into RAM on the way
        assert got is not None and bytes(memoryview(got).cast("B")) == kv[1].tobytes()
        assert reads(http) == {"ram": (1, 1), "disk": (1, 0), "object": (0, 0)}
    assert http.get("/v1/stats").json()["totals"]["hit_rate"] == 1.0


@pytest.mark.parametrize(
    "shm", [True, False],
    ids=["shm-leases", "tcp"],
)  # fmt: skip
def test_a_get_of_an_absent_block_misses_each_tier_once(node: tuple[str, httpx.Client], shm: bool) -> None:
    data, http = node
    with Client(data, token=ENGINE_TOKEN, shm=shm) as c:
        hashes = c.block_hashes(SPEC, np.arange(SPEC.block_size))
        assert c.get_blocks(SPEC, hashes) == [None]
    assert reads(http) == {"ram": (0, 1), "disk": (0, 1), "object": (0, 1)}
    assert metric_reads(http) == {"ram": (0, 1), "disk": (0, 1), "object": (0, 1)}
    assert http.get("/v1/stats").json()["totals"]["hit_rate"] == 0.0


def test_config_shows_the_flags_and_the_disk_size_the_node_runs_with(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[server]\nserver_secret = "config-test-secret"\n')
    data_dir = tmp_path / "from-the-flag"
    proc, _, admin = start_serve(cfg, tmp_path, "--data-dir", str(data_dir), "--ram-bytes", str(48 << 20))
    try:
        shown = httpx.get(admin + "/v1/config", timeout=30).json()["config"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert shown["store"]["data_dir"] == str(data_dir)
    assert shown["store"]["ram_bytes"] == 48 << 20
    assert shown["store"]["disk_bytes"] == 64 << 30  # unset in the file: the disk tier's default size
    assert (shown["server"]["port"], shown["server"]["admin_port"]) == (0, 0)  # as given: --port 0 --admin-port 0
    assert (data_dir / "disk").is_dir()
