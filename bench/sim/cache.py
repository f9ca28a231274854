"""A block cache with a capacity in blocks and an eviction order, reporting what it stored and evicted."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvfabric.ids import PrefixHash

EVICTION_POLICIES = ("lru", "fifo")


class BlockCache:
    """``lru``: a hit refreshes the block; ``fifo``: blocks leave in insertion order. ``None`` capacity = unlimited."""

    __slots__ = ("_blocks", "capacity", "policy")

    def __init__(self, capacity_blocks: int | None, policy: str = "lru") -> None:
        if policy not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; known: {EVICTION_POLICIES}")
        if capacity_blocks is not None and capacity_blocks < 0:
            raise ValueError("capacity must be >= 0 blocks")
        self.capacity = capacity_blocks
        self.policy = policy
        self._blocks: OrderedDict[PrefixHash, None] = OrderedDict()

    def __contains__(self, h: object) -> bool:
        return h in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def leading(self, chain: Sequence[PrefixHash], start: int = 0) -> int:
        """How many blocks from ``start`` on are held, without a gap."""
        blocks = self._blocks
        n = start
        for h in chain[start:]:
            if h not in blocks:
                break
            n += 1
        return n - start

    def admit(self, hashes: Iterable[PrefixHash]) -> tuple[list[PrefixHash], list[PrefixHash]]:
        """Insert or refresh ``hashes`` in order; returns (newly stored, evicted) as they stand afterwards."""
        blocks = self._blocks
        cap = self.capacity
        lru = self.policy == "lru"
        stored: list[PrefixHash] = []
        evicted: list[PrefixHash] = []
        if cap == 0:
            return stored, evicted
        for h in hashes:
            if h in blocks:
                if lru:
                    blocks.move_to_end(h)
                continue
            blocks[h] = None
            stored.append(h)
            if cap is not None and len(blocks) > cap:
                evicted.append(blocks.popitem(last=False)[0])
        if evicted and stored:
            # a block stored and evicted within one call never became visible
            new, gone = set(stored), set(evicted)
            stored = [h for h in stored if h not in gone]
            evicted = [h for h in evicted if h not in new]
        return stored, evicted

    def remove(self, hashes: Iterable[PrefixHash]) -> list[PrefixHash]:
        out = []
        for h in hashes:
            if self._blocks.pop(h, 0) is None:
                out.append(h)
        return out
