"""The ONE test suite every tier passes. Subclass it and provide:

- the ``tier`` fixture (a fresh, empty tier);
- for persistent tiers, the ``reopen`` fixture (a callable that closes nothing itself and returns a new tier
  instance over the same backing storage);
- for tiers that verify what they read (``capabilities.verifies_reads``), the ``corrupt`` fixture: a callable that
  changes one byte of a stored block's payload behind the tier's back (in its file, its object), after which the
  tier must answer a counted, announced miss and never the bad bytes;
- ``REPORTS``: the :class:`~kvfabric.store.tier.TierInfo` reports (besides ``codec``) the tier keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import numpy as np
import pytest

from kvfabric.codec import Codec
from kvfabric.errors import StoreError
from kvfabric.events import BlockRemoved, BlockStored, EventLog
from kvfabric.ids import BlockKey, Namespace
from kvfabric.record import Block
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.tier import Tier, TierInfo
from tests.blocks import make_block, make_chain

Corrupt = Callable[[Tier, BlockKey], None]


def same(a: Block | None, b: Block) -> bool:
    return a is not None and a.meta == b.meta and bytes(memoryview(a.payload).cast("B")) == bytes(b.payload)


def listen(tier: Tier) -> EventLog:
    """Hear the tier's events from now on (a tier publishes to whatever sink ``events`` holds)."""
    log = EventLog()
    tier.events = log
    return log


def removed_hashes(log: EventLog, tier: Tier) -> list[bytes]:
    return [h for e in log.take_events() if isinstance(e, BlockRemoved) and e.medium == tier.tier_id for h in e.hashes]


