"""A bounded in-memory map that forgets its oldest insertions first (the disk tier's entry and header caches)."""

from __future__ import annotations

from itertools import islice
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FifoCache(dict[K, V]):
    """A dict of at most ``capacity`` items, filled with :meth:`put`; when full, the oldest quarter goes in one step.

    Reads are the dict's own ``get`` (no Python call on the read path). Dropping one item at a time from the front
    of a dict is not O(1): every ``next(iter(d))`` walks over the holes the earlier drops left, which slowed each
    insert by microseconds once a cache was full. Rebuilding from the newest three quarters costs O(n) once per
    n/4 inserts. Every call is atomic under the GIL; a read racing a rebuild may miss, which only costs the caller
    its slow path.
    """

    __slots__ = ("capacity",)

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        super().__init__()
        self.capacity = capacity

    def put(self, key: K, value: V) -> None:
        if len(self) >= self.capacity and key not in self:
            newest = list(islice(self.items(), len(self) // 4, None))
            self.clear()
            self.update(newest)
        self[key] = value
