"""A bounded in-memory map that forgets its oldest insertions first (the disk tier's entry and header caches)."""

from __future__ import annotations

from itertools import islice
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FifoCache(Generic[K, V]):
    """At most ``capacity`` items; when full, the oldest quarter goes in one step.

    Dropping one item at a time from the front of a dict is not O(1): every ``next(iter(d))`` walks over the holes
    the earlier drops left, so a full cache slowed every insert by microseconds. Rebuilding from the newest three
    quarters costs O(n) once per n/4 inserts. Each call is one dict operation under the GIL, so readers need no
    lock; a rebuild swaps in a new dict, and a reader holding the old one still reads a consistent map.
    """

    __slots__ = ("_items", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: dict[K, V] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        items = self._items
        if len(items) >= self.capacity and key not in items:
            items = self._items = dict(islice(items.items(), len(items) // 4, None))
        items[key] = value

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items = {}