class TierSuite:
    REPORTS: frozenset[str] = frozenset()
    """The ``TierInfo`` fields besides ``codec`` that this tier fills in."""

    @pytest.fixture
    def reopen(self) -> Callable[[], Tier] | None:
        return None

    @pytest.fixture
    def corrupt(self) -> Corrupt | None:
        return None

    def test_miss(self, tier: Tier) -> None:
        b = make_block()
        assert tier.get(b.key) is None
        assert tier.head(b.key) is None
        assert not tier.contains(b.key)
        assert tier.stats().misses >= 1

    def test_put_get_roundtrip(self, tier: Tier) -> None:
        b = make_block()
        tier.put(b)
        assert same(tier.get(b.key), b)
        assert tier.contains(b.key)
        assert tier.head(b.key) == b.meta
        assert tier.stats().hits >= 1

    def test_put_is_idempotent(self, tier: Tier) -> None:
        b = make_block()
        tier.put(b)
        tier.put(b)
        assert same(tier.get(b.key), b)
        assert list(tier.keys()) == [b.key]
        assert tier.stats().blocks == 1

    def test_delete(self, tier: Tier) -> None:
        a, b = make_chain(2)
        tier.put_many([a, b])
        assert tier.delete(a.key) is True
        assert tier.get(a.key) is None
        assert tier.delete(a.key) is False
        assert same(tier.get(b.key), b)
        assert tier.stats().blocks == 1

    def test_batch_forms_keep_order(self, tier: Tier) -> None:
        chain = make_chain(5)
        tier.put_many(chain[:3])
        got = tier.get_many([c.key for c in chain])
        assert [g is not None for g in got] == [True, True, True, False, False]
        assert all(same(g, c) for g, c in zip(got[:3], chain[:3]))
        assert tier.contains_many([c.key for c in reversed(chain)]) == [False, False, True, True, True]
        assert tier.delete_many([c.key for c in chain]) == 3
        assert tier.contains_many([c.key for c in chain]) == [False] * 5

    def test_keys_by_namespace(self, tier: Tier) -> None:
        a = make_chain(3, namespace="tenant-a")
        b = make_chain(2, namespace="tenant-b", seed=1)
        tier.put_many(a + b)
        assert sorted(k.to_bytes() for k in tier.keys()) == sorted(x.key.to_bytes() for x in a + b)
        assert {k for k in tier.keys(Namespace("tenant-b"))} == {x.key for x in b}

    def test_namespaces_are_separate(self, tier: Tier) -> None:
        a = make_block(namespace="tenant-a", seed=3)
        b_key = type(a.key)(Namespace("tenant-b"), a.key.model, a.key.prefix)
        tier.put(a)
        assert tier.get(b_key) is None
        assert not tier.contains(b_key)
        assert tier.delete(b_key) is False
        assert same(tier.get(a.key), a)

    def test_get_into(self, tier: Tier) -> None:
        b = make_block(seed=5)
        tier.put(b)
        out = np.zeros(b.meta.nbytes, dtype=np.uint8)
        assert tier.get_into(b.key, memoryview(out)) == b.meta
        assert out.tobytes() == b.payload
        assert tier.get_into(make_block(seed=6).key, memoryview(out)) is None
        with pytest.raises(ValueError):
            tier.get_into(b.key, memoryview(np.zeros(10, dtype=np.uint8)))

    def test_other_dtypes_and_sizes(self, tier: Tier) -> None:
        spec = ModelSpec(model="test/f32", num_layers=4, kv_heads=4, head_dim=64, dtype=DType.FLOAT32, block_size=32)
        big = make_block(spec=spec, seed=7)  # 256 KiB
        tier.put(big)
        assert same(tier.get(big.key), big)

    def test_stats_track_contents(self, tier: Tier) -> None:
        chain = make_chain(4)
        tier.put_many(chain)
        s = tier.stats()
        assert s.blocks == 4 and s.bytes >= 4 * 1 and s.puts >= 4
        tier.delete(chain[0].key)
        assert tier.stats().blocks == 3

    def test_reopen_keeps_blocks(self, tier: Tier, reopen: Callable[[], Tier] | None) -> None:
        if not tier.capabilities.persistent:
            pytest.skip("tier is not persistent")
        assert reopen is not None, "persistent tiers must provide the reopen fixture"
        chain = make_chain(3, seed=9)
        tier.put_many(chain)
        tier.delete(chain[1].key)
        tier.close()
        again = reopen()
        try:
            assert same(again.get(chain[0].key), chain[0])
            assert again.get(chain[1].key) is None
            assert same(again.get(chain[2].key), chain[2])
            assert again.stats().blocks == 2
        finally:
            again.close()

    # --- the optional operations and info --------------------------------------------------------------------------
    def test_optional_operations(self, tier: Tier) -> None:
        chain = make_chain(3, seed=11)
        tier.start()
        tier.start()  # idempotent
        tier.put_many(chain)
        tier.flush()
        tier.delete(chain[0].key)
        result = tier.compact()
        assert (result is not None) == tier.capabilities.compacts
        assert tier.get(chain[0].key) is None
        assert all(same(tier.get(b.key), b) for b in chain[1:])

    def test_info(self, tier: Tier) -> None:
        tier.put(make_block(seed=12))
        tier.flush()
        info = tier.info()
        assert isinstance(info, TierInfo) and isinstance(info.codec, Codec)
        assert {f.name for f in fields(TierInfo) if f.name != "codec" and getattr(info, f.name) is not None} == (
            self.REPORTS
        )
        if info.objects is not None:  # everything flushed: nothing waits to upload
            assert info.objects.backlog_bytes == 0 and info.objects.pending_blocks == 0
            assert info.objects.uploaded_blocks == 1

    def test_flush_shows_buffered_blocks_to_other_readers(self, tier: Tier, reopen: Callable[[], Tier] | None) -> None:
        if not tier.capabilities.shared:
            pytest.skip("no other reader can open the tier while it is open")
        assert reopen is not None
        chain = make_chain(3, seed=13)
        tier.put_many(chain)
        tier.flush()
        other = reopen()
        try:
            assert all(same(other.get(b.key), b) for b in chain)
        finally:
            other.close()

    # --- corruption --------------------------------------------------------------------------------------------
    def test_corrupt_block_is_a_counted_announced_miss(self, tier: Tier, corrupt: Corrupt | None) -> None:
        if not tier.capabilities.verifies_reads:
            assert corrupt is None, "a tier that verifies reads says so in its capabilities"
            pytest.skip("the tier does not verify what it reads")
        assert corrupt is not None, "tiers that verify reads must provide the corrupt fixture"
        chain = make_chain(4, seed=14)
        tier.put_many(chain)
        tier.flush()
        bad_get, bad_into, good = chain[0], chain[1], chain[2:]
        corrupt(tier, bad_get.key)
        corrupt(tier, bad_into.key)
        log = listen(tier)
        assert tier.get(bad_get.key) is None
        out = np.zeros(bad_into.meta.nbytes, dtype=np.uint8)
        assert tier.get_into(bad_into.key, memoryview(out)) is None
        assert all(same(tier.get(b.key), b) for b in good)
        s = tier.stats()
        assert s.corrupt == 2 and s.blocks == 2
        assert sorted(removed_hashes(log, tier)) == sorted([bad_get.key.prefix, bad_into.key.prefix])
        for b in (bad_get, bad_into):  # dropped: later reads are plain misses
            assert tier.get(b.key) is None and tier.head(b.key) is None
        assert tier.stats().corrupt == 2

    # --- events ------------------------------------------------------------------------------------------------
    def test_events_on_put_and_delete(self, tier: Tier) -> None:
        log = listen(tier)
        a, b = make_chain(2, seed=15)
        tier.put_many([a, b])
        stored = [e for e in log.take_events() if isinstance(e, BlockStored)]
        assert [h for e in stored for h in e.hashes] == [a.key.prefix, b.key.prefix]
        assert all(e.medium == tier.tier_id and e.namespace == a.key.namespace for e in stored)
        assert stored[1].parent == b.meta.parent
        tier.delete(a.key)
        tier.delete(a.key)  # absent: nothing to announce
        assert removed_hashes(log, tier) == [a.key.prefix]

    def test_events_on_evict(self, tier: Tier) -> None:
        if not tier.capabilities.evicts:
            pytest.skip("the tier refuses writes when full rather than evicting")
        capacity = tier.stats().capacity_bytes
        assert capacity is not None
        log = listen(tier)
        block = make_block()
        chain = make_chain(capacity // block.meta.nbytes + 4, seed=16)
        tier.put_many(chain)
        removed = removed_hashes(log, tier)
        assert removed and len(removed) == tier.stats().evictions
        assert not any(tier.contains(k) for k in (b.key for b in chain) if k.prefix in set(removed))
        assert tier.stats().blocks == len(chain) - len(removed)

    # --- close -------------------------------------------------------------------------------------------------
    def test_close_is_idempotent_and_final(self, tier: Tier) -> None:
        b = make_block(seed=17)
        tier.put(b)
        tier.close()
        tier.close()
        for use in (
            lambda: tier.put(make_block(seed=18)), lambda: tier.get(b.key), lambda: tier.head(b.key),
            lambda: tier.delete(b.key), lambda: tier.get_many([b.key]),
            lambda: tier.get_into(b.key, memoryview(bytearray(b.meta.nbytes))),
        ):  # fmt: skip
            with pytest.raises(StoreError, match="closed"):
                use()
