"""TieredStore: RAM -> disk -> object tiers behind one API, with the store's policies.

What it adds to the tiers (``docs/tiers.md`` has one paragraph per policy):

- validation against registered model specs before anything is written (bad input changes nothing);
- write policy per lower tier: write-through (``put`` returns once the tier has the block) or write-back (the block
  waits, dirty, in RAM, or queued when a write-through tier above already holds it; drained by ``flush``, ``close``,
  the background flusher of ``start``, and by demotion when RAM evicts it);
- promotion on hit (a block read from a lower tier is copied into RAM, subject to the RAM policy's admission),
  demotion on eviction, RAM high/low watermarks;
- pins across tiers, TTL and byte quotas per namespace, per-namespace/per-model usage;
- read counts per tier that mean what they say: a hit or a miss is counted once for each tier a client's read
  actually asked (RAM, then each tier below until one has the block); the store's own reads (promotion, write-back,
  demotion, compaction) count as nothing. ``tier_stats`` reports these in place of the tiers' own counters.

Locking, outermost first; a thread takes these only in this order, which is what keeps it deadlock-free:

1. *key stripe*: one of ``N_STRIPES`` locks chosen by the key's hash. Put, delete, expiry, promotion and each
   write-back copy of a key hold its stripe, so a flush or a promotion can never resurrect a block deleted meanwhile
   and two writers of one key never interleave their tier writes. No thread holds two stripes.
2. *tier locks*: each tier guards itself. The RAM tier calls the eviction callback (demotion) under its own lock; the
   callback writes to lower tiers and takes the store lock, both of which nest inside.
3. *store lock*: guards the catalog (usage, quotas) and the write-back backlog; never held across a call into a tier.

The model and pin registries have their own locks and are read without locking.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvfabric.codec import Codec
from kvfabric.errors import (
    BlockTooLargeError,
    ConfigError,
    DiskFullError,
    InvalidBlockError,
    KVFabricError,
    QuotaExceededError,
    StoreError,
    TierFullError,
    TierUnavailableError,
    UnknownModelError,
)
from kvfabric.events import EventSink
from kvfabric.ids import BlockKey, ModelFingerprint, Namespace, TierId
from kvfabric.record import Block, BlockMeta, decode_record
from kvfabric.spec import ModelSpec
from kvfabric.store.catalog import Catalog, NamespaceStats
from kvfabric.store.config import WRITE_THROUGH, NamespacePolicy, StoreConfig
from kvfabric.store.counters import StoreStats
from kvfabric.store.memory import Lease, MemoryTier, Reservation
from kvfabric.store.policy import make_policy
from kvfabric.store.registry import ModelRegistry, PinRegistry
from kvfabric.store.tier import Tier, TierCapabilities, TierStats, copy_payload

if TYPE_CHECKING:
    from kvfabric.store.object.tier import ObjectTierStats

N_STRIPES = 64
FLUSH_BATCH = 64
MAX_FLUSH_BACKOFF_S = 30.0
ROOM_FRACTION = 16
ROOM_ROUNDS = 4


class _LowerTierFull(Exception):
    """A lower tier that does not evict by itself refused a write for want of space (internal to the store)."""

    def __init__(self, tier: Tier, error: TierFullError) -> None:
        super().__init__(str(error))
        self.tier = tier
        self.error = error


@dataclass(slots=True)
class _Reads:
    """Reads one tier was asked on behalf of clients (guarded by the store lock)."""

    hits: int = 0
    misses: int = 0


class TieredStore:
    """The node's block store. Build it with :meth:`open`; the constructor takes already-built tiers."""

    def __init__(
        self,
        config: StoreConfig,
        ram: MemoryTier,
        lower: Sequence[Tier] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``lower`` is ordered nearest first (disk, then object). The store takes ownership of every tier."""
        self.config = config
        self._ram = ram
        self._lower = list(lower)
        self._tiers: list[Tier] = [ram, *self._lower]
        self._by_id = {t.tier_id: t for t in self._tiers}
        if len(self._by_id) != len(self._tiers):
            raise ConfigError(f"tier ids must be distinct, got {[t.tier_id for t in self._tiers]}")
        self._write_policy = {t.tier_id: config.write_policy_of(t.tier_id) for t in self._lower}
        self._clock = clock
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(N_STRIPES)]
        self._catalog = Catalog()
        self._backlog: dict[TierId, OrderedDict[BlockKey, None]] = {t.tier_id: OrderedDict() for t in self._lower}
        self._counters = StoreStats()
        self._reads = {t.tier_id: _Reads() for t in self._tiers}
        self._models = ModelRegistry(config.data_dir)
        self._pins = PinRegistry(config.data_dir)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        for key in self._pins.keys():
            ram.pin(key)
        ram.on_evict = self._on_ram_evict
        self._rebuild_catalog()

    @classmethod
    def open(cls, config: StoreConfig, *, events: EventSink | None = None) -> TieredStore:
        """The embedded default: RAM, plus a disk tier under ``data_dir``, plus the object tier when configured."""
        if config.data_dir is not None:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        ram = MemoryTier(
            config.ram_bytes, source=config.node_id, events=events, policy=make_policy(config.ram_policy),
            shm_dir=config.shm_dir, prefault=config.ram_prefault,
        )  # fmt: skip
        lower: list[Tier] = []
        try:
            if config.disk_capacity is not None:
                lower.append(_open_disk_tier(config, events))
            if config.object is not None:
                lower.append(_open_object_tier(config, events))
            return cls(config, ram, lower)
        except BaseException:
            for tier in [*lower, ram]:
                tier.close()
            raise

    # --- models ----------------------------------------------------------------------------------------------------
    def register_model(
        self, spec: ModelSpec, *, owner: str | None = None, max_per_owner: int | None = None
    ) -> ModelFingerprint:
        """Accept blocks of ``spec`` from now on (and after a restart, when the store has a data dir); ``owner``
        (the registering tenant) may hold at most ``max_per_owner`` models."""
        self._check_open()
        if spec.block_nbytes > self.config.max_block_bytes:
            raise BlockTooLargeError(spec.block_nbytes, self.config.max_block_bytes)
        return self._models.register(spec, owner=owner, max_per_owner=max_per_owner)

    def model(self, fingerprint: ModelFingerprint) -> ModelSpec | None:
        return self._models.get(fingerprint)

    def models(self) -> list[ModelSpec]:
        return self._models.all()

    # --- writes ----------------------------------------------------------------------------------------------------
    def put(self, block: Block) -> None:
        """Validate, make room under the namespace quota, then write per tier policy."""
        self.put_many([block])

    def put_many(self, blocks: Iterable[Block]) -> None:
        """All blocks are validated (and quotas checked) before any is written; a bad one stores none."""
        self._check_open()
        ready = [self._validated(b) for b in blocks]
        if not ready:
            return
        victims, undo = self._reserve(ready)
        try:
            for key in victims:
                with self._stripe(key):
                    self._remove_everywhere(key)
                self._count("quota_evictions")
        except BaseException:
            self._unreserve(undo)
            raise
        for i, block in enumerate(ready):
            try:
                self._write_making_room(block)
            except BaseException:
                self._unreserve(undo[i:])
                raise
        self._after_write()

    def put_record(self, record: bytes | memoryview) -> BlockKey:
        """Store a block given as an encoded record (header + payload), verified before anything else happens."""
        block = decode_record(record)
        self.put(block)
        return block.key

    def delete(self, key: BlockKey) -> bool:
        """Remove ``key`` from every tier and forget its pin; ``True`` if some tier held it."""
        self._check_open()
        with self._stripe(key):
            found = self._remove_everywhere(key)
            if self._pins.remove(key):
                self._ram.unpin(key)
        return found

    def delete_many(self, keys: Iterable[BlockKey]) -> int:
        return sum(self.delete(k) for k in keys)

    def delete_namespace(self, namespace: Namespace) -> int:
        """Remove every block of ``namespace``; how many."""
        return self.delete_many(self._keys_where(namespace, None))

    def delete_model(self, namespace: Namespace, model: ModelFingerprint) -> int:
        """Remove every block of ``model`` in ``namespace``; how many."""
        return self.delete_many(self._keys_where(namespace, model))

    # --- puts received straight into RAM -------------------------------------------------------------------------
    def reserve_ram(self, nbytes: int) -> Reservation | None:
        """An extent of the RAM arena for a ``nbytes`` payload about to arrive, or ``None`` where it cannot go to
        RAM now (larger than a block may be, or RAM full): receive into a buffer of your own then. Eviction makes
        room only when RAM is the only tier, as a victim needs no write below it (no I/O for the caller). Commit
        by ``put_many`` of blocks whose payload is ``reservation.view`` (written through below as any put), and
        :meth:`cancel_reservation` every reservation afterwards: the ones a put did not adopt are freed."""
        if self._closed or nbytes > self.config.max_block_bytes:
            return None
        return self._ram.reserve(nbytes, evict=not self._lower)

    def reserve_ram_run(self, sizes: list[int]) -> tuple[memoryview, list[Reservation]] | None:
        """Like :meth:`reserve_ram` for several payloads at once, end to end in one run of the arena: the view of
        the whole run, to receive them all in one go, and a reservation for each (commit and cancel as above);
        ``None`` where they cannot go there together."""
        if self._closed or any(n > self.config.max_block_bytes for n in sizes):
            return None
        return self._ram.reserve_run(sizes, evict=not self._lower)

    def cancel_reservation(self, reservation: Reservation) -> bool:
        """Free ``reservation`` unless a put adopted it; whether it was freed."""
        return self._ram.cancel(reservation)

    # --- reads -----------------------------------------------------------------------------------------------------
    def get(self, key: BlockKey) -> Block | None:
        """The block (a copy), promoted into RAM when it came from below; ``None`` on a miss or if expired."""
        self._check_open()
        block = self._ram.get(key)
        if block is None:
            self._count_read(self._ram, hit=False)
            return self._get_below(key)
        if self._expired(block.meta):
            self._count_read(self._ram, hit=False)
            self._expire(key)
            return None
        self._touch(key, served_by=self._ram)
        return block

    def get_many(self, keys: Iterable[BlockKey]) -> list[Block | None]:
        return [self.get(k) for k in keys]

    def get_into(self, key: BlockKey, out: memoryview) -> BlockMeta | None:
        """Copy the block's payload into ``out`` (exactly ``meta.nbytes``); its meta, or ``None`` on a miss."""
        self._check_open()
        meta = self._ram.get_into(key, out)
        if meta is not None:
            if self._expired(meta):
                self._count_read(self._ram, hit=False)
                self._expire(key)
                return None
            self._touch(key, served_by=self._ram)
            return meta
        self._count_read(self._ram, hit=False)
        block = self._get_below(key)
        return None if block is None else copy_payload(block, out)

    def head(self, key: BlockKey) -> tuple[BlockMeta, TierId] | None:
        """The block's meta and the nearest tier holding it, without reading the payload."""
        self._check_open()
        for tier in self._tiers:
            try:
                meta = tier.head(key)
            except TierUnavailableError:
                self._count("unavailable")
                continue
            if meta is not None:
                if self._expired(meta):
                    self._expire(key)
                    return None
                return meta, tier.tier_id
        return None

    def lookup(self, keys: Sequence[BlockKey]) -> list[TierId | None]:
        """The nearest tier holding each key (``None``: not stored). Callers use the leading run of hits."""
        out: list[TierId | None] = []
        for key in keys:
            found = self.head(key)
            out.append(found[1] if found is not None else None)
        return out

    def contains(self, key: BlockKey) -> bool:
        return self.head(key) is not None

    def keys(self, namespace: Namespace | None = None) -> list[BlockKey]:
        """Every key any tier holds (in ``namespace`` when given)."""
        return self._keys_where(namespace, None)

    # --- leases (the shm fast path) --------------------------------------------------------------------------------
    def acquire(self, key: BlockKey, *, promote: bool = True) -> Lease | None:
        """A read lease on the block in the RAM arena, promoting it from below if need be; ``None`` on a miss or
        when RAM has no room (everything there pinned or leased). A caller that wants the block in any case calls
        :meth:`acquire_or_get`: ``acquire`` then ``get`` would read (and count) a miss twice.

        ``promote=False`` only looks in RAM and never touches a lower tier, so it does no disk or network I/O: an
        event loop can call it inline and hand the misses to a thread. Such a miss is counted only when the store
        has no tier below RAM: otherwise the caller asks again (``acquire`` or ``acquire_or_get``) and that read
        counts."""
        got = self._lease_or_copy(key, promote=promote)
        return got if isinstance(got, Lease) else None

    def acquire_or_get(self, key: BlockKey) -> Lease | Block | None:
        """A lease as :meth:`acquire` gives, else, when RAM has no room for the block, the copy read from below (as
        :meth:`get` gives); ``None`` on a miss. One read of the lower tiers, counted once."""
        return self._lease_or_copy(key, promote=True)

    def _lease_or_copy(self, key: BlockKey, *, promote: bool) -> Lease | Block | None:
        self._check_open()
        counted = False  # the read is counted once, however many rounds it takes
        block: Block | None = None
        for _ in range(3):  # a promoted block can be evicted again before we lease it; retry a little
            lease = self._ram.acquire(key)
            if lease is not None:
                if self._expired(lease.meta):
                    self._ram.release(lease)
                    if not counted:
                        self._count_read(self._ram, hit=False)
                    self._expire(key)
                    return None
                self._touch(key, served_by=None if counted else self._ram)
                return lease
            if not promote:
                if not self._lower:
                    self._count_read(self._ram, hit=False)
                return None
            if not counted:
                self._count_read(self._ram, hit=False)
            found = self._read_lower(key, count=not counted)
            if found is None:
                return None
            block, source = found
            if self._expired(block.meta):
                if not counted:
                    self._count_read(source, hit=False)
                self._expire(key)
                return None
            if not counted:
                self._count_read(source, hit=True)
                counted = True
            if not self._promote(block, source, force=True):
                return block  # RAM has no room: the copy already read
        return block

    def release(self, lease: Lease) -> bool:
        return self._ram.release(lease)

    def lease_view(self, lease: Lease) -> memoryview:
        """Read-only view of a leased block's bytes in process; valid until the lease is released."""
        return self._ram.lease_view(lease)

    @property
    def arena_path(self) -> str | None:
        """The shared-memory file backing the RAM arena (``None`` with anonymous memory)."""
        return self._ram.arena_path

    # --- pins ------------------------------------------------------------------------------------------------------
    def pin(self, key: BlockKey) -> bool:
        """Keep ``key`` from eviction in every tier (and from TTL expiry) until unpinned; the pin outlives restarts
        and is recorded even before the block arrives. ``True`` if the block is stored now."""
        self._check_open()
        with self._stripe(key):
            self._pins.add(key)
            self._ram.pin(key)
        return self.head(key) is not None

    def unpin(self, key: BlockKey) -> bool:
        """``True`` if ``key`` was pinned."""
        self._check_open()
        with self._stripe(key):
            was = self._pins.remove(key)
            self._ram.unpin(key)
        return was

    def pinned(self) -> frozenset[BlockKey]:
        return self._pins.keys()

    # --- maintenance -----------------------------------------------------------------------------------------------
    def evict(self, tier_id: TierId, nbytes: int) -> int:
        """Evict at least ``nbytes`` from one tier (never pinned blocks), demoting what lower tiers still lack;
        bytes freed. RAM evicts by its policy; other tiers least recently used first (store-wide recency)."""
        self._check_open()
        tier = self._by_id.get(tier_id)
        if tier is None:
            raise ValueError(f"no tier {tier_id!r}; tiers: {list(self._by_id)}")
        if tier is self._ram:
            return self._ram.evict(nbytes)
        with self._lock:
            candidates = self._catalog.least_recent_overall()
        freed = self._evict_keys(tier, candidates, nbytes)
        if freed < nbytes:  # blocks the catalog does not know (it can lag a tier that dropped a corrupt record)
            freed += self._evict_keys(tier, list(tier.keys()), nbytes - freed)
        return freed

    def _evict_keys(self, tier: Tier, keys: list[BlockKey], nbytes: int) -> int:
        freed = 0
        for key in keys:
            if freed >= nbytes:
                break
            if key in self._pins:
                continue
            with self._stripe(key):
                meta = tier.head(key)
                if meta is not None:
                    freed += self._evict_from_lower(tier, meta)
        return freed

    def expire(self) -> int:
        """Delete every expired block now (reads also drop them lazily); how many."""
        self._check_open()
        if not any(p.ttl_s is not None for p in self.config.namespaces.values()):
            return 0
        expired = 0
        seen: set[BlockKey] = set()
        for tier in self._tiers:
            try:
                keys = list(tier.keys())
            except TierUnavailableError:
                self._count("unavailable")
                continue
            for key in keys:
                if key in seen:
                    continue
                seen.add(key)
                policy = self.config.namespace_policy(key.namespace)
                if policy is None or policy.ttl_s is None:
                    continue
                meta = tier.head(key)
                if meta is not None and self._expired(meta):
                    expired += self._expire(key)
        return expired

    def compact(self) -> dict[TierId, object]:
        """Ask every tier that can compact (the disk tier reclaims deleted space) to do so; their results."""
        self._check_open()
        results: dict[TierId, object] = {}
        for tier in self._lower:
            if tier.capabilities.compacts:
                results[tier.tier_id] = tier.compact()
        return results

    def flush(self) -> None:
        """Write every block acknowledged so far to each write-back tier, then flush the tiers themselves.

        Raises the first tier error after trying every tier; what failed stays queued for the next flush."""
        self._check_open()
        error = self._drain(self._ram.version)
        for tier in self._lower:
            try:
                tier.flush()  # a no-op for tiers that do not buffer writes themselves
            except KVFabricError as exc:
                self._count("flush_errors", error=f"{tier.tier_id}: {exc}")
                error = error or exc
        if error is not None:
            raise error

    def start(self) -> None:
        """Start the background thread that drains write-back queues, keeps RAM under its high watermark and
        sweeps expired blocks, and the lower tiers' own background work. Stopped by :meth:`close`."""
        self._check_open()
        if self._flusher is not None:
            return
        for tier in self._lower:
            tier.start()  # a no-op for tiers without background work of their own
        self._flusher = threading.Thread(target=self._background, name="kvfabric-store-flusher", daemon=True)
        self._flusher.start()

    def close(self) -> None:
        """Stop the flusher, flush write-back tiers, close every tier. Idempotent. Raises a flush error after
        closing (the blocks it concerned were in RAM only and are lost with it)."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join()
        error: Exception | None = None
        try:
            self.flush()
        except Exception as exc:  # close the tiers regardless; the error is re-raised below
            error = exc
        self._closed = True
        for tier in [*self._lower, self._ram]:
            try:
                tier.close()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stats -----------------------------------------------------------------------------------------------------
    def tier_stats(self) -> dict[TierId, TierStats]:
        """Each tier's counters, except ``hits`` and ``misses``: those are the store's, counting only reads asked on
        behalf of clients (the tiers' own, ``tier(id).stats()``, also count the store's internal reads)."""
        with self._lock:
            reads = {tier_id: (r.hits, r.misses) for tier_id, r in self._reads.items()}
        out = {}
        for t in self._tiers:
            hits, misses = reads[t.tier_id]
            out[t.tier_id] = replace(t.stats(), hits=hits, misses=misses)
        return out

    def tier_conditions(self) -> dict[TierId, str]:
        """The tiers that refuse writes now, and why (a full disk); empty when every tier takes writes."""
        return {t.tier_id: c for t in self._tiers if (c := t.condition()) is not None}

    def tier(self, tier_id: TierId) -> Tier:
        """One of the store's tiers, for what only it can tell (the object tier's upload stats, the disk's usage).
        Write through the store, not through the tier, or the store's books go wrong."""
        try:
            return self._by_id[tier_id]
        except KeyError:
            raise ValueError(f"no tier {tier_id!r}; tiers: {list(self._by_id)}") from None

    def namespace_stats(self) -> dict[Namespace, NamespaceStats]:
        """Distinct blocks and raw bytes per namespace, and per model within it."""
        with self._lock:
            return self._catalog.stats()

    def store_stats(self) -> StoreStats:
        pending = {t.tier_id: self._ram.dirty_count(t.tier_id) for t in self._lower}
        with self._lock:
            for tier_id, queue in self._backlog.items():
                pending[tier_id] += len(queue)
            c = replace(self._counters)
        return replace(c, writeback_pending=pending, unavailable=c.unavailable + self._unavailable_inside_tiers())

    def _unavailable_inside_tiers(self) -> int:
        """Outage events a shared tier absorbs itself and never raises to the store: uploads that failed in its
        background uploader, reads it answered as misses because the store was down (the object tier)."""
        total = 0
        for objects in self._object_reports():
            total += objects.upload_failures + objects.unavailable_misses
        return total

    def _object_reports(self) -> list[ObjectTierStats]:
        """The upload reports of the tiers that upload in the background (``capabilities.buffers_writes``)."""
        return [o for t in self._lower if t.capabilities.buffers_writes and (o := t.info().objects) is not None]

    @property
    def tiers(self) -> list[TierId]:
        return [t.tier_id for t in self._tiers]

    def tier_capabilities(self) -> dict[TierId, TierCapabilities]:
        """What each tier is (persistent, shared, ...), nearest first: the admin API's tier view."""
        return {t.tier_id: t.capabilities for t in self._tiers}

    def upload_backlog_bytes(self) -> int:
        """Bytes accepted by tiers that upload in the background (the object tier) and not uploaded yet."""
        return sum(o.backlog_bytes for o in self._object_reports())

    def set_namespace_policy(self, namespace: Namespace, policy: NamespacePolicy | None) -> None:
        """Replace ``namespace``'s TTL and quota at runtime (``None``: back to the default, ``"*"``'s). Applies from
        the next put or read on; a lowered quota is met by the next put's quota eviction, not at once."""
        with self._lock:
            namespaces = dict(self.config.namespaces)
            if policy is None:
                namespaces.pop(namespace, None)
            else:
                namespaces[namespace] = policy
            self.config = replace(self.config, namespaces=namespaces)

    # --- validation and quotas -------------------------------------------------------------------------------------
    def _validated(self, block: Block) -> Block:
        """``block`` checked against its model spec and the store's limits, stamped with the store's clock."""
        meta = block.meta
        try:
            view = memoryview(block.payload)
        except TypeError:
            raise InvalidBlockError(f"block {meta.key}: payload must be a bytes-like buffer") from None
        if not view.c_contiguous:
            raise InvalidBlockError(f"block {meta.key}: payload must be C-contiguous")
        if view.nbytes > self.config.max_block_bytes:
            raise BlockTooLargeError(view.nbytes, self.config.max_block_bytes)
        spec = self._models.get(meta.key.model)
        if spec is None:
            raise UnknownModelError(meta.key.model.hex())
        for field, got, want in (
            ("dtype", meta.dtype, spec.dtype),
            ("shape", tuple(meta.shape), spec.block_shape),
            ("token_count", meta.token_count, spec.block_size),
        ):
            if got != want:
                raise InvalidBlockError(
                    f"block {meta.key}: {field} {got!r} does not match model {spec.model}'s {want!r}"
                )
        if view.nbytes != meta.nbytes:
            raise InvalidBlockError(f"block {meta.key}: payload is {view.nbytes} bytes, its shape needs {meta.nbytes}")
        return Block(replace(meta, shape=tuple(meta.shape), created_ms=self._now_ms()), block.payload)

    def _reserve(self, blocks: list[Block]) -> tuple[list[BlockKey], list[tuple[BlockKey, int | None]]]:
        """Check quotas, pick the victims that make room, and record ``blocks`` in the catalog, atomically.

        Returns the victims (already out of the catalog; the caller deletes them) and per block what to restore if
        its write fails. Raises ``QuotaExceededError`` having changed nothing."""
        sizes = {b.key: b.meta.nbytes for b in blocks}
        with self._lock:
            growth: dict[Namespace, int] = {}
            for key, nbytes in sizes.items():
                growth[key.namespace] = growth.get(key.namespace, 0) + nbytes - (self._catalog.size_of(key) or 0)
            victims: list[BlockKey] = []
            for namespace, grow in growth.items():
                policy = self.config.namespace_policy(namespace)
                if policy is None or policy.quota_bytes is None:
                    continue
                over = self._catalog.namespace_bytes(namespace) + grow - policy.quota_bytes
                freed = 0
                for key, nbytes in self._catalog.least_recent(namespace):
                    if freed >= over:
                        break
                    if key in sizes or key in self._pins:
                        continue
                    victims.append(key)
                    freed += nbytes
                if freed < over:
                    raise QuotaExceededError(namespace, over, policy.quota_bytes, freed)
            for key in victims:
                self._catalog.remove(key)
            undo = [(b.key, self._catalog.size_of(b.key)) for b in blocks]
            for key, nbytes in sizes.items():
                self._catalog.add(key, nbytes)
        return victims, undo

    def _unreserve(self, undo: list[tuple[BlockKey, int | None]]) -> None:
        with self._lock:
            for key, previous in undo:
                self._catalog.remove(key)
                if previous is not None:
                    self._catalog.add(key, previous)

    # --- the write path (caller holds the key's stripe) ------------------------------------------------------------
    def _write_making_room(self, block: Block) -> None:
        """:meth:`_write` under the key's stripe. If a lower tier that refuses writes when full (disk) is full,
        make room there (outside the stripe: eviction takes other keys' stripes) and try again, a few rounds at
        most: evicted space comes back only once compaction finds segments dead enough to rewrite."""
        for _ in range(ROOM_ROUNDS):
            try:
                with self._stripe(block.key):
                    self._write(block)
                return
            except _LowerTierFull as full:
                self._make_room(full.tier, block.meta.nbytes)
        try:
            with self._stripe(block.key):
                self._write(block)
        except _LowerTierFull as full:
            raise full.error from None

    def _make_room(self, tier: Tier, nbytes: int) -> None:
        """Evict a full lower tier's oldest unpinned blocks (copying down what tiers below still wait for), a
        1/``ROOM_FRACTION`` of its capacity at a time so a full disk is not compacted on every put, then compact
        it so the space is really reclaimed."""
        capacity = tier.stats().capacity_bytes or 0
        self.evict(tier.tier_id, max(nbytes, capacity // ROOM_FRACTION))
        tier.compact()  # a no-op for tiers that cannot
        self._count("room_made")

    def _write(self, block: Block) -> None:
        """Write-through tiers first (nearest first), then RAM with the write-back tiers it must feed as dirty.

        A write-back tier below a write-through tier that now holds the block is fed from that tier (the backlog),
        not from RAM, so RAM can evict the block without writing it anywhere."""
        dirty: list[TierId] = []
        queued: list[TierId] = []
        held_below = False  # some lower tier holds the block now
        for tier in self._lower:
            if self._write_policy[tier.tier_id] == WRITE_THROUGH:
                try:
                    self._put_lower(tier, block)
                    held_below = True
                    continue
                except TierUnavailableError:
                    if not tier.capabilities.shared:
                        raise
                    self._count("unavailable")  # a shared tier that is down degrades to write-back
            (queued if held_below else dirty).append(tier.tier_id)
        try:
            self._ram.put(block, dirty=frozenset(dirty))
        except TierFullError:
            if not self._lower:
                raise
            # RAM is full of pinned/leased blocks: skip it, and write down now what would have waited there.
            self._ram.delete(block.key)  # an older version must not shadow this one
            for tier_id in dirty:
                if held_below:
                    queued.append(tier_id)
                else:
                    self._put_lower(self._by_id[tier_id], block)
                    held_below = True
        if queued:
            with self._lock:
                for tier_id in queued:
                    self._queue(tier_id, block.key)

    def _put_lower(self, tier: Tier, block: Block) -> None:
        try:
            tier.put(block)
        except TierFullError as exc:
            # a full filesystem is not the tier's capacity: evicting its blocks would not make lasting room
            if tier.capabilities.evicts or isinstance(exc, DiskFullError):
                raise
            raise _LowerTierFull(tier, exc) from exc

    def _queue(self, tier_id: TierId, key: BlockKey) -> None:
        """Backlog ``key`` for ``tier_id`` (caller holds the store lock), dropping the oldest past the bound."""
        backlog = self._backlog[tier_id]
        backlog[key] = None
        backlog.move_to_end(key)
        while len(backlog) > self.config.writeback_backlog_max:
            backlog.popitem(last=False)
            self._counters.writeback_dropped += 1  # the store lock is held here

    def _after_write(self) -> None:
        high = self.config.ram_high_watermark * self._ram.capacity_bytes
        if self._ram.used_bytes <= high:
            return
        if self._flusher is not None:
            self._wake.set()
        else:
            self._relieve_ram()

    def _relieve_ram(self) -> int:
        """Above the high watermark, evict (demoting) down to the low one; bytes freed."""
        if self._ram.used_bytes <= self.config.ram_high_watermark * self._ram.capacity_bytes:
            return 0
        return self._ram.evict_to(int(self.config.ram_low_watermark * self._ram.capacity_bytes))

    def _on_ram_evict(self, block: Block, dirty: frozenset[TierId]) -> None:
        """Demotion (called under the RAM lock): write the evicted block to the nearest tier that lacks it and
        queue it for the write-back tiers below that one. Raising keeps the block in RAM."""
        key = block.key
        held_below = False
        for tier in self._lower:
            if tier.tier_id not in dirty:
                continue
            if held_below:
                with self._lock:
                    self._queue(tier.tier_id, key)
            else:
                tier.put(block)
                held_below = True
                self._count("demotions")
        if not held_below and not self._held_below(key):
            with self._lock:
                self._catalog.remove(key)  # it has left the store

    def _held_below(self, key: BlockKey) -> bool:
        for tier in self._lower:
            try:
                if tier.contains(key):
                    return True
            except TierUnavailableError:
                return True  # cannot tell: assume it is still there
        return False

    # --- the read path ---------------------------------------------------------------------------------------------
    def _get_below(self, key: BlockKey) -> Block | None:
        """A client's read that missed RAM (already counted there): read the nearest lower tier holding ``key``
        and promote the block."""
        found = self._read_lower(key, count=True)
        if found is None:
            return None
        block, source = found
        if self._expired(block.meta):
            self._count_read(source, hit=False)
            self._expire(key)
            return None
        self._promote(block, source, force=False)
        self._touch(key, served_by=source)
        return block

    def _read_lower(self, key: BlockKey, *, count: bool) -> tuple[Block, Tier] | None:
        """The block from the nearest lower tier holding it. With ``count``, each tier that could not serve it is
        counted as a miss; the caller counts the tier that did (after checking the block's TTL)."""
        for tier in self._lower:
            try:
                block = tier.get(key)
            except TierUnavailableError:
                self._count("unavailable")
                block = None
            if block is not None:
                return block, tier
            if count:
                self._count_read(tier, hit=False)
        return None

    def _promote(self, block: Block, source: Tier, *, force: bool) -> bool:
        """Copy a block read from ``source`` into RAM (and the tiers between); ``True`` if RAM has it now."""
        key = block.key
        if not force and not self._ram.admits(block.meta):
            self._count("promotions_refused")
            return False
        with self._stripe(key):
            if self._ram.contains(key):
                return True  # a put got there first, with data at least as new
            try:
                if not source.contains(key):
                    return False  # deleted or expired since we read it
            except TierUnavailableError:
                return False
            for tier in self._lower[: self._lower.index(source)]:
                try:
                    tier.put(block)
                except StoreError:
                    pass  # only a shortcut for the next read; the source still holds the block
            try:
                self._ram.put(block)
            except TierFullError:
                return False
        self._count("promotions")
        return True

    def _touch(self, key: BlockKey, *, served_by: Tier | None) -> None:
        """A client read got ``key``: refresh its recency, and count a hit for the tier that served it (``None``:
        already counted)."""
        with self._lock:
            self._catalog.touch(key)
            if served_by is not None:
                self._reads[served_by.tier_id].hits += 1

    def _count_read(self, tier: Tier, *, hit: bool) -> None:
        with self._lock:
            reads = self._reads[tier.tier_id]
            if hit:
                reads.hits += 1
            else:
                reads.misses += 1

    # --- removal ---------------------------------------------------------------------------------------------------
    def _remove_everywhere(self, key: BlockKey) -> bool:
        """Delete ``key`` from every tier and the store's books (caller holds its stripe)."""
        found = False
        error: KVFabricError | None = None
        for tier in self._tiers:
            try:
                found = tier.delete(key) or found
            except KVFabricError as exc:
                error = error or exc
        with self._lock:
            self._catalog.remove(key)
            for backlog in self._backlog.values():
                backlog.pop(key, None)
        if error is not None:
            raise error
        return found

    def _expired(self, meta: BlockMeta) -> bool:
        policy = self.config.namespace_policy(meta.key.namespace)
        if policy is None or policy.ttl_s is None or meta.key in self._pins:
            return False
        return self._now_ms() - meta.created_ms > policy.ttl_s * 1000

    def _expire(self, key: BlockKey) -> int:
        """Delete ``key`` if the nearest copy is still expired once its stripe is held (a fresh put may have
        replaced it meanwhile); 1 if it was."""
        with self._stripe(key):
            for tier in self._tiers:
                try:
                    meta = tier.head(key)
                except TierUnavailableError:
                    continue
                if meta is not None:
                    if not self._expired(meta):
                        return 0
                    break
            self._remove_everywhere(key)
        self._count("expired")
        return 1

    def _evict_from_lower(self, tier: Tier, meta: BlockMeta) -> int:
        """Evict one block from a lower tier (caller holds its stripe), first copying it to any tier below that
        still waits for it. Bytes freed."""
        key = meta.key
        below = self._lower[self._lower.index(tier) + 1 :]
        with self._lock:
            waiting = [t for t in below if key in self._backlog[t.tier_id]]
            for t in waiting:
                del self._backlog[t.tier_id][key]
        if waiting:
            block = tier.get(key)
            if block is not None:
                for target in waiting:
                    target.put(block)
                    self._count("demotions")
        if not tier.delete(key):
            return 0
        if not any(t.contains(key) for t in self._tiers if t is not tier):
            with self._lock:
                self._catalog.remove(key)
        return meta.nbytes

    def _keys_where(self, namespace: Namespace | None, model: ModelFingerprint | None) -> list[BlockKey]:
        self._check_open()
        with self._lock:
            keys = set(self._catalog.keys(namespace, model))
        for tier in self._tiers:
            try:
                keys.update(k for k in tier.keys(namespace) if model is None or k.model == model)
            except TierUnavailableError:
                self._count("unavailable")
        return sorted(keys, key=BlockKey.to_bytes)

    # --- write-back draining ---------------------------------------------------------------------------------------
    def _drain(self, max_version: int) -> KVFabricError | None:
        """Copy pending write-back blocks down, nearest tier first; the first error (the rest was tried)."""
        first: KVFabricError | None = None
        for tier in self._lower:
            for attempt in range(2):
                try:
                    self._drain_dirty(tier, max_version)
                    self._drain_backlog(tier)
                    break
                except TierFullError as exc:
                    if attempt == 0 and not tier.capabilities.evicts and not isinstance(exc, DiskFullError):
                        self._make_room(tier, 0)  # a full disk: evict its oldest and try again
                        continue
                    self._count("flush_errors", error=f"{tier.tier_id}: {exc}")
                    first = first or exc
                except KVFabricError as exc:
                    self._count("flush_errors", error=f"{tier.tier_id}: {exc}")
                    if isinstance(exc, TierUnavailableError):
                        self._count("unavailable")  # an outage, not only a failed flush
                    first = first or exc
                    break
        return first

    def _drain_dirty(self, tier: Tier, max_version: int) -> None:
        """Blocks dirty in RAM for ``tier`` (up to ``max_version``) -> ``tier``."""
        while batch := self._ram.dirty_blocks(tier.tier_id, FLUSH_BATCH, max_version):
            for block, version in batch:
                with self._stripe(block.key):
                    if not self._ram.is_dirty(block.key, tier.tier_id, version):
                        continue  # deleted, overwritten or demoted since the copy was taken
                    tier.put(block)
                    self._ram.mark_clean(block.key, tier.tier_id, version)

    def _drain_backlog(self, tier: Tier) -> None:
        """Keys queued for ``tier`` -> copied from the nearest tier above that holds them."""
        backlog = self._backlog[tier.tier_id]
        with self._lock:
            budget = len(backlog)  # what is queued now; later arrivals wait for the next round
        while budget > 0:
            with self._lock:
                keys = [backlog.popitem(last=False)[0] for _ in range(min(FLUSH_BATCH, len(backlog), budget))]
            if not keys:
                return
            budget -= len(keys)
            for i, key in enumerate(keys):
                try:
                    with self._stripe(key):
                        self._copy_down(key, tier)
                except KVFabricError:
                    with self._lock:
                        for k in reversed(keys[i:]):
                            backlog[k] = None
                            backlog.move_to_end(k, last=False)
                    raise

    def _copy_down(self, key: BlockKey, tier: Tier) -> None:
        block = None
        for source in self._lower[: self._lower.index(tier)]:
            block = source.get(key)
            if block is not None:
                break
        if block is None:
            block = self._ram.peek(key)
        if block is None:
            self._count("writeback_dropped")  # deleted everywhere above meanwhile: nothing to copy
            return
        tier.put(block)

    def _background(self) -> None:
        interval = self.config.flush_interval_s
        wait = interval
        next_expiry = time.monotonic() + max(interval, 1.0) * 10
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                error = self._drain(self._ram.version)
                self._relieve_ram()
                if time.monotonic() >= next_expiry:
                    self.expire()
                    next_expiry = time.monotonic() + max(interval, 1.0) * 10
            except Exception as exc:  # keep the flusher alive; the error is counted and visible in store_stats
                self._count("flush_errors", error=repr(exc))
                error = exc
            wait = interval if error is None else min(wait * 2, MAX_FLUSH_BACKOFF_S)

    # --- plumbing --------------------------------------------------------------------------------------------------
    def _count(self, counter: str, *, error: str | None = None) -> None:
        """Bump a store counter (callers do not hold the store lock)."""
        with self._lock:
            setattr(self._counters, counter, getattr(self._counters, counter) + 1)
            if error is not None:
                self._counters.last_flush_error = error

    def _stripe(self, key: BlockKey) -> threading.Lock:
        return self._stripes[int.from_bytes(key.prefix[:4], "little") % N_STRIPES]

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _rebuild_catalog(self) -> None:
        """Count what persistent tiers already hold (after a restart), oldest first in each namespace's LRU."""
        metas: dict[BlockKey, BlockMeta] = {}
        for tier in self._lower:
            if not tier.capabilities.persistent:
                continue
            try:
                for key in tier.keys():
                    if key not in metas and (meta := tier.head(key)) is not None:
                        metas[key] = meta
            except TierUnavailableError:
                self._count("unavailable")
        for meta in sorted(metas.values(), key=lambda m: m.created_ms):
            self._catalog.add(meta.key, meta.nbytes)


def _open_disk_tier(config: StoreConfig, events: EventSink | None) -> Tier:
    """The disk tier under ``data_dir/disk`` (``kvfabric.store.disk``)."""
    from kvfabric.store.disk import DiskTier  # imported here: only stores with a data dir load RocksDB

    if config.data_dir is None or config.disk_capacity is None:
        raise ConfigError("the disk tier needs data_dir and a non-zero disk_bytes")
    return DiskTier(
        config.data_dir / "disk", capacity_bytes=config.disk_capacity, fsync=config.fsync,
        group_commit_ms=config.group_commit_ms, codec=Codec.parse(config.disk_codec), source=config.node_id,
        events=events,
    )  # fmt: skip


def _open_object_tier(config: StoreConfig, events: EventSink | None) -> Tier:
    """The S3-compatible tier (``kvfabric.store.object``), its index rebuilt from the bucket's manifests. An
    unreachable store fails the open (``TierUnavailableError``) rather than starting a node that cannot see what S3
    holds."""
    from kvfabric.store.object import ObjectTier  # imported here: only stores with an object tier load boto3

    return ObjectTier.open(config.object, source=config.node_id, events=events)
