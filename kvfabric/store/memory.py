"""The RAM tier: payloads in one shared-memory arena, metadata in a dict, eviction by a pluggable policy.

Reads through ``get`` return a *copy* (``bytes``), so nothing a caller holds can change under it when the block is
evicted or overwritten later. Zero-copy reads go through leases: ``acquire`` pins the block's extent until
``release``, and the lease's ``(offset, nbytes)`` address it in the arena file (``arena_path``) for a same-host
client that maps the file read-only, or through ``lease_view`` in process. While a lease is held the block is never
evicted and its bytes never change: an overwrite or delete installs a new extent (or none) and frees the old one when
its last lease is released.

Payloads in RAM carry no checksum: host RAM is trusted memory (records are verified when they enter from disk, object
storage or the wire).

Locking: one ``threading.Lock`` guards the arena, the slots, pins, leases and the policy. The ``on_evict`` callback
runs *under* that lock, so a demotion to a lower tier completes before any other thread can see the block gone from
RAM (a concurrent delete then finds it in the lower tier and removes it there too). The callback must not call back
into this tier.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvfabric.errors import StoreError, TierFullError
from kvfabric.events import AllCleared, EventSink
from kvfabric.ids import BlockKey, Namespace, TierId
from kvfabric.record import Block, BlockMeta
from kvfabric.store.arena import DEFAULT_ALIGNMENT, Arena
from kvfabric.store.policy import EvictionPolicy, LRUPolicy
from kvfabric.store.tier import Tier, TierCapabilities, TierStats

RAM = TierId("ram")

EvictCallback = Callable[[Block, frozenset[TierId]], None]
"""``on_evict(block, dirty)``: called with a copy of each block the tier evicts, and the write-back tiers that do not
have it yet. Raising keeps the block resident (the tier tries another victim)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A read lease on a block in the RAM arena: its bytes are ``[offset, offset + nbytes)`` of the arena file."""

    meta: BlockMeta
    offset: int
    nbytes: int
    lease_id: int


@dataclass(slots=True)
class _Slot:
    """One stored payload: a block's metadata and where its bytes sit in the arena."""

    meta: BlockMeta
    offset: int  # start of the extent in the arena
    nbytes: int  # payload bytes
    extent: int  # arena bytes taken (payload rounded up to the arena's alignment)
    version: int  # store-wide put counter: write-back marks clean only the version it wrote
    dirty: frozenset[TierId]  # write-back tiers that do not hold this version yet
    leases: int = 0
    live: bool = True  # False once deleted/overwritten/evicted while leased: freed at the last release


@dataclass(slots=True, eq=False)
class Reservation:
    """An arena extent set aside for one payload about to arrive: its receiver writes ``view``; then a ``put``
    whose payload is this very ``view`` adopts the extent (no copy), or :meth:`MemoryTier.cancel` frees it. Until
    then it is in no slot, so nothing can read it, and it is not evictable."""

    view: memoryview
    offset: int
    extent: int


