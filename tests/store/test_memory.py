from __future__ import annotations

import mmap
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric.errors import StoreError, TierFullError
from kvfabric.events import AllCleared, BlockRemoved, BlockStored, EventLog
from kvfabric.ids import TierId
from kvfabric.record import Block
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.arena import Arena
from kvfabric.store.memory import MemoryTier
from kvfabric.store.policy import LRUPolicy, PrefixCostPolicy
from tests.blocks import SPEC, make_block, make_chain
from tests.store.tier_suite import TierSuite, same

BLOCK = SPEC.block_nbytes  # 4 KiB: a multiple of the arena alignment, so each block takes exactly BLOCK bytes


class TestMemoryTier(TierSuite):
    @pytest.fixture
    def tier(self) -> Iterator[MemoryTier]:
        t = MemoryTier(16 << 20)
        yield t
        t.close()


@pytest.fixture
def small() -> Iterator[MemoryTier]:
    """Room for exactly four test blocks."""
    t = MemoryTier(4 * BLOCK, events=EventLog())
    yield t
    t.close()


# --- arena ---------------------------------------------------------------------------------------------------------


def test_arena_shm_file_is_private_and_unlinked_on_close() -> None:
    arena = Arena(1 << 20)
    path = arena.path
    assert path is not None and path.startswith("/dev/shm/")
    st_ = os.stat(path)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_size == arena.size
    other = Arena(1 << 20)
    assert other.path != path
    arena.close()
    other.close()
    assert not os.path.exists(path)
    arena.close()  # idempotent


def test_arena_of_a_dead_process_is_swept_and_a_live_one_is_not(tmp_path: Path) -> None:
    child = (
        "import os, sys\n"
        "from kvfabric.store.arena import Arena\n"
        f"a = Arena(1 << 20, shm_dir={str(tmp_path)!r})\n"
        "print(a.path, flush=True)\n"
        "os._exit(0)\n"  # dies holding its arena: no close, no unlink
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
    stale = Path(out.stdout.strip())
    live = Arena(1 << 16, shm_dir=tmp_path)
    assert not stale.exists()  # the new arena removed what nobody holds any more
    assert live.path is not None and os.path.exists(live.path)
    again = Arena(1 << 16, shm_dir=tmp_path)
    assert os.path.exists(live.path)  # locked by a live arena: left alone
    assert sorted(os.listdir(tmp_path)) == sorted([Path(live.path).name, Path(again.path).name])  # type: ignore[arg-type]
    live.close()
    again.close()
    assert os.listdir(tmp_path) == []


def test_arena_anonymous() -> None:
    arena = Arena(1 << 16, shm_dir=None)
    assert arena.path is None
    off = arena.alloc(100)
    assert off is not None
    with arena.view(off, 3) as v:
        v[:] = b"abc"
    with arena.view(off, 3) as v:
        assert bytes(v) == b"abc"
    arena.close()


def test_arena_alignment_reuse_and_coalescing() -> None:
    arena = Arena(1 << 16, shm_dir=None, alignment=64)
    a, b, c = arena.alloc(1), arena.alloc(100), arena.alloc(64)
    assert (a, b, c) == (0, 64, 192)
    assert arena.used_bytes == 64 + 128 + 64
    arena.free(b)
    assert arena.alloc(128) == 64  # best fit reuses the hole
    arena.free(64)
    arena.free(a)
    arena.free(c)
    assert arena.used_bytes == 0
    assert arena.largest_free == arena.size  # everything merged back into one extent
    with pytest.raises(ValueError):
        arena.free(a)
    assert arena.alloc(arena.size + 1) is None
    arena.close()


def test_arena_view_outlives_close() -> None:
    arena = Arena(1 << 16)
    off = arena.alloc(10)
    assert off is not None
    view = arena.view(off, 10)
    arena.close()  # the file is unlinked; the held view keeps the mapping alive
    view[0] = 7
    assert view[0] == 7
    view.release()
    with pytest.raises(StoreError):
        arena.alloc(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=80))
def test_arena_extents_never_overlap_and_all_merge_back(ops: list[tuple[bool, int]]) -> None:
    arena = Arena(1 << 16, shm_dir=None, alignment=64)
    live: dict[int, int] = {}
    for is_alloc, n in ops:
        if is_alloc or not live:
            off = arena.alloc(n)
            if off is None:
                assert arena.largest_free < arena.extent_size(n)
                continue
            assert off % 64 == 0 and off + n <= arena.size
            for o, m in live.items():
                assert off + arena.extent_size(n) <= o or o + arena.extent_size(m) <= off
            live[off] = n
        else:
            off = sorted(live)[n % len(live)]
            arena.free(off)
            del live[off]
        assert arena.used_bytes == sum(arena.extent_size(m) for m in live.values())
    for off in list(live):
        arena.free(off)
    assert arena.largest_free == arena.size
    arena.close()


