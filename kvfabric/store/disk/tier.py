"""DiskTier: block records in append-only segment files on NVMe, indexed by RocksDB.

Put: encode the record, reserve an aligned slot at the end of the active segment, pwritev ``[header, payload,
padding]`` (no payload copy for RAW), fdatasync per the fsync policy, then stage the index entry (visible at once;
written to RocksDB with the high-water mark once ``INDEX_STAGE_ENTRIES`` are staged). Get: one index lookup (a dict
hit for recently used keys, else a RocksDB get), one preadv of ``[header, payload]`` into fresh (or the caller's)
memory, a comparison of the header bytes with the index's copy and an XXH3 of the payload. See
``docs/disk-format.md``.

Disk full: a write that fails for want of space (segment, fdatasync or RocksDB) raises ``DiskFullError`` and puts
the tier in the *full* state: the space reserve is released (``reserve.py``) and a RocksDB index stuck in its
sticky error is reopened, so reads, deletes and compaction go on; puts are refused at once (no write is tried)
until the filesystem has room again, checked on each put and each ``condition()``; then the reserve is taken back
and puts resume, with no restart.

Concurrency: ``_append_lock`` serialises slot reservation and the pwrite (so the file is written in reservation
order and a failed write is always the tail, which can be cut); ``_cond`` guards the index writes and all in-memory
state and is held only briefly. fdatasync and reads run outside both.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvfabric.codec import Codec, decode_payload
from kvfabric.errors import (
    DiskFullError,
    InvalidBlockError,
    KVFabricError,
    MalformedRecordError,
    RecordError,
    StoreError,
    TierFullError,
)
from kvfabric.events import EventSink
from kvfabric.ids import BlockKey, Namespace, TierId
from kvfabric.record import Block, BlockMeta, RecordHeader, checksum, decode_header, encode_record_parts
from kvfabric.store.disk.cache import FifoCache
from kvfabric.store.disk.compaction import COPY_BATCH_BYTES, CompactionResult, select_segments
from kvfabric.store.disk.durability import FsyncPolicy, GroupCommitter, SyncGroup
from kvfabric.store.disk.index import BlockIndex, IndexEntry
from kvfabric.store.disk.recovery import RecoveryReport, recover
from kvfabric.store.disk.reserve import DEFAULT_RESERVE_BYTES, FULL_ERRNOS, SpaceReserve, free_bytes
from kvfabric.store.disk.sealed import SealedSegmentHook, SegmentEntry
from kvfabric.store.disk.segment import (
    ALIGN,
    Position,
    Segment,
    SegmentScan,
    align_up,
    fsync_dir,
    list_segment_ids,
    read_into,
    write_record,
)
from kvfabric.store.tier import Tier, TierCapabilities, TierInfo, copy_payload

DEFAULT_SEGMENT_BYTES = 256 << 20
HEADER_CACHE_ENTRIES = 16384
"""Parsed record headers kept per tier (keyed by the exact header bytes), so a hot read skips the parse."""
INDEX_STAGE_ENTRIES = 64
INDEX_STAGE_BYTES = 64 << 20
"""Index entries of durable records are staged in memory and written to RocksDB in batches of up to this many
entries or record bytes: a crash loses at most this much index, which recovery rebuilds by rescanning that many
record bytes from the high-water mark."""
DISK = TierId("disk")
log = logging.getLogger(__name__)
_RECENT_PRUNE = 4096
_MIN_RESUME_FREE = 1 << 20
"""Free bytes a full tier needs before puts resume when it keeps no reserve."""


class _HeaderCache(FifoCache[bytes, tuple[RecordHeader, bytes]]):
    """Parsed headers and the key bytes they name, by exact header bytes.

    A put primes the header it wrote (it knows every field without parsing), so a block fetched soon after it
    was published, the disaggregated prefill -> decode pattern, is never parsed; other reads parse once.
    """

    __slots__ = ()

    def parse(self, header: bytes) -> tuple[RecordHeader, bytes]:
        """Parse a header the cache missed (readers try the dict's own ``get`` first) and keep it."""
        head = decode_header(header)
        parsed = (head, head.meta.key.to_bytes())
        self.put(header, parsed)
        return parsed


def _namespace_prefix(namespace: Namespace | None) -> bytes:
    """The leading bytes of ``BlockKey.to_bytes()`` shared by every key of ``namespace`` (all keys for None)."""
    if namespace is None:
        return b""
    ns = namespace.encode()
    return bytes([len(ns)]) + ns


@dataclass(frozen=True, slots=True)
class DiskState:
    """The disk tier's live state, for readiness, metrics and the admin API."""

    full: bool
    """Puts are refused for want of space on the filesystem (reads and deletes are served)."""
    reason: str | None
    """The write failure that made the tier full."""
    full_since: float | None
    """Unix time the tier became full."""
    free_bytes: int
    """Free space on the filesystem (as this process may use it)."""
    resume_free_bytes: int
    """Free space a full tier waits for before puts resume."""
    reserve_bytes: int
    reserve_held: bool
    full_episodes: int
    """Times the tier became full since it opened."""
    refused_puts: int
    """Put calls refused while full."""
    index_reopens: int
    """Times the RocksDB index was reopened to clear its sticky write error."""


@dataclass(slots=True)
class _Slot:
    """A record written to a segment, waiting to become durable and then indexed."""

    key_bytes: bytes
    segment: Segment
    position: Position
    entry: IndexEntry
    meta: BlockMeta
    expect: Position | None
    """For a compaction copy: index it only if the key still points here."""
    group: SyncGroup | None = None
    current: IndexEntry | None = None
    """The key's entry when the slot was reserved; still right at commit if the index saw no write since."""
    index_writes: int = -1
    """``BlockIndex.writes`` when ``current`` was read."""


class DiskTier(Tier):
    """The NVMe tier. Persistent; refuses writes when full (``TierFullError``) rather than evicting."""

    capabilities = TierCapabilities(persistent=True, verifies_reads=True, compacts=True)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capacity_bytes: int | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: str | FsyncPolicy = FsyncPolicy.GROUP,
        group_commit_ms: float = 2.0,
        codec: str | Codec = Codec.RAW,
        on_segment_sealed: SealedSegmentHook | None = None,
        tier_id: TierId = DISK,
        source: str = "local",
        events: EventSink | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    ) -> None:
        """``reserve_bytes`` of the filesystem are kept back (a preallocated file in ``path``) for deletes,
        compaction and a RocksDB reopen once the disk is full; a full tier resumes puts with twice that free."""
        super().__init__(tier_id, source=source, events=events)
        if segment_bytes < ALIGN or segment_bytes % ALIGN:
            raise ValueError(f"segment_bytes must be a positive multiple of {ALIGN}, got {segment_bytes}")
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if group_commit_ms < 0:
            raise ValueError(f"group_commit_ms must be >= 0, got {group_commit_ms}")
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.segment_bytes = segment_bytes
        self.fsync_policy = FsyncPolicy.parse(fsync)
        self.codec = Codec.parse(codec)
        self.on_segment_sealed = on_segment_sealed
        self._segment_dir = self.path / "segments"
        if not self._segment_dir.is_dir():
            self._segment_dir.mkdir(parents=True)
            fsync_dir(self.path)
        self._committer = GroupCommitter(group_commit_ms / 1000.0)
        self._headers = _HeaderCache(HEADER_CACHE_ENTRIES)
        self._append_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._lock = threading.Lock()
        """``_cond``'s own lock, taken directly on the read path (``with`` on a Condition adds a Python call)."""
        self._cond = threading.Condition(self._lock)
        self._pending: set[Position] = set()
        self._recent: dict[bytes, Position] = {}
        """Latest reserved position per key while ops may still be pending (pruned below the oldest pending)."""
        self._reads = 0
        self._closing = False
        self._closed = False
        self._segments: dict[int, Segment] = {}
        self._reserve = SpaceReserve(self.path, reserve_bytes)
        self._resume_free = 2 * reserve_bytes or _MIN_RESUME_FREE
        self._full: str | None = None
        self._full_since: float | None = None
        self._full_episodes = 0
        self._refused_puts = 0
        self._index = BlockIndex(self.path / "index")
        try:
            self.recovery = self._open_segments()
            if not self._reserve.take():
                self._enter_full_locked(f"less than {reserve_bytes} bytes free for the space reserve at open")
        except BaseException:
            self._release_files()
            raise
        r = self.recovery
        repaired = r.reindexed or r.dropped or r.truncated_bytes
        log.log(
            logging.INFO if repaired else logging.DEBUG,
            "disk tier at %s: %d blocks; recovery scanned %d bytes from %s, re-indexed %d, dropped %d, cut %d torn "
            "bytes",
            self.path, self._stats.blocks, r.scanned_bytes, tuple(r.scanned_from), r.reindexed, r.dropped,
            r.truncated_bytes,
        )  # fmt: skip

    # --- opening -----------------------------------------------------------------------------------------------
    def _open_segments(self) -> RecoveryReport:
        for seg_id in list_segment_ids(self._segment_dir):
            self._segments[seg_id] = Segment.open(self._segment_dir, seg_id)
        if not self._segments:
            hwm = self._index.hwm()
            first = Segment.create(self._segment_dir, (hwm.segment if hwm else 0) + 1)
            self._segments[first.id] = first
        state = recover(self._index, self._segments)
        for seg in self._segments.values():
            seg.live_bytes = state.live_bytes.get(seg.id, 0)
            seg.sealed = True
            seg.records = None
        self._active = self._segments[max(self._segments)]
        self._active.sealed = False
        self._active.records = state.newest_records if self.on_segment_sealed else None
        self._disk_used = sum(s.size for s in self._segments.values())
        self._stats.blocks = state.blocks
        self._stats.bytes = state.bytes
        self._stats.capacity_bytes = self.capacity_bytes
        return state.report

    # --- the Tier contract -------------------------------------------------------------------------------------
    def put(self, block: Block) -> None:
        self._store([block])

    def put_many(self, blocks: Iterable[Block]) -> None:
        self._store(list(blocks))

    def get(self, key: BlockKey) -> Block | None:
        found = self._acquire(key)
        if found is None:
            return None
        kb, entry, seg = found
        ok = False
        try:
            head = self._own_header(entry, kb)
            payload = np.empty(entry.payload_len, dtype=np.uint8)
            ok = self._read_verified(seg, entry, payload)
        except RecordError:
            pass
        finally:
            raw_hit = ok and head.codec is Codec.RAW
            self._release(seg, entry.record_len, hit=raw_hit)
        if raw_hit:  # the common case first: a RAW record is its own payload
            return Block(head.meta, memoryview(payload))
        if not ok:
            self._drop_corrupt(kb, entry)
            return None
        try:
            raw = decode_payload(head.codec, memoryview(payload), head.raw_len, head.meta.dtype.itemsize)
        except RecordError:
            self._drop_corrupt(kb, entry)
            return None
        with self._lock:
            self._stats.hits += 1
        return Block(head.meta, raw if isinstance(raw, bytes) else memoryview(raw))

    def get_into(self, key: BlockKey, out: memoryview) -> BlockMeta | None:
        """Read the payload straight into ``out`` (preadv, no intermediate copy, RAW codec); the checksum is
        verified on ``out`` itself. On a checksum failure ``out`` holds garbage and ``None`` is returned."""
        found = self._acquire(key)
        if found is None:
            return None
        kb, entry, seg = found
        dst = memoryview(out).cast("B")
        ok = False
        try:
            try:
                head = self._own_header(entry, kb)
            except RecordError:
                head = None
            if head is not None and len(dst) != head.meta.nbytes:
                raise ValueError(f"destination is {len(dst)} bytes, block {key} needs {head.meta.nbytes}")
            in_place = head is not None and head.codec is Codec.RAW
            ok = in_place and self._read_verified(seg, entry, dst)
        finally:
            self._release(seg, entry.record_len if ok else 0, hit=ok)
        if head is not None and not in_place:  # compressed: decode through a temporary, then copy
            block = self.get(key)
            return None if block is None else copy_payload(block, dst)
        if not ok or head is None:
            self._drop_corrupt(kb, entry)
            return None
        return head.meta

    def head(self, key: BlockKey) -> BlockMeta | None:
        kb = key.to_bytes()
        with self._cond:
            self._check_open()
            entry = self._index.get(kb)
        if entry is None:
            return None
        try:
            return self._own_header(entry, kb).meta
        except RecordError:
            self._drop_corrupt(kb, entry)
            return None

    def contains(self, key: BlockKey) -> bool:
        with self._cond:
            self._check_open()
            return self._index.get(key.to_bytes()) is not None

    def delete(self, key: BlockKey) -> bool:
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Iterable[BlockKey]) -> int:
        """Delete blocks; with fsync "always"/"group" the deletion is durable when this returns.

        A record newer than the durable high-water mark would be re-indexed by recovery, so a delete first waits
        until no write older than the key's newest record is still in flight; then one synced index write
        removes the entries and moves the high-water mark past every record of the deleted keys.
        """
        kbs = list(dict.fromkeys(k.to_bytes() for k in keys))
        with self._cond:
            self._check_open()
            while True:
                found = {kb: e for kb in kbs if (e := self._index.get(kb)) is not None}
                if not found:
                    return 0
                newest = max(max(e.position, self._recent.get(kb, e.position)) for kb, e in found.items())
                if not self._pending or min(self._pending) > newest:
                    break
                self._cond.wait()
            self._index_write_locked(deletes=list(found), hwm=self._hwm_locked())
            for entry in found.values():
                self._unaccount_locked(entry)
            self._stats.deletes += len(found)
        if self.fsync_policy is not FsyncPolicy.NONE:
            self._index.sync()
        for kb in found:
            self._emit_removed(BlockKey.from_bytes(kb))
        return len(found)

    def keys(self, namespace: Namespace | None = None) -> Iterator[BlockKey]:
        with self._cond:
            self._check_open()
            self._write_staged_locked()
        for kb in self._index.keys(_namespace_prefix(namespace)):
            yield BlockKey.from_bytes(kb)

    def iter_created_ms(self, namespace: Namespace | None = None) -> Iterator[tuple[BlockKey, int, int]]:
        """``(key, created_ms, stored bytes)`` of every block, from the index alone (no header parse, no disk
        read): what oldest-first eviction and TTL sweeps need, in one pass."""
        with self._cond:
            self._check_open()
            self._write_staged_locked()
        for kb, entry in self._index.entries_with_prefix(_namespace_prefix(namespace)):
            yield BlockKey.from_bytes(kb), entry.created_ms, entry.payload_len

    def close(self) -> None:
        with self._cond:
            if self._closing:
                while not self._closed:
                    self._cond.wait()
                return
            self._closing = True
            while self._pending or self._reads:
                self._cond.wait()
        try:
            for seg in self._segments.values():
                os.fdatasync(seg.fd)
            self._index.write(hwm=self._active.position, sync=True)
        finally:
            self._release_files()
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    # --- disk-tier specifics -----------------------------------------------------------------------------------
    def compact(self, min_live_fraction: float = 0.5) -> CompactionResult:
        """Rewrite the live records of sealed segments whose live fraction is below ``min_live_fraction`` into the
        active segment and delete those files.

        On a full disk (the reserve released) it reclaims what it can: segments with nothing live are removed
        without copying, and it stops at the first segment whose copies find no room.

        Crash-safe: a copy is indexed only after it is durable (always fdatasync'd, whatever the policy); the index
        is synced before the old file is unlinked. Copies are exempt from ``capacity_bytes`` (a run frees more
        than it writes). Blocks written or deleted meanwhile are left alone.
        """
        with self._compact_lock:
            with self._cond:
                self._check_open()
                victims = select_segments(list(self._segments.values()), min_live_fraction)
                for seg in victims:
                    seg.readers += 1
                    self._reads += 1
            removed = reclaimed = moved = corrupt = 0
            try:
                for seg in victims:
                    size = seg.size
                    try:
                        n_moved, n_corrupt, copied = self._compact_segment(seg)
                    except DiskFullError as exc:  # no room for this one's copies: keep what was reclaimed so far
                        self._enter_full(str(exc))
                        log.warning("disk tier at %s: compaction stopped, no room to copy: %s", self.path, exc)
                        break
                    moved += n_moved
                    corrupt += n_corrupt
                    if self._retire(seg):
                        removed += 1
                        reclaimed += size - copied
            finally:
                for seg in victims:
                    self._release(seg)
            return CompactionResult(removed, reclaimed, moved, corrupt)

    def condition(self) -> str | None:
        """Why the tier refuses puts now (the disk is full), or ``None``. A full tier whose filesystem has room
        again resumes here as well as on the next put, so readiness recovers without traffic."""
        if self._full is None:
            return None
        try:
            self._check_room()
        except DiskFullError as exc:
            return str(exc)
        return None

    def info(self) -> TierInfo:
        return TierInfo(codec=self.codec, recovery=self.recovery, disk=self.disk_state())

    def disk_state(self) -> DiskState:
        condition = self.condition()
        with self._cond:
            return DiskState(
                condition is not None, self._full, self._full_since, free_bytes(self.path), self._resume_free,
                self._reserve.nbytes, self._reserve.held, self._full_episodes, self._refused_puts,
                self._index.reopens,
            )  # fmt: skip

    def disk_usage(self) -> int:
        """Bytes of segment files (live, dead and padding); what ``capacity_bytes`` limits."""
        with self._cond:
            return self._disk_used

    def segment_paths(self) -> list[Path]:
        """Every segment file, oldest first (the last one is active)."""
        with self._cond:
            return [self._segments[i].path for i in sorted(self._segments)]

    def sealed_segments(self) -> list[Path]:
        """Segment files that will not change again (until compaction removes them), oldest first."""
        with self._cond:
            return [s.path for i, s in sorted(self._segments.items()) if s.sealed and s.pending == 0]

    def segment_entries(self, path: Path) -> list[SegmentEntry]:
        """The live records of one segment file, by walking its headers and checking each against the index."""
        with self._cond:
            self._check_open()
            seg = next((s for s in self._segments.values() if s.path == Path(path)), None)
            if seg is None:
                raise StoreError(f"disk tier at {self.path}: no segment file {path}")
            seg.readers += 1
            self._reads += 1
        try:
            records = {
                rec.offset: rec.header.meta.key.to_bytes() for rec in SegmentScan(seg.fd, 0, verify_payloads=False)
            }
        finally:
            self._release(seg)
        return self._live_entries(seg.id, records)

    # --- write path --------------------------------------------------------------------------------------------
    def _store(self, blocks: list[Block]) -> None:
        if self._full is not None:
            self._check_room()
        encoded = []
        for block in blocks:
            try:
                header, stored, crc = encode_record_parts(block, self.codec)
            except ValueError as exc:
                raise InvalidBlockError(f"block {block.key}: {exc}") from exc
            encoded.append((block.key.to_bytes(), header, stored, crc, block.meta))
        slots: list[_Slot] = []
        accepted = 0
        failure: KVFabricError | None = None
        for kb, header, stored, crc, meta in encoded:  # on a failure, what was written before it still gets stored
            try:
                slot = self._append(kb, header, stored, crc, meta, expect=None)
            except KVFabricError as exc:
                failure = exc
                break
            if slot is not None:
                slots.append(slot)
            accepted += 1
        try:
            self._make_durable(slots, force=False)
            self._commit(slots, puts=accepted)
        except DiskFullError as exc:
            self._enter_full(str(exc))
            raise
        if failure is not None:
            if isinstance(failure, DiskFullError):
                self._enter_full(str(failure))
            raise failure

    def _append(
        self,
        kb: bytes,
        header: bytes,
        stored: bytes | memoryview,
        crc: int,
        meta: BlockMeta,
        *,
        expect: Position | None,
    ) -> _Slot | None:
        """Reserve a slot at the end of the active segment and write the record there. ``None`` when there is
        nothing to write: a put whose exact record (same header: same checksum, same creation time) is already
        indexed, or a compaction copy whose ``expect`` no longer holds.

        The whole put path takes the state lock once before the write (checks and reservation together) and once
        after the sync (``_commit``): per-operation work is what separates a 256 KiB put from a bare pwrite."""
        rec_len = len(header) + len(stored)
        span = align_up(rec_len)
        sealed: Segment | None = None
        with self._append_lock:
            with self._lock:
                self._check_open()
                current = self._index.get(kb)
                index_writes = self._index.writes
                if expect is None:
                    if current is not None and current.header == header:
                        return None
                    if self.capacity_bytes is not None and self._disk_used + span > self.capacity_bytes:
                        raise TierFullError(
                            f"disk tier at {self.path}: {self._disk_used} + {span} bytes exceeds capacity "
                            f"{self.capacity_bytes}"
                        )
                elif current is None or current.position != expect or kb in self._recent:
                    return None  # rewritten, deleted or being rewritten since compaction read it
                seg: Segment | None = self._active
                if seg.size > 0 and seg.size + span > self.segment_bytes:
                    seg = None  # rotate first (outside the state lock: it creates and fsyncs a file)
                else:
                    pos = self._reserve_locked(seg, kb, span)
            if seg is None:
                sealed = self._rotate()
                with self._lock:
                    seg = self._active
                    pos = self._reserve_locked(seg, kb, span)
            try:
                write_record(seg.fd, pos.offset, header, stored, span)
            except OSError as exc:
                self._abort_append(seg, pos, span)
                raise self._io_error(exc, f"writing {rec_len} bytes to {seg.path}") from exc
            except BaseException:
                self._abort_append(seg, pos, span)
                raise
            group = self._committer.join(seg) if self.fsync_policy is FsyncPolicy.GROUP else None
        if sealed is not None:
            self._announce(sealed)
        entry = IndexEntry(seg.id, pos.offset, len(header), len(stored), crc, meta.created_ms, header)
        if expect is None and type(meta.shape) is tuple:
            self._headers.put(header, (RecordHeader(meta, self.codec, meta.nbytes, len(stored), crc, len(header)), kb))
        return _Slot(kb, seg, pos, entry, meta, expect, group, current, index_writes)

    def _reserve_locked(self, seg: Segment, kb: bytes, span: int) -> Position:
        """Claim ``span`` bytes at the end of ``seg`` for ``kb``'s record; pending until committed or abandoned."""
        offset = seg.size
        pos = Position(seg.id, offset)
        seg.size = offset + span
        seg.pending += 1
        self._disk_used += span
        self._pending.add(pos)
        self._recent[kb] = pos
        if seg.records is not None:
            seg.records[offset] = kb
        return pos

    def _rotate(self) -> Segment | None:
        """Start a new active segment (caller holds the append lock); returns the old one if it is ready to be
        announced as sealed."""
        try:
            new = Segment.create(self._segment_dir, self._active.id + 1)
        except OSError as exc:
            raise self._io_error(exc, f"creating segment {self._active.id + 1} in {self._segment_dir}") from exc
        if self.on_segment_sealed is None:
            new.records = None
        with self._cond:
            old = self._active
            old.sealed = True
            self._segments[new.id] = new
            self._active = new
            return self._sealed_ready_locked(old)

    def _abort_append(self, seg: Segment, pos: Position, span: int) -> None:
        """Undo a reservation whose write failed. The caller still holds the append lock, so the slot is the tail
        of the file and cutting it leaves no hole."""
        try:
            os.ftruncate(seg.fd, pos.offset)
            cut = True
        except OSError:
            cut = False  # the bytes stay as dead space; they are never indexed
        with self._cond:
            if cut:
                seg.size = pos.offset
                self._disk_used -= span
            seg.pending -= 1
            self._pending.discard(pos)
            if seg.records is not None:
                seg.records.pop(pos.offset, None)
            self._pending_changed_locked()

    def _make_durable(self, slots: list[_Slot], *, force: bool) -> None:
        """Return once every slot's bytes are durable (per policy, or always when ``force``); on failure abandon
        the slots (they are never indexed) and raise."""
        if not slots:
            return
        try:
            if force or self.fsync_policy is FsyncPolicy.ALWAYS:
                for seg in {id(s.segment): s.segment for s in slots}.values():
                    os.fdatasync(seg.fd)
            elif self.fsync_policy is FsyncPolicy.GROUP:
                for group in {id(s.group): s.group for s in slots if s.group is not None}.values():
                    self._committer.wait(group)
        except OSError as exc:
            self._abandon(slots)
            raise self._io_error(exc, "fdatasync of segment") from exc
        except BaseException:
            self._abandon(slots)
            raise

    def _abandon(self, slots: list[_Slot]) -> None:
        ready = []
        with self._cond:
            for s in slots:
                self._pending.discard(s.position)
                s.segment.pending -= 1
                ready.append(self._sealed_ready_locked(s.segment))
            self._pending_changed_locked()
        for seg in ready:
            if seg is not None:
                self._announce(seg)

    def _commit(self, slots: list[_Slot], *, puts: int = 0) -> None:
        """Index durable slots: a put wins over the key's current entry only if it is newer (write order), a
        compaction copy only if the key still points at the original. The batch's entries are staged (at most one
        RocksDB write, when a stage batch fills); ``puts`` (the accepted puts, slots or not) is counted under the
        same lock."""
        stored: list[BlockMeta] = []
        ready: list[Segment] = []
        with self._lock:
            self._stats.puts += puts
            if not slots:
                return
            for s in slots:
                self._pending.discard(s.position)
                s.segment.pending -= 1
                self._stats.bytes_written += s.entry.record_len
            current: dict[bytes, IndexEntry | None] = {}
            changes: list[tuple[_Slot, IndexEntry | None]] = []
            writes = self._index.writes
            for s in slots:
                if s.key_bytes in current:
                    cur = current[s.key_bytes]
                elif s.index_writes == writes:
                    cur = s.current  # nothing was indexed since the slot read it: skip a second lookup
                else:
                    cur = self._index.get(s.key_bytes)
                if s.expect is None:
                    apply = cur is None or cur.position < s.position
                else:
                    apply = cur is not None and cur.position == s.expect
                if apply:
                    changes.append((s, cur))
                    current[s.key_bytes] = s.entry
            entries = [(s.key_bytes, s.entry) for s, _ in changes]
            index = self._index
            try:
                if (
                    index.staged + len(entries) < INDEX_STAGE_ENTRIES
                    and index.staged_bytes + sum(s.entry.record_len for s, _ in changes) < INDEX_STAGE_BYTES
                ):
                    index.stage(entries)  # durable records: recovery finds them again if these entries are lost
                else:
                    index.write(puts=entries, hwm=self._hwm_locked())
            finally:
                self._pending_changed_locked()
                ready = [seg for s in slots if (seg := self._sealed_ready_locked(s.segment)) is not None]
            for s, cur in changes:
                if cur is not None:
                    self._unaccount_locked(cur)
                self._stats.blocks += 1
                self._stats.bytes += s.entry.payload_len
                s.segment.live_bytes += s.entry.span
                if s.expect is None:
                    stored.append(s.meta)
        for seg in ready:
            self._announce(seg)
        if self.events is not None:
            for meta in stored:
                self._emit_stored(meta)

    def _write_staged_locked(self) -> None:
        """Write staged index entries to RocksDB (before iterating it, or before a sync that must cover them)."""
        if self._index.staged:
            self._index_write_locked(hwm=self._hwm_locked())

    def _index_write_locked(self, **batch: object) -> None:
        """An index write that frees (deletes, staged entries of durable records) or must not fail for a stuck
        index: if RocksDB refuses it, the tier goes full when that was for space (releasing the reserve), the index
        is reopened, and the write is tried once more."""
        try:
            self._index.write(**batch)  # type: ignore[arg-type]
            return
        except DiskFullError as exc:
            self._enter_full_locked(str(exc))
        except StoreError:
            if not self._index.broken:
                raise
        if self._index.broken:
            self._index.reopen()
        self._index.write(**batch)  # type: ignore[arg-type]

    def _hwm_locked(self) -> Position:
        """Every record before this position has had its effect on the index."""
        return min(self._pending) if self._pending else self._active.position

    def _pending_changed_locked(self) -> None:
        if not self._pending:
            self._recent.clear()
        elif len(self._recent) > _RECENT_PRUNE:
            oldest = min(self._pending)
            self._recent = {kb: p for kb, p in self._recent.items() if p >= oldest}
        self._cond.notify_all()

    def _unaccount_locked(self, entry: IndexEntry) -> None:
        self._stats.blocks -= 1
        self._stats.bytes -= entry.payload_len
        seg = self._segments.get(entry.segment)
        if seg is not None:
            seg.live_bytes -= entry.span

    # --- sealed segments ---------------------------------------------------------------------------------------
    def _sealed_ready_locked(self, seg: Segment) -> Segment | None:
        """``seg`` if it is sealed, quiet and not yet announced (at most once per segment)."""
        if seg.sealed and seg.pending == 0 and seg.records is not None and not seg.retired:
            return seg
        return None

    def _announce(self, seg: Segment) -> None:
        with self._cond:
            records, seg.records = seg.records, None
            if records is None or self.on_segment_sealed is None:
                return
            seg.readers += 1
            self._reads += 1
        try:
            if self.fsync_policy is FsyncPolicy.NONE:
                os.fdatasync(seg.fd)  # whoever ships the file gets bytes that are on disk
        finally:
            self._release(seg)
        self.on_segment_sealed(seg.path, self._live_entries(seg.id, records))

    def _live_entries(self, seg_id: int, records: dict[int, bytes]) -> list[SegmentEntry]:
        out = []
        for offset in sorted(records):
            kb = records[offset]
            with self._cond:
                entry = self._index.get(kb)
            if entry is not None and entry.position == (seg_id, offset):
                out.append(
                    SegmentEntry(
                        BlockKey.from_bytes(kb),
                        offset,
                        entry.record_len,
                        entry.header_len,
                        entry.checksum,
                        entry.meta(),
                    )
                )
        return out

    # --- read path ---------------------------------------------------------------------------------------------
    def _acquire(self, key: BlockKey) -> tuple[bytes, IndexEntry, Segment] | None:
        """The key's index bytes, entry and segment, pinned open for reading; counts a miss when absent."""
        kb = key.to_bytes()
        with self._lock:
            self._check_open()
            entry = self._index.get(kb)
            seg = None if entry is None else self._segments.get(entry.segment)
            if seg is None:
                self._stats.misses += 1
                return None
            seg.readers += 1
            self._reads += 1
            return kb, entry, seg

    def _release(self, seg: Segment, read_bytes: int = 0, *, hit: bool = False) -> None:
        """Unpin ``seg`` after a read (closing a retired segment's fd with its last reader) and count the read."""
        with self._lock:
            seg.readers -= 1
            self._reads -= 1
            self._stats.bytes_read += read_bytes
            self._stats.hits += hit
            if seg.retired and seg.readers == 0 and seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1
            if self._closing:
                self._cond.notify_all()  # close() waits for reads to drain

    def _own_header(self, entry: IndexEntry, kb: bytes) -> RecordHeader:
        """The entry's record header, which must name the key it is filed under (a mix-up is never served)."""
        head, owner = self._headers.get(entry.header) or self._headers.parse(entry.header)
        if owner != kb:
            raise MalformedRecordError(f"index entry for {BlockKey.from_bytes(kb)} holds a record of {head.meta.key}")
        return head

    def _read_verified(self, seg: Segment, entry: IndexEntry, payload: np.ndarray | memoryview) -> bool:
        """One preadv of the record's header (into a scratch buffer) and payload (into ``payload``, a flat byte
        buffer); true only if the header bytes equal the index's copy and the payload's checksum matches."""
        header = bytearray(entry.header_len)
        try:
            # one preadv is the rule; read_into resumes the rare short read
            complete = os.preadv(seg.fd, (header, payload), entry.offset) == entry.record_len or read_into(
                seg.fd, entry.offset, [header, payload]
            )
        except OSError as exc:
            raise StoreError(f"disk tier at {self.path}: reading {seg.path} at {entry.offset}: {exc}") from exc
        return complete and header == entry.header and checksum(payload) == entry.checksum

    def _drop_corrupt(self, kb: bytes, entry: IndexEntry) -> None:
        """A record failed verification: never serve it, count it, forget it, announce it."""
        with self._cond:
            self._stats.corrupt += 1
            self._stats.misses += 1
            if self._closing:
                return
            cur = self._index.get(kb)
            if cur is None or cur.position != entry.position:
                return  # rewritten or deleted meanwhile; the newer entry is not the one that failed
            try:
                self._index_write_locked(deletes=[kb])
            except StoreError as exc:  # the read is a miss either way; the next read of the key tries again
                log.warning("disk tier at %s: could not drop corrupt record of %s: %s", self.path, kb.hex(), exc)
                return
            self._unaccount_locked(cur)
        self._emit_removed(BlockKey.from_bytes(kb))

    # --- compaction --------------------------------------------------------------------------------------------
    def _compact_segment(self, seg: Segment) -> tuple[int, int, int]:
        """Copy ``seg``'s live records to the active segment; returns (moved, corrupt, bytes copied)."""
        batch: list[_Slot] = []
        try:
            return self._compact_records(seg, batch)
        except BaseException:
            self._abandon(batch)  # copies written but not committed: dead bytes, never indexed
            raise

    def _compact_records(self, seg: Segment, batch: list[_Slot]) -> tuple[int, int, int]:
        """The body of :meth:`_compact_segment`; ``batch`` holds the copies not yet committed at any time."""
        moved = corrupt = copied = 0
        batch_bytes = 0
        for rec in SegmentScan(seg.fd, 0, verify_payloads=False):
            kb = rec.header.meta.key.to_bytes()
            pos = Position(seg.id, rec.offset)
            with self._cond:
                self._check_open()
                entry = self._index.get(kb)
            if entry is None or entry.position != pos:
                continue
            payload = np.empty(entry.payload_len, dtype=np.uint8)
            if not self._read_verified(seg, entry, payload):
                self._drop_corrupt(kb, entry)
                corrupt += 1
                continue
            slot = self._append(kb, entry.header, memoryview(payload), entry.checksum, rec.header.meta, expect=pos)
            if slot is None:
                continue
            batch.append(slot)
            batch_bytes += slot.entry.span
            if batch_bytes >= COPY_BATCH_BYTES:
                moved += self._commit_copies(batch)
                copied += batch_bytes
                batch_bytes = 0
        moved += self._commit_copies(batch)
        return moved, corrupt, copied + batch_bytes

    def _commit_copies(self, batch: list[_Slot]) -> int:
        slots = list(batch)
        batch.clear()  # from here on _make_durable/_commit own the slots (they abandon them on failure)
        self._make_durable(slots, force=True)
        self._commit(slots)
        return len(slots)

    def _retire(self, seg: Segment) -> bool:
        """Delete ``seg``'s file if nothing live is left in it (after making the index that says so durable)."""
        with self._lock:
            self._write_staged_locked()
        self._index.sync()
        with self._cond:
            if seg.live_bytes > 0 or seg.pending or seg is self._active:
                return False
            del self._segments[seg.id]
            seg.retired = True
            self._disk_used -= seg.size
        try:
            os.unlink(seg.path)
            fsync_dir(self._segment_dir)
        except OSError as exc:
            raise StoreError(f"disk tier at {self.path}: removing compacted segment {seg.path}: {exc}") from exc
        return True

    # --- disk full ---------------------------------------------------------------------------------------------
    def _enter_full(self, reason: str) -> None:
        with self._cond:
            if self._closing:
                return
            first = self._enter_full_locked(reason)
        if first:
            log.warning(
                "disk tier at %s is full: %s; puts are refused until %d bytes are free, reads and deletes go on",
                self.path, reason, self._resume_free,
            )  # fmt: skip

    def _enter_full_locked(self, reason: str) -> bool:
        """Go (or stay) full: give back the reserve, unstick the index; ``True`` if the tier was not full."""
        first = self._full is None
        if first:
            self._full = reason
            self._full_since = time.time()
            self._full_episodes += 1
        self._reserve.release()
        if self._index.broken:
            try:
                self._index.reopen()
            except StoreError as exc:  # tried again on the next delete, put or condition()
                log.error("disk tier at %s: reopening the index failed: %s", self.path, exc)
        return first

    def _check_room(self) -> None:
        """A full tier: resume if the filesystem has room again (reserve taken back, index unstuck), else raise
        ``DiskFullError`` without writing anything."""
        free = free_bytes(self.path)
        with self._cond:
            if self._full is None:
                return
            if free >= self._resume_free and self._reserve.take():
                try:
                    if self._index.broken:
                        self._index.reopen()
                except StoreError as exc:
                    log.error("disk tier at %s: reopening the index failed: %s", self.path, exc)
                else:
                    reason, self._full, self._full_since = self._full, None, None
                    log.warning("disk tier at %s: space is back (%d bytes free); puts resume", self.path, free)
                    return
            self._refused_puts += 1
            reason = self._full
        raise DiskFullError(
            f"disk tier at {self.path} is full ({reason}); puts resume once {self._resume_free} bytes are free "
            f"({free} now); reads and deletes are served"
        )

    # --- helpers -----------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closing:
            raise StoreError(f"disk tier at {self.path} is closed")

    def _io_error(self, exc: OSError, what: str) -> StoreError:
        if exc.errno in FULL_ERRNOS:
            return DiskFullError(f"disk tier at {self.path}: {what}: {exc.strerror or exc}")
        return StoreError(f"disk tier at {self.path}: {what}: {exc}")

    def _release_files(self) -> None:
        for seg in self._segments.values():
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1
        self._index.close()
