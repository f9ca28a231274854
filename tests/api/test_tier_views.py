"""The admin surface over real lower tiers: a corrupt block on disk shows as a counter, a metric and a recent error;
an object tier on a real S3 server (SeaweedFS) shows in the tier view, the stats and the upload backlog."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kvfabric.api.app import create_app
from kvfabric.config import Settings
from kvfabric.record import Block
from kvfabric.store.tiered import TieredStore
from tests.api.conftest import TOKENS, bearer
from tests.blocks import SPEC, make_chain
from tests.s3server import SeaweedFS


def wait_for(cond: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def flip_payload_byte(data_dir: Path, block: Block) -> Path:
    """Flip one byte of ``block``'s payload wherever the disk tier stored it (found by content: the payload is
    random bytes, stored raw)."""
    needle = bytes(block.payload[:256])
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        at = data.find(needle)
        if at >= 0:
            with path.open("r+b") as f:
                f.seek(at + 100)
                f.write(bytes([data[at + 100] ^ 0xFF]))
            return path
    raise AssertionError("the block's payload is in no file under the data dir")


def test_a_corrupt_block_is_counted_logged_and_not_served(
    client: TestClient, store: TieredStore, settings: Settings, blocks: dict[str, list[Block]]
) -> None:
    victim = blocks["a"][3]
    r = client.post("/v1/evict", json={"tier": "ram", "bytes": "1GiB"}, headers=bearer("admin"))
    assert r.status_code == 200 and store.tier_stats()["ram"].blocks == 0  # reads must now come from disk
    assert settings.store.data_dir is not None
    flip_payload_byte(settings.store.data_dir, victim)

    assert store.get(victim.key) is None  # a miss, never bad KV
    tiers = {t["tier"]: t for t in client.get("/v1/stats", headers=bearer("ops-read")).json()["tiers"]}
    assert tiers["disk"]["corrupt"] == 1
    text = client.get("/metrics", headers=bearer("ops-read")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("kvfabric_tier_corrupt_blocks_total", (("tier", "disk"),))] == 1

    def logged() -> bool:
        errors = client.get("/v1/errors", headers=bearer("ops-read")).json()
        return any(e["kind"] == "corrupt_block" and "disk" in e["message"] for e in errors)

    wait_for(logged, "the sampler to log the corrupt block")
    others = [b for b in blocks["a"] if b is not victim]
    assert all(store.get(b.key) is not None for b in others)


@pytest.fixture
def object_settings(tmp_path: Path, s3_server: SeaweedFS) -> Settings:
    bucket = s3_server.create_bucket()
    ep = s3_server.endpoint
    return Settings(
        server={
            "server_secret": "test-server-secret",
            "auth": {"enabled": True, "tokens": [TOKENS["admin"], TOKENS["ops-read"]]},
            "stats_interval_s": 0.05,
        },
        store={"data_dir": str(tmp_path / "data"), "ram_bytes": "16MiB", "disk_bytes": "64MiB", "node_id": "obj"},
        object={
            "endpoint_url": ep.endpoint_url, "bucket": bucket, "prefix": "admin-test", "region": ep.region,
            "access_key_id": ep.access_key, "secret_access_key": ep.secret_key, "upload": "write-back",
            "segment_bytes": "1MiB", "backlog_bytes": "8MiB", "seal_after_s": 60,
        },
    )  # fmt: skip


@pytest.fixture
def object_store(object_settings: Settings) -> Iterator[TieredStore]:
    store = TieredStore.open(object_settings.store_config())
    try:
        yield store
    finally:
        store.close()


def test_object_tier_in_the_admin_views(object_store: TieredStore, object_settings: Settings) -> None:
    object_store.register_model(SPEC)
    chain = make_chain(6, namespace="tenant-a", seed=9)
    object_store.put_many(chain)
    with TestClient(create_app(object_store, object_settings)) as c:
        tiers = {t["tier"]: t for t in c.get("/v1/tiers", headers=bearer("admin")).json()["tiers"]}
        assert list(tiers) == ["ram", "disk", "object"]
        assert tiers["object"] == {
            "tier": "object", "capacity_bytes": tiers["object"]["capacity_bytes"], "persistent": True, "shared": True,
            "codec": "shuffle_zstd", "write_policy": "write-back", "recovery": None, "disk_state": None,
            "object_state": tiers["object"]["object_state"],
        }  # fmt: skip
        live = tiers["object"]["object_state"]  # write-back: nothing reached the object tier yet
        assert live["store_up"] is True and live["uploaded_blocks"] == live["pending_blocks"] == 0

        object_store.flush()  # write-back copies reach the object tier; its open segment is sealed and uploaded
        stats = c.get("/v1/stats", headers=bearer("admin")).json()
        obj = next(t for t in stats["tiers"] if t["tier"] == "object")
        assert obj["blocks"] == 6 and obj["puts"] >= 6
        assert stats["upload_backlog_bytes"] == object_store.upload_backlog_bytes() == 0
        assert stats["store"]["writeback_pending"] == {"disk": 0, "object": 0}

        text = c.get("/metrics", headers=bearer("ops-read")).text
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert "kvfabric_upload_backlog_bytes" in names
        assert "kvfabric_writeback_pending_blocks" in names
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples[("kvfabric_object_uploaded_blocks", (("tier", "object"),))] == 6
        assert samples[("kvfabric_object_pending_blocks", (("tier", "object"),))] == 0
        assert samples[("kvfabric_object_store_up", (("tier", "object"),))] == 1
        live = next(t for t in c.get("/v1/tiers", headers=bearer("admin")).json()["tiers"] if t["tier"] == "object")
        assert live["object_state"]["uploaded_blocks"] == 6 and live["object_state"]["backlog_items"] == 0
        assert live["object_state"]["uploads"] >= 2 and live["object_state"]["last_failure"] is None

        config = c.get("/v1/config", headers=bearer("admin")).text
        assert object_settings.object.secret_access_key is not None
        assert object_settings.object.secret_access_key.get_secret_value() not in config