# --- eviction ------------------------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used(small: MemoryTier) -> None:
    chain = make_chain(5)
    small.put_many(chain[:4])
    assert small.get(chain[0].key) is not None  # 0 is now the most recent; 1 the least
    small.put(chain[4])
    assert [small.contains(b.key) for b in chain] == [True, False, True, True, True]
    assert small.stats().evictions == 1
    assert small.used_bytes <= small.capacity_bytes


def test_eviction_emits_removed_and_calls_on_evict(small: MemoryTier) -> None:
    evicted: list[tuple[Block, frozenset[TierId]]] = []
    small.on_evict = lambda block, dirty: evicted.append((block, dirty))
    chain = make_chain(5)
    small.put(chain[0], dirty=frozenset({TierId("disk")}))
    small.put_many(chain[1:])
    assert len(evicted) == 1
    block, dirty = evicted[0]
    assert same(block, chain[0]) and dirty == {TierId("disk")}
    events = small.events.take_events()  # type: ignore[union-attr]
    assert sum(isinstance(e, BlockStored) for e in events) == 5
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert [e.hashes for e in removed] == [(chain[0].key.prefix,)]


def test_failed_demotion_keeps_the_block(small: MemoryTier) -> None:
    chain = make_chain(5)
    small.put_many(chain[:4])

    def refuse_first(block: Block, dirty: frozenset[TierId]) -> None:
        if block.key == chain[0].key:
            raise StoreError("lower tier down")

    small.on_evict = refuse_first
    small.put(chain[4])
    assert small.contains(chain[0].key)
    assert not small.contains(chain[1].key)


def test_pins_are_never_evicted(small: MemoryTier) -> None:
    chain = make_chain(6)
    small.pin(chain[0].key)
    small.pin(chain[5].key)  # pins may precede the block
    small.put_many(chain)
    assert small.contains(chain[0].key) and small.contains(chain[5].key)
    assert sum(small.contains(b.key) for b in chain) == 4
    small.unpin(chain[0].key)
    small.put(make_block(seed=42))
    assert not small.contains(chain[0].key)


def test_full_of_pins_refuses_without_evicting(small: MemoryTier) -> None:
    chain = make_chain(5)
    small.put_many(chain[:4])
    for b in chain[:3]:
        small.pin(b.key)
    lease = small.acquire(chain[3].key)
    assert lease is not None
    before = small.stats()
    with pytest.raises(TierFullError):
        small.put(chain[4])
    assert small.stats() == before
    assert all(small.contains(b.key) for b in chain[:4])
    small.release(lease)
    small.put(chain[4])
    assert not small.contains(chain[3].key)


def test_block_larger_than_tier(small: MemoryTier) -> None:
    spec = ModelSpec(model="test/big", num_layers=8, kv_heads=4, head_dim=64, dtype=DType.FLOAT32, block_size=32)
    with pytest.raises(TierFullError):
        small.put(make_block(spec=spec))
    assert small.stats().blocks == 0


def test_evict_and_evict_to(small: MemoryTier) -> None:
    chain = make_chain(4)
    small.put_many(chain)
    small.pin(chain[0].key)
    assert small.evict(BLOCK + 1) == 2 * BLOCK  # whole blocks, least recent first, skipping the pin
    assert [small.contains(b.key) for b in chain] == [True, False, False, True]
    assert small.evict_to(0) == BLOCK
    assert small.used_bytes == BLOCK  # only the pinned block is left


# --- leases --------------------------------------------------------------------------------------------------------


