"""Hits and misses per tier count client reads, once per tier asked; the store's own reads count as nothing.

Real stores: RAM + disk (RocksDB, segment files) and RAM + disk + S3 (SeaweedFS). Where the store reads for itself,
the test also checks that the tier's own counters saw the read, so a store that skipped it could not pass by luck.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvfabric.ids import TierId
from kvfabric.store.config import NamespacePolicy, StoreConfig
from kvfabric.record import Block
from kvfabric.store.memory import Lease
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_chain
from tests.s3server import SeaweedFS
from tests.store.test_tiered_object import s3_config
from tests.store.tiered_helpers import BLOCK, Clock, build

RAM, DISK, OBJECT = TierId("ram"), TierId("disk"), TierId("object")


def reads(store: TieredStore) -> dict[str, tuple[int, int]]:
    """``{tier: (hits, misses)}`` as the admin API and /metrics report them."""
    return {str(t): (s.hits, s.misses) for t, s in store.tier_stats().items()}


def open_disk_store(path: Path, **config: object) -> TieredStore:
    config = {"ram_bytes": 64 * BLOCK, "disk_bytes": 64 << 20, **config}
    store = TieredStore.open(StoreConfig(data_dir=path, **config))  # type: ignore[arg-type]
    store.register_model(SPEC)
    return store


def test_a_get_of_an_absent_block_misses_each_tier_once(tmp_path: Path) -> None:
    with open_disk_store(tmp_path) as store:
        (block,) = make_chain(1)
        assert store.get(block.key) is None
        assert reads(store) == {"ram": (0, 1), "disk": (0, 1)}
        assert store.get_into(block.key, memoryview(bytearray(BLOCK))) is None
        assert reads(store) == {"ram": (0, 2), "disk": (0, 2)}


def test_a_put_without_gets_counts_no_reads_though_write_back_reads_for_itself(tmp_path: Path) -> None:
    """Write-back disk: the flush copies the block down from RAM; no client read happened, so no hit."""
    with open_disk_store(tmp_path, write_policy={"disk": "write-back"}) as store:
        store.put_many(make_chain(4))
        store.flush()
        assert store.tier(DISK).stats().puts == 4  # the write-back did reach the disk
        assert reads(store) == {"ram": (0, 0), "disk": (0, 0)}


def test_a_hit_below_counts_a_ram_miss_and_one_hit_where_it_was_found(tmp_path: Path) -> None:
    with open_disk_store(tmp_path) as store:
        chain = make_chain(3)
        store.put_many(chain)
        assert store.evict(RAM, 3 * BLOCK) >= 3 * BLOCK
        got = store.get(chain[0].key)
        assert got is not None and bytes(got.payload) == chain[0].payload
        assert reads(store) == {"ram": (0, 1), "disk": (1, 0)}
        assert store.get(chain[0].key) is not None  # promoted: RAM serves it now
        assert reads(store) == {"ram": (1, 1), "disk": (1, 0)}
        out = np.empty(BLOCK, dtype=np.uint8)
        assert store.get_into(chain[1].key, memoryview(out)) is not None
        assert out.tobytes() == chain[1].payload
        assert reads(store) == {"ram": (1, 2), "disk": (2, 0)}


def test_leases_count_once_and_an_in_ram_probe_leaves_the_count_to_the_read_that_follows(tmp_path: Path) -> None:
    """The transport server probes RAM on its event loop (``promote=False``) and asks again from a thread."""
    with open_disk_store(tmp_path) as store:
        chain = make_chain(2)
        store.put_many(chain)
        store.evict(RAM, 2 * BLOCK)
        assert store.acquire(chain[0].key, promote=False) is None
        assert reads(store) == {"ram": (0, 0), "disk": (0, 0)}
        lease = store.acquire(chain[0].key)
        assert lease is not None
        store.release(lease)
        assert reads(store) == {"ram": (0, 1), "disk": (1, 0)}
        lease = store.acquire(chain[0].key, promote=False)  # now in RAM: a hit where it is found
        assert lease is not None
        store.release(lease)
        assert reads(store) == {"ram": (1, 1), "disk": (1, 0)}
        (absent,) = make_chain(1, seed=99)
        assert store.acquire(absent.key) is None
        assert reads(store) == {"ram": (1, 2), "disk": (1, 1)}


def test_acquire_or_get_hands_a_copy_when_ram_has_no_room_and_counts_the_read_once(tmp_path: Path) -> None:
    with open_disk_store(tmp_path, ram_bytes=2 * BLOCK, ram_high_watermark=1.0, ram_low_watermark=1.0) as store:
        chain = make_chain(3)
        store.put_many(chain[:2])
        held = [store.acquire(b.key) for b in chain[:2]]  # RAM is all leased now
        assert all(lease is not None for lease in held)
        store.put(chain[2])  # goes to disk only
        assert store.lookup([chain[2].key]) == [DISK]
        got = store.acquire_or_get(chain[2].key)
        assert isinstance(got, Block) and bytes(got.payload) == chain[2].payload
        assert reads(store) == {"ram": (2, 1), "disk": (1, 0)}
        (absent,) = make_chain(1, seed=5)
        assert store.acquire_or_get(absent.key) is None
        assert reads(store) == {"ram": (2, 2), "disk": (1, 1)}
        for lease in held:
            store.release(lease)  # type: ignore[arg-type]
        lease = store.acquire_or_get(chain[2].key)  # room again: promoted and leased
        assert isinstance(lease, Lease) and bytes(store.lease_view(lease)) == chain[2].payload
        store.release(lease)
        assert reads(store) == {"ram": (2, 3), "disk": (2, 1)}


def test_a_ram_only_probe_is_the_whole_read_and_counts(tmp_path: Path) -> None:
    with TieredStore.open(StoreConfig(ram_bytes=16 * BLOCK)) as store:
        store.register_model(SPEC)
        (block,) = make_chain(1)
        assert store.acquire(block.key, promote=False) is None
        store.put(block)
        lease = store.acquire(block.key, promote=False)
        assert lease is not None
        store.release(lease)
        assert reads(store) == {"ram": (1, 1)}


def test_internal_reads_count_nothing_promotion_demotion_compaction_lookup(tmp_path: Path) -> None:
    with open_disk_store(tmp_path, write_policy={"disk": "write-back"}) as store:
        chain = make_chain(8)
        store.put_many(chain)
        store.evict(RAM, 8 * BLOCK)  # demotion writes the dirty blocks down
        store.delete_many(b.key for b in chain[:6])
        store.compact()  # rewrites the disk's live records
        assert store.lookup([b.key for b in chain]) == [None] * 6 + [DISK] * 2
        assert store.contains(chain[7].key)
        assert reads(store) == {"ram": (0, 0), "disk": (0, 0)}


def test_an_expired_block_is_a_miss_where_it_was_found() -> None:
    clock = Clock()
    store, _ = build(16, clock=clock, namespaces={"tenant-a": NamespacePolicy(ttl_s=10)})
    with store:
        (block,) = make_chain(1)
        store.put(block)
        clock.advance(11)
        assert store.get(block.key) is None
        assert reads(store) == {"ram": (0, 1)}


def test_with_s3_uploads_count_nothing_and_a_block_only_in_s3_is_one_hit_there(
    s3_server: SeaweedFS, tmp_path: Path
) -> None:
    obj = s3_config(s3_server, s3_server.create_bucket())
    with open_disk_store(tmp_path, object=obj) as store:
        chain = make_chain(4)
        store.put_many(chain)
        store.flush()  # the object tier is write-back: the flush reads each block from disk to upload it
        assert store.tier(DISK).stats().hits >= 4  # the disk tier did serve those reads ...
        assert reads(store) == {"ram": (0, 0), "disk": (0, 0), "object": (0, 0)}  # ... for no client
        assert store.tier(OBJECT).stats().puts == 4

        store.evict(RAM, 4 * BLOCK)
        store.evict(DISK, 4 * BLOCK)
        assert store.lookup([chain[0].key]) == [OBJECT]
        got = store.get(chain[0].key)
        assert got is not None and bytes(got.payload) == chain[0].payload
        assert reads(store) == {"ram": (0, 1), "disk": (0, 1), "object": (1, 0)}
        assert store.get(chain[0].key) is not None  # promoted into RAM (and disk) by that read
        assert reads(store) == {"ram": (1, 1), "disk": (0, 1), "object": (1, 0)}

        (absent,) = make_chain(1, seed=7)
        assert store.get(absent.key) is None
        assert reads(store) == {"ram": (1, 2), "disk": (0, 2), "object": (1, 1)}
