"""FifoCache: bounded, forgets the oldest insertions first, never the newest."""

from __future__ import annotations

import pytest

from kvfabric.store.disk.cache import FifoCache


def test_keeps_at_most_capacity_and_drops_the_oldest_first() -> None:
    cache: FifoCache[int, str] = FifoCache(8)
    for i in range(100):
        cache.put(i, str(i))
        assert len(cache) <= 8
        assert cache.get(i) == str(i)  # the newest is always there
    kept = [i for i in range(100) if cache.get(i) is not None]
    assert kept == list(range(100 - len(kept), 100))  # a suffix of the insertions: oldest went first


def test_overwrite_pop_and_clear() -> None:
    cache: FifoCache[str, int] = FifoCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)  # already present: nothing is dropped
    assert (cache.get("a"), cache.get("b")) == (3, 2)
    cache.pop("a")
    cache.pop("missing", None)
    assert cache.get("a") is None and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FifoCache(0)