def test_lease_blocks_eviction_and_reads_in_place_through_the_shm_file(small: MemoryTier) -> None:
    chain = make_chain(6)
    small.put(chain[0])
    lease = small.acquire(chain[0].key)
    assert lease is not None and lease.meta == chain[0].meta and lease.nbytes == BLOCK
    small.put_many(chain[1:])
    assert small.contains(chain[0].key)  # least recently used, but leased
    # A same-host client maps the arena file read-only and reads the leased extent in place.
    assert small.arena_path is not None
    with open(small.arena_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[lease.offset : lease.offset + lease.nbytes] == chain[0].payload
    assert small.release(lease) is True
    assert small.release(lease) is False  # already released
    small.put(make_block(seed=99))
    assert not small.contains(chain[0].key)


def test_overwrite_and_delete_of_leased_block_keep_its_bytes(small: MemoryTier) -> None:
    a = make_block(seed=1)
    small.put(a)
    lease = small.acquire(a.key)
    assert lease is not None
    view = small.lease_view(lease)
    assert view.readonly and bytes(view) == a.payload
    replacement = Block(a.meta, bytes(reversed(a.payload)))
    small.put(replacement)  # a new extent; the leased one stays as it was
    assert bytes(view) == a.payload
    assert same(small.get(a.key), replacement)
    assert small.used_bytes == 2 * BLOCK
    small.delete(a.key)
    assert bytes(view) == a.payload
    assert small.used_bytes == BLOCK
    view.release()
    small.release(lease)
    assert small.used_bytes == 0
    with pytest.raises(ValueError):
        small.lease_view(lease)


def test_get_returns_a_copy_that_survives_eviction(small: MemoryTier) -> None:
    chain = make_chain(5)
    small.put(chain[0])
    got = small.get(chain[0].key)
    small.put_many(chain[1:])
    small.put(make_block(seed=3))
    assert not small.contains(chain[0].key)
    assert same(got, chain[0])


def test_close_announces_all_cleared_and_unlinks() -> None:
    log = EventLog()
    tier = MemoryTier(1 << 20, events=log)
    tier.put(make_block())
    path = tier.arena_path
    tier.close()
    assert isinstance(log.events[-1], AllCleared) and log.events[-1].medium == "ram"
    assert path is not None and not os.path.exists(path)
    with pytest.raises(StoreError):
        tier.get(make_block().key)


def test_write_back_bookkeeping(small: MemoryTier) -> None:
    disk = TierId("disk")
    a, b = make_chain(2)
    small.put(a, dirty=frozenset({disk}))
    small.put(b)
    assert small.dirty_count(disk) == 1
    [(block, version)] = small.dirty_blocks(disk, 10)
    assert same(block, a) and small.is_dirty(a.key, disk, version)
    small.put(a, dirty=frozenset({disk}))  # a newer version: the old one's write-back does not clean it
    small.mark_clean(a.key, disk, version)
    assert small.dirty_count(disk) == 1
    assert small.dirty_blocks(disk, 10, max_version=version) == []
    [(_, newer)] = small.dirty_blocks(disk, 10)
    small.mark_clean(a.key, disk, newer)
    assert small.dirty_count(disk) == 0


# --- policies ------------------------------------------------------------------------------------------------------


def test_prefix_cost_policy_keeps_deep_blocks_where_lru_keeps_recent_ones() -> None:
    chain = make_chain(6)
    survivors = {}
    for policy in (LRUPolicy(), PrefixCostPolicy(attention_tokens=16)):
        tier = MemoryTier(6 * BLOCK, policy=policy, shm_dir=None)
        tier.put_many(chain)  # in chain order, so the policy learns each block's depth from its parent
        for b in reversed(chain):  # read deepest first: the shallow blocks are the most recently used
            tier.get(b.key)
        newcomers = make_chain(2, seed=7)
        tier.put_many(newcomers)
        survivors[policy.name] = [tier.contains(b.key) for b in chain + newcomers]
        tier.close()
    assert survivors["lru"] == [True, True, True, True, False, False, True, True]
    # The shallowest block goes first; then the cold newcomer (never read, head of its chain) is cheaper to lose
    # than any block of the re-read chain.
    assert survivors["prefix-cost"] == [False, True, True, True, True, True, False, True]


def test_prefix_cost_admission_prefers_deep_blocks() -> None:
    policy = PrefixCostPolicy(attention_tokens=16)
    tier = MemoryTier(4 * BLOCK, policy=policy, shm_dir=None)
    chain = make_chain(4)
    tier.put_many(chain)
    for b in chain:
        tier.get(b.key)
    cold_head = make_block(seed=5)  # depth 0 of an unknown chain, never read
    assert not tier.admits(cold_head.meta)
    assert policy.priority(chain[3].key) > policy.priority(chain[0].key)  # type: ignore[operator]
    assert MemoryTier(4 * BLOCK, shm_dir=None).admits(cold_head.meta)  # room left: always admitted
    tier.close()
