"""The tiered store over the real disk tier (segment files + RocksDB): restart, crash, write-back, full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvfabric.errors import UnknownModelError
from kvfabric.events import EventLog
from kvfabric.ids import Namespace, TierId
from kvfabric.store.config import WRITE_BACK, NamespacePolicy, StoreConfig
from kvfabric.store.disk import DiskTier
from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_block, make_chain
from tests.store.tiered_helpers import BLOCK, snapshot

REPO = Path(__file__).resolve().parents[2]


def open_store(data_dir: Path, ram_blocks: int = 64, **config: object) -> TieredStore:
    cfg = StoreConfig(data_dir=data_dir, ram_bytes=ram_blocks * BLOCK, disk_bytes=64 << 20, **config)  # type: ignore[arg-type]
    return TieredStore.open(cfg)


def test_open_builds_ram_and_disk_and_restart_keeps_everything(tmp_path: Path) -> None:
    store = open_store(tmp_path, ram_policy="prefix-cost")
    assert store.tiers == ["ram", "disk"]
    store.register_model(SPEC)
    chain = make_chain(5)
    store.put_many(chain)
    store.pin(chain[0].key)
    store.delete(chain[4].key)
    store.close()

    again = open_store(tmp_path)
    try:
        assert again.models() == [SPEC]
        assert again.pinned() == {chain[0].key}
        assert again.lookup([b.key for b in chain]) == ["disk", "disk", "disk", "disk", None]
        for b in chain[:4]:
            got = again.get(b.key)
            assert got is not None and bytes(got.payload) == b.payload
        assert again.lookup([chain[0].key]) == ["ram"]  # promoted by the read
        ns = again.namespace_stats()[Namespace("tenant-a")]
        assert (ns.blocks, ns.bytes) == (4, 4 * BLOCK)  # the catalog is rebuilt from disk
    finally:
        again.close()


def test_acknowledged_puts_survive_a_crash(tmp_path: Path) -> None:
    """A child process puts blocks with fsync=always and dies without closing anything; all of them come back."""
    child = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from kvfabric.store.config import StoreConfig
        from kvfabric.store.tiered import TieredStore
        from tests.blocks import SPEC, make_chain
        store = TieredStore.open(StoreConfig(data_dir=Path({str(tmp_path)!r}), ram_bytes=1 << 20,
                                             disk_bytes=64 << 20, fsync="always", shm_dir={str(tmp_path)!r}))
        store.register_model(SPEC)
        for block in make_chain(20, seed=3):
            store.put(block)
            print("acked", block.key.prefix.hex(), flush=True)
        os._exit(0)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    acked = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("acked")]
    assert len(acked) == 20
    store = open_store(tmp_path)
    try:
        chain = make_chain(20, seed=3)
        assert [b.key.prefix.hex() for b in chain] == acked
        for b in chain:
            got = store.get(b.key)
            assert got is not None and bytes(got.payload) == b.payload
    finally:
        store.close()


def test_write_back_disk_is_written_by_flush_and_by_demotion(tmp_path: Path) -> None:
    store = open_store(tmp_path, ram_blocks=4, write_policy={"disk": WRITE_BACK}, ram_high_watermark=1.0)
    store.register_model(SPEC)
    chain = make_chain(6)
    store.put_many(chain)
    assert store.lookup([b.key for b in chain]) == ["disk", "disk", "ram", "ram", "ram", "ram"]  # two demoted
    assert store.store_stats().demotions == 2
    assert store.store_stats().writeback_pending["disk"] == 4
    store.flush()
    assert store.store_stats().writeback_pending["disk"] == 0
    store.close()
    again = open_store(tmp_path, ram_blocks=4)
    try:
        assert again.lookup([b.key for b in chain]) == ["disk"] * 6
    finally:
        again.close()


def test_full_disk_evicts_its_oldest_blocks_and_compacts(tmp_path: Path) -> None:
    cfg = StoreConfig(data_dir=tmp_path, ram_bytes=4 * BLOCK)
    capacity = 24 * 8192  # each 4 KiB block takes 8 KiB on disk (header + payload, 4 KiB aligned)
    disk = DiskTier(tmp_path / "disk", capacity_bytes=capacity, segment_bytes=4 * 8192)
    store = TieredStore(cfg, MemoryTier(cfg.ram_bytes), [disk])
    store.register_model(SPEC)
    chain = make_chain(60)
    store.pin(chain[0].key)
    try:
        store.put_many(chain)  # far more than the disk holds
        assert store.store_stats().room_made >= 1
        assert disk.disk_usage() <= capacity
        assert store.get(chain[0].key) is not None  # pinned: never evicted
        for b in chain[-10:]:  # the newest are all there
            got = store.get(b.key)
            assert got is not None and bytes(got.payload) == b.payload
        assert store.lookup([chain[1].key]) == [None]  # the oldest went
        assert store.namespace_stats()[Namespace("tenant-a")].blocks == disk.stats().blocks
    finally:
        store.close()


def test_quota_usage_is_rebuilt_after_restart(tmp_path: Path) -> None:
    quota = {"tenant-a": NamespacePolicy(quota_bytes=4 * BLOCK)}
    store = open_store(tmp_path, namespaces=quota)
    store.register_model(SPEC)
    chain = make_chain(5)
    for b in chain[:3]:
        store.put(b)
        time.sleep(0.002)  # distinct created_ms: after a restart that is the only order the store knows
    store.close()
    again = open_store(tmp_path, namespaces=quota)
    try:
        again.put_many(chain[3:])  # 5 blocks > quota of 4: the oldest (chain[0]) goes
        assert again.lookup([b.key for b in chain]) == [None, "disk", "disk", "ram", "ram"]
        assert again.store_stats().quota_evictions == 1
    finally:
        again.close()


def test_bad_input_leaves_disk_untouched(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.register_model(SPEC)
    store.put_many(make_chain(3))
    tiers = {name: store.tier(TierId(name)) for name in ("ram", "disk")}
    before = snapshot(store, tiers)
    stranger = make_block(spec=SPEC.__class__(model="test/unregistered", num_layers=2, kv_heads=2, head_dim=16))
    with pytest.raises(UnknownModelError):
        store.put(stranger)
    assert snapshot(store, tiers) == before
    store.evict(TierId("ram"), 1 << 30)
    store.close()


def test_every_tier_reports_to_the_store_event_sink(tmp_path: Path) -> None:
    log = EventLog()
    cfg = StoreConfig(data_dir=tmp_path, ram_bytes=2 * BLOCK, disk_bytes=64 << 20, ram_high_watermark=1.0)
    store = TieredStore.open(cfg, events=log)
    store.register_model(SPEC)
    chain = make_chain(3)
    store.put_many(chain)  # the third evicts the first from RAM; disk keeps all three
    store.delete(chain[1].key)
    events = [(type(e).__name__, e.medium, e.hashes[0]) for e in log.take_events() if hasattr(e, "hashes")]
    h = [b.key.prefix for b in chain]
    assert events == [
        ("BlockStored", "disk", h[0]), ("BlockStored", "ram", h[0]),
        ("BlockStored", "disk", h[1]), ("BlockStored", "ram", h[1]),
        ("BlockStored", "disk", h[2]), ("BlockRemoved", "ram", h[0]), ("BlockStored", "ram", h[2]),
        ("BlockRemoved", "ram", h[1]), ("BlockRemoved", "disk", h[1]),
    ]  # fmt: skip
    store.close()