class MemoryTier(Tier):
    """Byte-capped RAM tier over an :class:`~kvfabric.store.arena.Arena`."""

    capabilities = TierCapabilities(persistent=False, zero_copy_get=False, evicts=True)

    def __init__(
        self,
        capacity_bytes: int,
        *,
        tier_id: TierId = RAM,
        source: str = "local",
        events: EventSink | None = None,
        policy: EvictionPolicy | None = None,
        shm_dir: str | os.PathLike[str] | None = "/dev/shm",
        alignment: int = DEFAULT_ALIGNMENT,
        on_evict: EvictCallback | None = None,
        prefault: bool = False,
    ) -> None:
        super().__init__(tier_id, source=source, events=events)
        if capacity_bytes <= 0:
            raise ValueError(f"RAM tier capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.on_evict = on_evict
        self._arena = Arena(capacity_bytes, shm_dir=shm_dir, alignment=alignment, prefault=prefault)
        self._policy = policy if policy is not None else LRUPolicy()
        self._lock = threading.Lock()
        self._slots: dict[BlockKey, _Slot] = {}
        self._pins: set[BlockKey] = set()
        self._leases: dict[int, _Slot] = {}
        self._next_lease = 0
        self._version = 0
        self._dirty: dict[TierId, OrderedDict[BlockKey, None]] = {}
        self._held_bytes = 0  # extents of live slots that are pinned or leased: not evictable
        self._retired_bytes = 0  # extents of replaced/removed slots still held by a lease
        self._stats.capacity_bytes = capacity_bytes
        self._closed = False
        self._reserved: dict[int, Reservation] = {}  # id(view) -> reservation (see reserve)

    # --- introspection -----------------------------------------------------------------------------------------
    @property
    def arena_path(self) -> str | None:
        return self._arena.path

    @property
    def used_bytes(self) -> int:
        """Arena bytes in use, including extents only a lease keeps alive."""
        return self._arena.used_bytes

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    def stats(self) -> TierStats:
        with self._lock:
            return super().stats()

    # --- the tier contract ---------------------------------------------------------------------------------------
    def put(self, block: Block, *, dirty: frozenset[TierId] = frozenset()) -> None:
        """Store ``block``, evicting by policy as needed; ``dirty`` names write-back tiers still lacking it.

        Raises ``TierFullError`` when the block cannot fit even after evicting everything evictable; if that is
        clear before evicting (pinned and leased bytes leave too little room) nothing is evicted.
        """
        meta = block.meta
        src = block.payload if isinstance(block.payload, bytes) else memoryview(block.payload).cast("B")
        n = len(src)
        if n != meta.nbytes:
            raise ValueError(f"payload is {n} bytes, block {meta.key} needs {meta.nbytes}")
        need = self._arena.extent_size(n)
        if need > self.capacity_bytes:
            raise TierFullError(f"block {meta.key} of {n} bytes exceeds the RAM tier's {self.capacity_bytes} bytes")
        with self._lock:
            self._check_open()
            claimed = self._claim(block.payload, need)
            offset = claimed if claimed is not None else self._alloc(need, keep=meta.key)
        # Copy outside the lock: the fresh extent is in no slot yet, so nobody else can see or free it.
        try:
            if claimed is None:  # (a reserved extent already holds the payload)
                with self._arena.view(offset, n) as dst:
                    dst[:] = src
        except BaseException:
            with self._lock:
                if not self._closed:
                    self._arena.free(offset)
            raise
        with self._lock:
            if self._closed:
                raise StoreError(f"tier {self.tier_id} closed during put")
            old = self._slots.pop(meta.key, None)
            if old is not None:
                self._remove_slot(old, evicted=False)
            self._version += 1
            slot = _Slot(meta, offset, n, need, self._version, frozenset(dirty))
            self._slots[meta.key] = slot
            if self._is_held(slot):
                self._held_bytes += need
            for tier in slot.dirty:
                pending = self._dirty.setdefault(tier, OrderedDict())
                pending[meta.key] = None
                pending.move_to_end(meta.key)  # keeps each dirty list in put (= version) order
            self._policy.inserted(meta, n)
            s = self._stats
            s.puts += 1
            s.blocks += 1
            s.bytes += n
            s.bytes_written += n
            self._emit_stored(meta)

    def get(self, key: BlockKey) -> Block | None:
        with self._lock:
            slot = self._resident(key)
            if slot is None:
                return None
            with self._arena.view(slot.offset, slot.nbytes) as src:
                payload = bytes(src)
            self._touch(slot)
            return Block(slot.meta, payload)

    def get_into(self, key: BlockKey, out: memoryview) -> BlockMeta | None:
        dst = memoryview(out).cast("B")
        with self._lock:
            slot = self._resident(key)
            if slot is None:
                return None
            if len(dst) != slot.nbytes:
                raise ValueError(f"destination is {len(dst)} bytes, block {key} needs {slot.nbytes}")
            with self._arena.view(slot.offset, slot.nbytes) as src:
                dst[:] = src
            self._touch(slot)
            return slot.meta

    def head(self, key: BlockKey) -> BlockMeta | None:
        with self._lock:
            self._check_open()
            slot = self._slots.get(key)
            return slot.meta if slot is not None else None

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._slots

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            self._check_open()
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            self._remove_slot(slot, evicted=False)
            self._stats.deletes += 1
            self._emit_removed(key)
            return True

    def keys(self, namespace: Namespace | None = None) -> Iterator[BlockKey]:
        with self._lock:
            snapshot = [k for k in self._slots if namespace is None or k.namespace == namespace]
        return iter(snapshot)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            had_blocks = bool(self._slots)
            self._slots.clear()
            self._leases.clear()
            self._dirty.clear()
            self._arena.close()
            if had_blocks:
                self._emit(AllCleared(self.source, self.tier_id))

    # --- pins ------------------------------------------------------------------------------------------------------
    def pin(self, key: BlockKey) -> None:
        """Never evict ``key`` (whether or not it is resident now) until :meth:`unpin`."""
        with self._lock:
            if key in self._pins:
                return
            slot = self._slots.get(key)
            was_held = slot is not None and self._is_held(slot)
            self._pins.add(key)
            if slot is not None and not was_held:
                self._held_bytes += slot.extent

    def unpin(self, key: BlockKey) -> None:
        with self._lock:
            if key not in self._pins:
                return
            self._pins.discard(key)
            slot = self._slots.get(key)
            if slot is not None and not self._is_held(slot):
                self._held_bytes -= slot.extent

    def pinned(self) -> set[BlockKey]:
        with self._lock:
            return set(self._pins)

    def _resident(self, key: BlockKey) -> _Slot | None:
        """``key``'s slot, or ``None`` counted as a miss; the caller holds the lock."""
        self._check_open()
        slot = self._slots.get(key)
        if slot is None:
            self._stats.misses += 1
        return slot

    # --- leases ----------------------------------------------------------------------------------------------------
    def acquire(self, key: BlockKey) -> Lease | None:
        """A read lease on ``key``'s bytes in the arena, or ``None`` if it is not resident."""
        with self._lock:
            slot = self._resident(key)
            if slot is None:
                return None
            if not self._is_held(slot):
                self._held_bytes += slot.extent
            slot.leases += 1
            self._next_lease += 1
            self._leases[self._next_lease] = slot
            self._touch(slot)
            return Lease(slot.meta, slot.offset, slot.nbytes, self._next_lease)

    def release(self, lease: Lease) -> bool:
        """End ``lease``; ``False`` if it was not held (already released, or the tier closed)."""
        with self._lock:
            slot = self._leases.pop(lease.lease_id, None)
            if slot is None:
                return False
            slot.leases -= 1
            if slot.live:
                if not self._is_held(slot):
                    self._held_bytes -= slot.extent
            elif slot.leases == 0:
                self._retired_bytes -= slot.extent
                self._arena.free(slot.offset)
            return True

    def lease_view(self, lease: Lease) -> memoryview:
        """A read-only view of a leased block's bytes, valid until the lease is released."""
        with self._lock:
            self._check_open()
            slot = self._leases.get(lease.lease_id)
            if slot is None:
                raise ValueError(f"lease {lease.lease_id} is not held")
            return self._arena.view(slot.offset, slot.nbytes).toreadonly()

    # --- reservations: a payload received straight into the arena ------------------------------------------------
    def reserve(self, nbytes: int, *, evict: bool) -> Reservation | None:
        """An extent for a ``nbytes`` payload, or ``None`` when there is no room for it (with ``evict``, after
        evicting by policy what may be evicted). Counted with the lease-held extents until put or cancelled."""
        need = self._arena.extent_size(nbytes)
        if need > self.capacity_bytes:
            return None
        with self._lock:
            if self._closed:
                return None
            if evict:
                try:
                    offset: int | None = self._alloc(need, keep=None)  # type: ignore[arg-type]
                except TierFullError:
                    return None
            elif self._arena.used_bytes + need <= self.capacity_bytes:
                offset = self._arena.alloc(need)
            else:
                offset = None
            if offset is None:
                return None
            self._retired_bytes += need
            reservation = Reservation(self._arena.view(offset, nbytes), offset, need)
            self._reserved[id(reservation.view)] = reservation
            return reservation

    def reserve_run(self, sizes: list[int], *, evict: bool) -> tuple[memoryview, list[Reservation]] | None:
        """Reservations for payloads of ``sizes`` that lie end to end in one run of the arena, and a view of the
        whole run (so one receive can fill several); ``None`` when the run does not fit or the payloads would not
        be contiguous (a size that is no multiple of the alignment)."""
        if not sizes or any(n <= 0 or n % self._arena.alignment for n in sizes):
            return None
        run = self.reserve(sum(sizes), evict=evict)
        if run is None:
            return None
        with self._lock:
            if self._closed:
                return None
            del self._reserved[id(run.view)]
            parts = []
            for offset, n in zip(self._arena.split(run.offset, sizes), sizes, strict=True):
                part = Reservation(self._arena.view(offset, n), offset, n)
                self._reserved[id(part.view)] = part
                parts.append(part)
        return run.view, parts

    def cancel(self, reservation: Reservation) -> bool:
        """Free a reservation no put adopted; ``False`` if one did (or it was cancelled already)."""
        with self._lock:
            if self._reserved.get(id(reservation.view)) is not reservation:
                return False
            del self._reserved[id(reservation.view)]
            self._retired_bytes -= reservation.extent
            if not self._closed:
                self._arena.free(reservation.offset)
            return True

    def _claim(self, payload: object, need: int) -> int | None:
        """The offset of the reservation whose view ``payload`` is, taken out of the reserved set (caller holds
        the lock); ``None`` when ``payload`` is no reservation's view."""
        reservation = self._reserved.get(id(payload))
        if reservation is None or reservation.view is not payload or reservation.extent != need:
            return None
        del self._reserved[id(payload)]
        self._retired_bytes -= reservation.extent
        return reservation.offset

    # --- eviction and admission ------------------------------------------------------------------------------------
    def admits(self, meta: BlockMeta) -> bool:
        """Whether a block offered for promotion should enter: there is room, or the policy prefers it."""
        with self._lock:
            if self._arena.used_bytes + self._arena.extent_size(meta.nbytes) <= self.capacity_bytes:
                return True
            return self._policy.admits(meta, meta.nbytes)

    def evict(self, nbytes: int) -> int:
        """Evict by policy until at least ``nbytes`` of arena are freed or nothing evictable is left; bytes freed."""
        with self._lock:
            self._check_open()
            return self._evict_while(lambda freed: freed < nbytes)

    def evict_to(self, target_bytes: int) -> int:
        """Evict by policy until the arena holds at most ``target_bytes`` (or nothing evictable is left)."""
        with self._lock:
            self._check_open()
            return self._evict_while(lambda _: self._arena.used_bytes > target_bytes)

    # --- write-back bookkeeping -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The version the latest put got; versions only grow."""
        with self._lock:
            return self._version

    def dirty_blocks(self, tier: TierId, limit: int, max_version: int | None = None) -> list[tuple[Block, int]]:
        """Copies of up to ``limit`` blocks dirty for ``tier`` (oldest put first, none newer than ``max_version``),
        each with its version."""
        out: list[tuple[Block, int]] = []
        with self._lock:
            self._check_open()
            for key in self._dirty.get(tier, ()):
                slot = self._slots[key]
                if max_version is not None and slot.version > max_version:
                    break  # the dirty list is in put order, so every later entry is newer too
                with self._arena.view(slot.offset, slot.nbytes) as src:
                    out.append((Block(slot.meta, bytes(src)), slot.version))
                if len(out) >= limit:
                    break
        return out

    def is_dirty(self, key: BlockKey, tier: TierId, version: int) -> bool:
        """Whether ``version`` of ``key`` is resident and still lacks a copy in ``tier``."""
        with self._lock:
            slot = self._slots.get(key)
            return slot is not None and slot.version == version and tier in slot.dirty

    def mark_clean(self, key: BlockKey, tier: TierId, version: int) -> None:
        """``tier`` now holds ``version`` of ``key``; a newer version stays dirty."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.version != version or tier not in slot.dirty:
                return
            slot.dirty = slot.dirty - {tier}
            self._dirty[tier].pop(key, None)

    def peek(self, key: BlockKey) -> Block | None:
        """A copy of the block without counting a hit or touching the eviction order (background readers)."""
        with self._lock:
            self._check_open()
            slot = self._slots.get(key)
            if slot is None:
                return None
            with self._arena.view(slot.offset, slot.nbytes) as src:
                return Block(slot.meta, bytes(src))

    def dirty_count(self, tier: TierId) -> int:
        with self._lock:
            return len(self._dirty.get(tier, ()))

    # --- internals (caller holds the lock) --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"tier {self.tier_id} is closed")

    def _is_held(self, slot: _Slot) -> bool:
        return slot.leases > 0 or (bool(self._pins) and slot.meta.key in self._pins)

    def _touch(self, slot: _Slot) -> None:
        self._policy.accessed(slot.meta.key)
        self._stats.hits += 1
        self._stats.bytes_read += slot.nbytes

    def _alloc(self, need: int, *, keep: BlockKey) -> int:
        """An extent of ``need`` bytes, evicting by policy (never ``keep``, pinned or leased blocks) to make room."""
        keep_slot = self._slots.get(keep)
        reserved = self._held_bytes + self._retired_bytes
        if keep_slot is not None and not self._is_held(keep_slot):
            reserved += keep_slot.extent
        if reserved + need > self.capacity_bytes:
            raise TierFullError(
                f"RAM tier cannot fit {need} bytes: {self._held_bytes} pinned/leased and {self._retired_bytes} "
                f"awaiting lease release of {self.capacity_bytes}"
            )
        refused: set[BlockKey] = set()  # victims whose demotion failed: they stay this round
        last_error: Exception | None = None
        while True:
            if self._arena.used_bytes + need <= self.capacity_bytes:
                offset = self._arena.alloc(need)
                if offset is not None:
                    return offset
            victim = self._policy.victim(lambda k: k == keep or k in refused or self._is_held(self._slots[k]))
            if victim is None:
                raise TierFullError(
                    f"RAM tier cannot fit {need} bytes: nothing left to evict "
                    f"({self._arena.used_bytes} of {self.capacity_bytes} used, largest hole "
                    f"{self._arena.largest_free})"
                ) from last_error
            try:
                self._evict_one(victim)
            except Exception as exc:  # the demotion callback failed: keep this block, try the next
                refused.add(victim)
                last_error = exc

    def _evict_while(self, more: Callable[[int], bool]) -> int:
        freed = 0
        refused: set[BlockKey] = set()
        while more(freed):
            victim = self._policy.victim(lambda k: k in refused or self._is_held(self._slots[k]))
            if victim is None:
                break
            extent = self._slots[victim].extent
            try:
                self._evict_one(victim)
            except Exception:  # demotion failed: the block stays; eviction is best effort
                refused.add(victim)
                continue
            freed += extent
        return freed

    def _evict_one(self, key: BlockKey) -> None:
        slot = self._slots[key]
        if self.on_evict is not None:
            with self._arena.view(slot.offset, slot.nbytes) as src:
                block = Block(slot.meta, bytes(src))
            self.on_evict(block, slot.dirty)
        del self._slots[key]
        self._remove_slot(slot, evicted=True)
        self._stats.evictions += 1
        self._emit_removed(key)

    def _remove_slot(self, slot: _Slot, *, evicted: bool) -> None:
        """Account for a slot just taken out of ``_slots``; free its extent unless a lease still holds it."""
        key = slot.meta.key
        if self._is_held(slot):
            self._held_bytes -= slot.extent
        slot.live = False
        for tier in slot.dirty:
            self._dirty[tier].pop(key, None)
        self._policy.removed(key, evicted=evicted)
        self._stats.blocks -= 1
        self._stats.bytes -= slot.nbytes
        if slot.leases:
            self._retired_bytes += slot.extent
        else:
            self._arena.free(slot.offset)
