"""The ONE test suite every tier passes. Subclass it and provide the ``tier`` fixture (a fresh, empty tier) and,
for persistent tiers, the ``reopen`` fixture (a callable that closes nothing itself and returns a new tier instance
over the same backing storage)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvfabric.ids import Namespace
from kvfabric.record import Block
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.tier import Tier
from tests.blocks import make_block, make_chain


def same(a: Block | None, b: Block) -> bool:
    return a is not None and a.meta == b.meta and bytes(memoryview(a.payload).cast("B")) == bytes(b.payload)


class TierSuite:
    @pytest.fixture
    def reopen(self) -> Callable[[], Tier] | None:
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
