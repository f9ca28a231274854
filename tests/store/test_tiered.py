from __future__ import annotations

import mmap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvfabric.errors import QuotaExceededError, StoreError
from kvfabric.events import BlockStored, EventLog
from kvfabric.ids import Namespace, TierId
from kvfabric.record import Block, encode_record
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.config import WRITE_BACK, WRITE_THROUGH, NamespacePolicy, StoreConfig
from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_block, make_chain
from tests.store.tier_suite import same
from tests.store.tiered_helpers import BLOCK, Clock, build, where

WB_DISK = {"disk": WRITE_BACK}


def test_put_get_roundtrip_stamps_store_time() -> None:
    clock = Clock()
    store, _ = build(clock=clock)
    b = make_block()
    store.put(b)
    got = store.get(b.key)
    assert got is not None and bytes(got.payload) == b.payload
    assert got.meta.created_ms == int(clock.now * 1000)
    assert store.head(b.key) == (got.meta, "ram")
    out = np.zeros(BLOCK, dtype=np.uint8)
    assert store.get_into(b.key, memoryview(out)) == got.meta and out.tobytes() == b.payload
    assert store.get(make_block(seed=1).key) is None
    store.close()


def test_lookup_reports_the_nearest_tier_per_key() -> None:
    store, _ = build(4, ["disk"])
    chain = make_chain(6)
    store.put_many(chain)  # RAM keeps the last four; disk (write-through) has all six
    store.delete(chain[4].key)
    assert store.lookup([b.key for b in chain]) == ["disk", "disk", "ram", "ram", None, "ram"]
    store.close()


def test_write_through_is_on_disk_when_put_returns() -> None:
    store, tiers = build(lower=["disk"])
    b = make_block()
    store.put(b)
    assert where(tiers, b.key) == {"ram", "disk"}
    assert store.store_stats().writeback_pending == {"disk": 0}
    store.close()


def test_write_back_waits_for_flush() -> None:
    store, tiers = build(lower=["disk"], write_policy=WB_DISK)
    chain = make_chain(3)
    store.put_many(chain)
    assert all(where(tiers, b.key) == {"ram"} for b in chain)
    assert store.store_stats().writeback_pending == {"disk": 3}
    store.flush()
    assert all(where(tiers, b.key) == {"ram", "disk"} for b in chain)
    assert same(tiers["disk"].get(chain[1].key), store.get(chain[1].key))  # type: ignore[arg-type]
    assert store.store_stats().writeback_pending == {"disk": 0}
    store.close()


def test_close_flushes_write_back() -> None:
    log = EventLog()
    cfg = StoreConfig(ram_bytes=64 * BLOCK, write_policy=WB_DISK)
    disk = MemoryTier(64 * BLOCK, tier_id=TierId("disk"), shm_dir=None, events=log)
    store = TieredStore(cfg, MemoryTier(cfg.ram_bytes), [disk])
    store.register_model(SPEC)
    chain = make_chain(3)
    store.put_many(chain)
    assert log.events == []
    store.close()
    stored = [e.hashes[0] for e in log.events if isinstance(e, BlockStored)]
    assert stored == [b.key.prefix for b in chain]


