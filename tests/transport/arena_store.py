"""A small RAM-arena store for transport tests: exactly the methods the server uses (``FabricStore``), over a real
/dev/shm file with fixed-size slots, LRU eviction of unleased unpinned blocks, and lease refcounts.

Test-only: the product's store is ``kvfabric.store.tiered.TieredStore``; this stays until the transport tests can
use it.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvfabric.errors import BlockTooLargeError, InvalidBlockError, TierFullError, UnknownModelError
from kvfabric.ids import BlockKey, ModelFingerprint, TierId
from kvfabric.record import Block, BlockMeta
from kvfabric.spec import ModelSpec
from kvfabric.store.tier import TierStats

RAM = TierId("ram")


@dataclass(frozen=True, slots=True)
class Lease:
    meta: BlockMeta
    offset: int
    nbytes: int
    slot: int


class ArenaStore:
    def __init__(self, slots: int = 64, slot_bytes: int = 1 << 20) -> None:
        fd, self.arena_path = tempfile.mkstemp(prefix="kvfabric-test-arena-", dir="/dev/shm")
        os.ftruncate(fd, slots * slot_bytes)
        self._mm = mmap.mmap(fd, slots * slot_bytes)
        os.close(fd)
        self.slot_bytes = slot_bytes
        self._free = list(range(slots))
        self._index: OrderedDict[BlockKey, tuple[int, BlockMeta]] = OrderedDict()  # LRU order
        self._refs = [0] * slots
        self._orphans: set[int] = set()  # slots whose block was replaced/deleted while leased
        self._pins: set[BlockKey] = set()
        self._models: dict[ModelFingerprint, ModelSpec] = {}
        self._lock = threading.Lock()
        self.stats = TierStats(capacity_bytes=slots * slot_bytes)
        self.calls = 0

    def register_model(self, spec: ModelSpec) -> ModelFingerprint:
        self._models[spec.fingerprint()] = spec
        return spec.fingerprint()

    def put_many(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            self.calls += 1
            spec = self._models.get(b.key.model)
            if spec is None:
                raise UnknownModelError(b.key.model.hex())
            if b.meta.nbytes > self.slot_bytes:
                raise BlockTooLargeError(b.meta.nbytes, self.slot_bytes)
            if b.meta.dtype != spec.dtype:
                raise InvalidBlockError(f"block dtype {b.meta.dtype.name} does not match the model's")
        with self._lock:
            for b in blocks:
                slot = self._alloc()
                off = slot * self.slot_bytes
                self._mm[off : off + b.meta.nbytes] = memoryview(b.payload).cast("B")
                self._drop(b.key)
                self._index[b.key] = (slot, b.meta)
                self.stats.puts += 1

    def _alloc(self) -> int:
        if not self._free:
            for key, (slot, _) in self._index.items():
                if self._refs[slot] == 0 and key not in self._pins:
                    self._drop(key)
                    self.stats.evictions += 1
                    break
        if not self._free:
            raise TierFullError("every slot is leased or pinned")
        return self._free.pop()

    def _drop(self, key: BlockKey) -> bool:
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        slot = entry[0]
        if self._refs[slot]:
            self._orphans.add(slot)  # freed when the last lease goes
        else:
            self._free.append(slot)
        return True

    def get(self, key: BlockKey) -> Block | None:
        with self._lock:
            self.calls += 1
            entry = self._index.get(key)
            if entry is None:
                return None
            slot, meta = entry
            off = slot * self.slot_bytes
            return Block(meta, bytes(self._mm[off : off + meta.nbytes]))

    def head(self, key: BlockKey) -> tuple[BlockMeta, TierId] | None:
        with self._lock:
            entry = self._index.get(key)
            return (entry[1], RAM) if entry else None

    def lookup(self, keys: Sequence[BlockKey]) -> list[TierId | None]:
        with self._lock:
            self.calls += 1
            return [RAM if k in self._index else None for k in keys]

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            self.calls += 1
            return sum(self._drop(k) for k in keys)

    def pin(self, key: BlockKey) -> bool:
        self._pins.add(key)
        return True

    def unpin(self, key: BlockKey) -> bool:
        self._pins.discard(key)
        return True

    def acquire(self, key: BlockKey) -> Lease | None:
        with self._lock:
            self.calls += 1
            entry = self._index.get(key)
            if entry is None:
                return None
            self._index.move_to_end(key)
            slot, meta = entry
            self._refs[slot] += 1
            return Lease(meta, slot * self.slot_bytes, meta.nbytes, slot)

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._refs[lease.slot] -= 1
            assert self._refs[lease.slot] >= 0, "lease released twice"
            if self._refs[lease.slot] == 0 and lease.slot in self._orphans:
                self._orphans.discard(lease.slot)
                self._free.append(lease.slot)

    @property
    def leases_held(self) -> int:
        return sum(self._refs)

    def tier_stats(self) -> dict[TierId, TierStats]:
        self.stats.blocks = len(self._index)
        return {RAM: self.stats}

    def close(self) -> None:
        self._mm.close()
        os.unlink(self.arena_path)
