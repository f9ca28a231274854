"""A simulated kvfabric pool: exclusive tiers (RAM, disk, object), demotion on eviction, promotion on a hit.

Every change is announced as a KV event from source ``fabric`` in the tier's medium, exactly as the real store's
tiers announce theirs, so the router sees the pool through the same index as the engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.sim.cache import BlockCache
from kvfabric.events import BlockRemoved, BlockStored, KVEvent
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId

FABRIC_SOURCE = "fabric"


@dataclass(frozen=True, slots=True)
class FabricTier:
    medium: TierId
    capacity_blocks: int | None
    bytes_per_s: float


class FabricPool:
    def __init__(self, tiers: Sequence[FabricTier], namespace: Namespace, model: ModelFingerprint) -> None:
        if not tiers:
            raise ValueError("a fabric pool needs at least one tier")
        self.tiers = tuple(tiers)
        self._caches = [BlockCache(t.capacity_blocks, "lru") for t in tiers]
        self._ns = namespace
        self._model = model
        self.events: list[KVEvent] = []

    def _stored(self, level: int, hashes: list[PrefixHash]) -> None:
        if hashes:
            self.events.append(BlockStored(FABRIC_SOURCE, self.tiers[level].medium, self._ns, self._model,
                                           tuple(hashes)))  # fmt: skip

    def _removed(self, level: int, hashes: list[PrefixHash]) -> None:
        if hashes:
            self.events.append(BlockRemoved(FABRIC_SOURCE, self.tiers[level].medium, self._ns, self._model,
                                            tuple(hashes)))  # fmt: skip

    def _admit(self, level: int, hashes: list[PrefixHash]) -> None:
        """Put ``hashes`` into tier ``level``; what it evicts falls to the next tier (or out of the pool)."""
        while hashes and level < len(self._caches):
            stored, evicted = self._caches[level].admit(hashes)
            self._stored(level, stored)
            self._removed(level, evicted)
            hashes, level = evicted, level + 1

    def tier_of(self, h: PrefixHash) -> int:
        """Index of the tier holding ``h``, or -1."""
        for level, cache in enumerate(self._caches):
            if h in cache:
                return level
        return -1

    def run_from(self, chain: Sequence[PrefixHash], start: int) -> list[int]:
        """Tier of each block of the run the pool holds from ``start`` on (stops at the first block it lacks)."""
        out = []
        for h in chain[start:]:
            level = self.tier_of(h)
            if level < 0:
                break
            out.append(level)
        return out

    def read(self, hashes: Sequence[PrefixHash], levels: Sequence[int]) -> None:
        """An engine loaded ``hashes`` (found at ``levels``): refresh RAM hits, promote the others to RAM."""
        promote: list[PrefixHash] = []
        for h, level in zip(hashes, levels, strict=True):
            if level == 0:
                self._caches[0].admit((h,))
            else:
                self._removed(level, self._caches[level].remove((h,)))
                promote.append(h)
        self._admit(0, promote)

    def write(self, hashes: Sequence[PrefixHash]) -> None:
        """An engine computed ``hashes`` and publishes them to the pool (into RAM)."""
        fresh = [h for h in hashes if self.tier_of(h) < 0]
        self._admit(0, fresh)

    def take_events(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out

    def blocks(self) -> dict[TierId, int]:
        return {t.medium: len(c) for t, c in zip(self.tiers, self._caches, strict=True)}