def test_background_flusher_drains_write_back() -> None:
    store, tiers = build(lower=["disk"], write_policy=WB_DISK, flush_interval_s=0.01)
    store.start()
    chain = make_chain(5)
    store.put_many(chain)
    deadline = time.monotonic() + 30
    while store.store_stats().writeback_pending["disk"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(tiers["disk"].contains(b.key) for b in chain)
    store.close()


def test_demotion_on_eviction_writes_dirty_blocks_down() -> None:
    store, tiers = build(4, ["disk"], write_policy=WB_DISK)
    chain = make_chain(6)
    store.put_many(chain)
    assert [where(tiers, b.key) for b in chain] == [{"disk"}] * 2 + [{"ram"}] * 4
    assert store.store_stats().demotions == 2
    assert store.store_stats().writeback_pending == {"disk": 4}
    for b in chain:
        got = store.get(b.key)
        assert got is not None and bytes(got.payload) == b.payload
    store.close()


def test_clean_blocks_are_dropped_from_ram_without_writing() -> None:
    store, tiers = build(2, ["disk"])
    chain = make_chain(4)
    store.put_many(chain)
    assert store.store_stats().demotions == 0
    assert tiers["disk"].stats().puts == 4  # once each, at put time
    assert store.lookup([b.key for b in chain]) == ["disk", "disk", "ram", "ram"]
    store.close()


def test_promotion_on_hit() -> None:
    store, _ = build(lower=["disk"])
    b = make_block()
    store.put(b)
    store.evict(TierId("ram"), 1 << 30)
    assert store.lookup([b.key]) == ["disk"]
    got = store.get(b.key)
    assert got is not None and bytes(got.payload) == b.payload
    assert store.lookup([b.key]) == ["ram"]
    assert store.store_stats().promotions == 1
    store.close()


def test_promotion_from_object_fills_disk_too() -> None:
    store, tiers = build(lower=["disk", "object"], write_policy={"disk": WRITE_THROUGH, "object": WRITE_THROUGH})
    b = make_block()
    store.put(b)
    store.evict(TierId("ram"), 1 << 30)
    assert store.evict(TierId("disk"), 1) == BLOCK
    assert where(tiers, b.key) == {"object"}
    assert store.namespace_stats()[Namespace("tenant-a")].blocks == 1  # still stored, in the object tier
    assert store.get(b.key) is not None
    assert where(tiers, b.key) == {"ram", "disk", "object"}
    store.close()


def test_promotion_respects_the_ram_admission_policy() -> None:
    store, tiers = build(4, ["disk"], ram_policy="prefix-cost")
    cold = make_block(seed=9)
    store.put(cold)
    chain = make_chain(4)
    store.put_many(chain)  # the fourth evicts cold, the cheapest block
    for b in chain:
        store.get(b.key)  # every resident block now has a hit
    assert where(tiers, cold.key) == {"disk"}
    assert store.get(cold.key) is not None  # served from disk...
    assert store.store_stats().promotions_refused == 1
    assert where(tiers, cold.key) == {"disk"}  # ...but not worth displacing a block that was read
    store.close()


def test_object_write_back_below_write_through_disk_is_fed_from_disk() -> None:
    store, tiers = build(2, ["disk", "object"])  # the defaults: disk write-through, object write-back
    chain = make_chain(4)
    store.put_many(chain)
    assert store.store_stats().writeback_pending == {"disk": 0, "object": 4}
    assert [where(tiers, b.key) for b in chain] == [{"disk"}] * 2 + [{"ram", "disk"}] * 2
    store.flush()
    assert all("object" in where(tiers, b.key) for b in chain)
    assert store.store_stats().demotions == 0
    store.close()


def test_evicting_from_disk_first_copies_what_object_still_waits_for() -> None:
    store, tiers = build(2, ["disk", "object"])
    b = make_block()
    store.put(b)
    store.evict(TierId("disk"), BLOCK)
    assert where(tiers, b.key) == {"ram", "object"}
    assert store.store_stats().writeback_pending["object"] == 0
    store.close()


def test_watermarks_evict_down_to_low() -> None:
    store, tiers = build(10, ["disk"], ram_high_watermark=0.8, ram_low_watermark=0.5)
    chain = make_chain(9)
    store.put_many(chain[:8])
    assert tiers["ram"].stats().blocks == 8  # at the high watermark, not above
    store.put(chain[8])
    assert tiers["ram"].stats().blocks == 5
    assert all(store.get(b.key) is not None for b in chain)
    store.close()


def test_ram_full_of_pins_sends_puts_to_disk() -> None:
    store, tiers = build(2, ["disk"], write_policy=WB_DISK)
    chain = make_chain(3)
    store.put_many(chain[:2])
    for b in chain[:2]:
        store.pin(b.key)
    store.put(chain[2])
    assert where(tiers, chain[2].key) == {"disk"}
    assert store.get(chain[2].key) is not None
    store.close()


def test_ram_only_store_full_of_pins_refuses() -> None:
    store, _ = build(2)
    chain = make_chain(3)
    store.put_many(chain[:2])
    for b in chain[:2]:
        store.pin(b.key)
    with pytest.raises(StoreError):
        store.put(chain[2])
    assert store.namespace_stats()[Namespace("tenant-a")].blocks == 2
    store.close()


def test_pins_hold_in_every_tier_and_survive_restart(tmp_path: Path) -> None:
    store, tiers = build(4, ["disk"], data_dir=tmp_path)
    chain = make_chain(3)
    store.put_many(chain)
    assert store.pin(chain[0].key) is True
    assert store.pin(make_block(seed=5).key) is False  # recorded before the block exists
    store.evict(TierId("ram"), 1 << 30)
    store.evict(TierId("disk"), 1 << 30)
    assert where(tiers, chain[0].key) == {"ram", "disk"}
    assert store.lookup([b.key for b in chain]) == ["ram", None, None]
    store.close()
    again, _ = build(4, ["disk"], data_dir=tmp_path)
    assert again.pinned() == {chain[0].key, make_block(seed=5).key}
    assert again.unpin(chain[0].key) is True
    assert again.unpin(chain[0].key) is False
    again.close()


def test_ttl_expiry_lazy_and_swept() -> None:
    clock = Clock()
    ns = {"tenant-a": NamespacePolicy(ttl_s=10)}
    store, tiers = build(lower=["disk"], clock=clock, namespaces=ns)
    chain = make_chain(4)
    other = make_block(namespace="tenant-b", seed=3)
    store.put_many(chain + [other])
    store.pin(chain[3].key)
    clock.advance(5)
    store.put(chain[2])  # rewritten: its TTL starts again
    clock.advance(6)
    assert store.get(chain[0].key) is None  # expired: a miss, and gone from every tier
    assert where(tiers, chain[0].key) == set()
    assert store.lookup([chain[1].key]) == [None]
    assert store.expire() == 0  # the lazy reads already removed both
    assert store.get(chain[2].key) is not None and store.get(chain[3].key) is not None  # fresh / pinned
    assert store.get(other.key) is not None  # no TTL in tenant-b
    clock.advance(10)
    assert store.expire() == 1  # chain[2]; chain[3] is pinned
    assert store.keys(Namespace("tenant-a")) == [chain[3].key]
    assert store.store_stats().expired == 3
    store.close()


def test_default_namespace_policy_applies_to_unnamed_namespaces() -> None:
    clock = Clock()
    store, _ = build(clock=clock, namespaces={"*": NamespacePolicy(ttl_s=1), "keep": NamespacePolicy()})
    a, b = make_block(namespace="anyone"), make_block(namespace="keep")
    store.put_many([a, b])
    clock.advance(2)
    assert store.get(a.key) is None and store.get(b.key) is not None
    store.close()


def test_quota_evicts_the_namespace_lru_blocks() -> None:
    ns = {"tenant-a": NamespacePolicy(quota_bytes=3 * BLOCK)}
    store, tiers = build(lower=["disk"], namespaces=ns)
    chain = make_chain(5)
    others = make_chain(4, namespace="tenant-b", seed=2)
    store.put_many(others)
    store.put_many(chain[:3])
    store.get(chain[0].key)  # chain[1] is now the least recently used
    store.put(chain[3])
    assert [store.contains(b.key) for b in chain[:4]] == [True, False, True, True]
    assert where(tiers, chain[1].key) == set()  # a quota eviction removes the block from the store
    stats = store.namespace_stats()
    assert stats[Namespace("tenant-a")].bytes == 3 * BLOCK
    assert stats[Namespace("tenant-b")].blocks == 4  # other tenants untouched
    assert store.store_stats().quota_evictions == 1
    store.put(chain[3])  # rewriting a stored block needs no room
    assert store.store_stats().quota_evictions == 1
    store.close()


def test_quota_exceeded_when_nothing_can_be_evicted() -> None:
    ns = {"tenant-a": NamespacePolicy(quota_bytes=2 * BLOCK)}
    store, _ = build(lower=["disk"], namespaces=ns)
    chain = make_chain(3)
    store.put_many(chain[:2])
    for b in chain[:2]:
        store.pin(b.key)
    with pytest.raises(QuotaExceededError) as info:
        store.put(chain[2])
    assert info.value.namespace == "tenant-a" and info.value.quota == 2 * BLOCK
    assert not store.contains(chain[2].key)
    with pytest.raises(QuotaExceededError):
        store.put_many(make_chain(3, seed=4))  # bigger than the quota on its own
    assert store.namespace_stats()[Namespace("tenant-a")].blocks == 2
    store.close()


def test_namespace_stats_per_model_and_deletes() -> None:
    other_spec = ModelSpec(model="test/other", num_layers=2, kv_heads=2, head_dim=16, dtype=DType.FLOAT16)
    store, tiers = build(4, ["disk"])
    store.register_model(other_spec)
    a = make_chain(3)
    b = make_chain(2, spec=other_spec, seed=1)
    c = make_chain(2, namespace="tenant-b", seed=2)
    store.put_many(a + b + c)
    stats = store.namespace_stats()
    ns_a = stats[Namespace("tenant-a")]
    assert (ns_a.blocks, ns_a.bytes) == (5, 5 * BLOCK)
    assert ns_a.models[SPEC.fingerprint()].blocks == 3
    assert ns_a.models[other_spec.fingerprint()].bytes == 2 * other_spec.block_nbytes
    assert store.delete_model(Namespace("tenant-a"), other_spec.fingerprint()) == 2
    assert all(where(tiers, x.key) == set() for x in b)
    assert store.delete_namespace(Namespace("tenant-a")) == 3
    assert list(store.namespace_stats()) == [Namespace("tenant-b")]
    assert store.delete(c[0].key) is True and store.delete(c[0].key) is False
    store.close()


def test_acquire_promotes_and_leases_in_the_shm_arena() -> None:
    store, _ = build(2, ["disk"])
    chain = make_chain(3)
    store.put_many(chain)
    assert store.lookup([chain[0].key]) == ["disk"]
    lease = store.acquire(chain[0].key)
    assert lease is not None
    assert store.lookup([chain[0].key]) == ["ram"]
    store.put(make_block(seed=8))
    store.evict(TierId("ram"), 1 << 30)
    assert store.lookup([chain[0].key]) == ["ram"]  # leased: not evicted
    assert store.arena_path is not None
    with open(store.arena_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[lease.offset : lease.offset + lease.nbytes] == chain[0].payload
    with store.lease_view(lease) as view:
        assert bytes(view) == chain[0].payload
    assert store.release(lease)
    assert store.acquire(make_block(seed=77).key) is None
    store.close()


def test_acquire_without_promotion_leases_only_what_ram_holds() -> None:
    store, tiers = build(4, ["disk"])
    below, above = make_chain(2)
    store.put_many([below, above])
    tiers["ram"].delete(below.key)
    assert store.acquire(below.key, promote=False) is None
    assert where(tiers, below.key) == {"disk"}  # not read, not promoted
    lease = store.acquire(above.key, promote=False)
    assert lease is not None and lease.meta.key == above.key
    assert store.release(lease)
    assert store.acquire(below.key) is not None  # the default still promotes
    assert where(tiers, below.key) == {"ram", "disk"}
    store.close()


def test_registered_models_survive_restart(tmp_path: Path) -> None:
    store, _ = build(data_dir=tmp_path)
    assert store.models() == [SPEC]
    store.close()
    assert (tmp_path / "models.json").exists()
    again, _ = build(data_dir=tmp_path, register=False)
    assert again.model(SPEC.fingerprint()) == SPEC
    again.put(make_block())  # accepted without registering again
    again.close()


def test_put_record_roundtrip() -> None:
    store, _ = build()
    b = make_block()
    header, payload = encode_record(b)
    assert store.put_record(header + bytes(payload)) == b.key
    assert bytes(store.get(b.key).payload) == b.payload  # type: ignore[union-attr]
    store.close()


def test_open_ram_only_and_close_unlinks_the_arena() -> None:
    store = TieredStore.open(StoreConfig(ram_bytes=1 << 20))
    assert store.tiers == ["ram"]
    path = store.arena_path
    assert path is not None and Path(path).exists()
    store.close()
    assert not Path(path).exists()
    store.close()  # idempotent
    with pytest.raises(StoreError):
        store.get(make_block().key)


def test_threads_share_a_store_safely() -> None:
    store, _ = build(16, ["disk"], write_policy=WB_DISK, flush_interval_s=0.005,
                         ram_high_watermark=0.9, ram_low_watermark=0.6)  # fmt: skip
    store.start()
    chains = [make_chain(12, seed=100 + i) for i in range(4)]
    errors: list[BaseException] = []

    def worker(chain: list[Block]) -> None:
        try:
            for round_ in range(3):
                for b in chain:
                    store.put(b)
                    got = store.get(chain[0].key)
                    assert got is None or bytes(got.payload) == chain[0].payload
                    lease = store.acquire(b.key)
                    if lease is not None:
                        with store.lease_view(lease) as view:
                            assert bytes(view) == b.payload
                        store.release(lease)
                if round_ == 1:
                    store.delete_many([b.key for b in chain[::3]])
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.flush()
    for chain in chains:
        for b in chain:
            got = store.get(b.key)
            assert got is not None and bytes(got.payload) == b.payload
    assert store.namespace_stats()[Namespace("tenant-a")].blocks == 48
    store.close()


def test_namespace_policy_changes_at_runtime() -> None:
    clock = Clock()
    store, _ = build(clock=clock)
    a = make_block()
    store.put(a)
    clock.advance(60)
    assert store.get(a.key) is not None  # no TTL yet
    store.set_namespace_policy(Namespace("tenant-a"), NamespacePolicy(ttl_s=30))
    assert store.get(a.key) is None
    store.set_namespace_policy(Namespace("tenant-a"), NamespacePolicy(quota_bytes=BLOCK))
    b, c = make_chain(2, seed=3)
    store.put(b)
    store.put(c)  # the quota now holds one block: b goes
    assert store.keys(Namespace("tenant-a")) == [c.key]
    store.set_namespace_policy(Namespace("tenant-a"), None)
    store.put_many(make_chain(3, seed=4))
    assert store.namespace_stats()[Namespace("tenant-a")].blocks == 4  # back to unlimited
    assert store.tier_capabilities()[TierId("ram")].evicts
    assert store.upload_backlog_bytes() == 0
    store.close()
