"""The tiered store with the real object tier on a real S3 server (SeaweedFS): losing a node's disk loses nothing,
write-back drains in the background, an unreachable store degrades instead of failing puts."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvfabric.errors import TierUnavailableError
from kvfabric.ids import Namespace, TierId
from kvfabric.store.config import StoreConfig
from kvfabric.store.disk import DiskTier
from kvfabric.store.memory import MemoryTier
from kvfabric.store.object import ObjectTier, ObjectTierConfig
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_chain
from tests.s3server import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.store.object_helpers import object_config
from tests.store.tiered_helpers import BLOCK


def s3_config(server: SeaweedFS, bucket: str, **overrides: Any) -> ObjectTierConfig:
    """Credentials in the config itself: ``TieredStore.open`` builds the tier from config alone."""
    overrides = {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, "segment_bytes": 1 << 20,
                 "backlog_bytes": 16 << 20, **overrides}  # fmt: skip
    return object_config(server, bucket, **overrides)


def wait_until(predicate: Callable[[], bool], what: str, deadline_s: float = 120.0) -> None:
    """Poll for an outcome (not a timing assertion: the deadline only stops a hung test)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_losing_the_disk_loses_nothing(s3_server: SeaweedFS, tmp_path: Path) -> None:
    obj = s3_config(s3_server, s3_server.create_bucket())
    store = TieredStore.open(
        StoreConfig(data_dir=tmp_path / "a", ram_bytes=64 * BLOCK, disk_bytes=64 << 20, object=obj)
    )
    assert store.tiers == ["ram", "disk", "object"]
    store.register_model(SPEC)
    chain = make_chain(8)
    store.put_many(chain)
    assert store.store_stats().writeback_pending["object"] == 8  # object is write-back by default
    store.flush()
    assert store.store_stats().writeback_pending["object"] == 0
    store.close()
    shutil.rmtree(tmp_path / "a")  # the node's NVMe is gone

    other = TieredStore.open(StoreConfig(data_dir=tmp_path / "b", ram_bytes=64 * BLOCK, object=obj))
    try:
        other.register_model(SPEC)  # the model registry is per node; engines register on connect
        assert other.namespace_stats()[Namespace("tenant-a")].blocks == 8  # counted from the manifests
        assert other.lookup([b.key for b in chain]) == ["object"] * 8
        for b in chain:
            got = other.get(b.key)
            assert got is not None and bytes(got.payload) == b.payload
        assert other.lookup([b.key for b in chain]) == ["ram"] * 8
        assert all(other.head(b.key) is not None for b in chain)
        assert other.tier_stats()[TierId("disk")].blocks == 8  # promotion also filled the new disk
    finally:
        other.close()


def test_background_flusher_uploads_write_back_blocks(s3_server: SeaweedFS, tmp_path: Path) -> None:
    obj = s3_config(s3_server, s3_server.create_bucket(), seal_after_s=0.1)
    store = TieredStore.open(
        StoreConfig(data_dir=tmp_path, ram_bytes=64 * BLOCK, disk_bytes=64 << 20, object=obj, flush_interval_s=0.02)
    )
    store.register_model(SPEC)
    store.start()  # also starts the object tier's uploader
    chain = make_chain(6, seed=4)
    store.put_many(chain)
    object_tier = store.tier(TierId("object"))
    assert isinstance(object_tier, ObjectTier)
    wait_until(lambda: store.store_stats().writeback_pending["object"] == 0, "the store's backlog to drain")
    wait_until(lambda: object_tier.object_stats().backlog_bytes == 0, "the object tier to upload")
    assert object_tier.object_stats().uploads >= 2  # a segment and its manifest
    store.close()


def test_ram_and_object_only_demotes_evicted_blocks_to_s3(s3_server: SeaweedFS) -> None:
    obj = s3_config(s3_server, s3_server.create_bucket())
    store = TieredStore.open(StoreConfig(ram_bytes=4 * BLOCK, object=obj, ram_high_watermark=1.0))
    assert store.tiers == ["ram", "object"]
    store.register_model(SPEC)
    chain = make_chain(6, seed=5)
    store.put_many(chain)
    assert store.store_stats().demotions == 2  # RAM was the only copy of the evicted two: written down at once
    store.close()  # flushes the other four
    again = TieredStore.open(StoreConfig(ram_bytes=4 * BLOCK, object=obj))
    try:
        again.register_model(SPEC)
        for b in chain:
            got = again.get(b.key)
            assert got is not None and bytes(got.payload) == b.payload
    finally:
        again.close()


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connections are refused


def test_unreachable_object_store(s3_server: SeaweedFS, tmp_path: Path) -> None:
    obj = s3_config(s3_server, "never-created", endpoint_url=dead_endpoint())
    with pytest.raises(TierUnavailableError):
        TieredStore.open(StoreConfig(data_dir=tmp_path / "a", ram_bytes=16 * BLOCK, object=obj))

    # A node already running when S3 goes away: puts and reads carry on from RAM and disk; flush says what is stuck.
    cfg = StoreConfig(data_dir=tmp_path / "b", ram_bytes=16 * BLOCK, object=obj)
    disk = DiskTier(tmp_path / "b" / "disk")
    store = TieredStore(cfg, MemoryTier(cfg.ram_bytes), [disk, ObjectTier(obj)])
    store.register_model(SPEC)
    chain = make_chain(4, seed=6)
    store.put_many(chain)
    assert all(store.get(b.key) is not None for b in chain)
    with pytest.raises(TierUnavailableError):
        store.flush()
    assert store.store_stats().flush_errors >= 1
    with pytest.raises(TierUnavailableError):
        store.close()  # the tiers are closed all the same; the disk kept every block
    again = TieredStore.open(StoreConfig(data_dir=tmp_path / "b", ram_bytes=16 * BLOCK))
    try:
        assert again.lookup([b.key for b in chain]) == ["disk"] * 4
    finally:
        again.close()
