"""ObjectTier: KV blocks in any S3-compatible store, packed into segment objects with a Parquet manifest beside each.

Writes append records (4 KiB aligned) to an open in-memory segment. A segment is sealed when it reaches
``segment_bytes``, on ``flush()``/``close()``, or (with the uploader thread) after ``seal_after_s``; sealed segments
wait in a bounded backlog and upload object first, manifest second: the manifest is the commit point. Deletes of
committed blocks become tombstone lists in the same FIFO. Reads are ranged GETs (coalesced in ``get_many``), every
one checked against the record's checksums; a block still waiting to upload is served from memory.

Uploads run on a background thread once ``start()`` is called; without it, the thread that seals a segment uploads
it (and ``flush``/``close`` drain what is left). An unreachable store turns reads into counted misses and writes into
backlog, up to ``backlog_bytes``; past that ``put`` raises ``TierUnavailableError``. Layout and rules:
``docs/object-format.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import boto3

from kvfabric.errors import (
    BlockTooLargeError,
    MalformedRecordError,
    RecordError,
    StoreError,
    TierUnavailableError,
    TruncatedRecordError,
)
from kvfabric.events import EventSink
from kvfabric.ids import BlockKey, Namespace, TierId
from kvfabric.record import (
    Block,
    BlockMeta,
    RecordHeader,
    decode_header,
    decode_record,
    encode_record,
    verify_payload,
)
from kvfabric.store.object.backlog import PendingSegment, PendingTombstones, UploadBacklog, new_object_id
from kvfabric.store.object.config import ObjectTierConfig
from kvfabric.store.object.manifest import (
    SegmentEntry,
    decode_manifest,
    decode_tombstones,
    encode_manifest,
    encode_tombstones,
)
from kvfabric.store.object.outage import OutageGate
from kvfabric.store.object.rebuild import Located, resolve
from kvfabric.store.object.s3 import ObjectStore
from kvfabric.store.tier import Tier, TierCapabilities, TierInfo

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ALIGN = 4096
"""Records start at multiples of this inside a segment object (as on disk, so O_DIRECT/GDS can read in place)."""
SEGMENTS, MANIFESTS, TOMBSTONES = "segments", "manifests", "tombstones"
OBJECT_TIER = TierId("object")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class ObjectLocation:
    """Where a committed block's record lies: object key, byte offset, record length (header + stored payload)."""

    object_key: str
    offset: int
    record_len: int


@dataclass(slots=True)
class ObjectTierStats:
    """Object-tier counters beyond :class:`~kvfabric.store.tier.TierStats`."""

    backlog_bytes: int = 0
    """Bytes held in memory awaiting upload: the open segment plus the backlog."""
    backlog_items: int = 0
    """Sealed segments and tombstone lists waiting in the backlog."""
    uploads: int = 0
    """Objects written (segments, manifests, tombstone lists)."""
    uploaded_bytes: int = 0
    upload_failures: int = 0
    range_gets: int = 0
    """Ranged GETs issued for reads (one per block in ``get``, one per coalesced run in ``get_many``)."""
    unavailable_misses: int = 0
    """Reads answered as misses because the store could not be reached."""
    rejected_puts: int = 0
    """Puts refused because the backlog was full."""
    segments: int = 0
    """Committed segment objects holding live blocks."""
    gc_segments: int = 0
    """Segments deleted because nothing live was left in them."""
    bad_manifests: int = 0
    """Manifests or tombstone lists skipped at rebuild because they could not be trusted."""
    store_down: bool = False
    uploaded_blocks: int = 0
    """Blocks whose current copy is committed in the store (the rest of ``TierStats.blocks`` waits in memory)."""
    pending_blocks: int = 0
    """Blocks whose current copy is still in memory, in the open segment or the backlog."""
    last_failure: str | None = None
    """The last upload or read failure, while the store is down."""


class ObjectTier(Tier):
    capabilities = TierCapabilities(
        persistent=True, shared=True, verifies_reads=True, buffers_writes=True, background=True
    )

    def __init__(
        self,
        config: ObjectTierConfig,
        *,
        session: boto3.session.Session | None = None,
        tier_id: TierId = OBJECT_TIER,
        source: str = "local",
        events: EventSink | None = None,
    ) -> None:
        """No I/O and no threads: use :meth:`open` to rebuild the index from the bucket, :meth:`start` for the
        uploader thread."""
        super().__init__(tier_id, source=source, events=events)
        self.config = config
        self._store = ObjectStore(config, session=session)
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._upload_lock = threading.Lock()
        self._index: dict[BlockKey, Located] = {}
        self._pending: dict[str, PendingSegment] = {}  # open + sealed, by segment id; reads come from here
        self._open: PendingSegment | None = None
        self._backlog = UploadBacklog()
        # What a rebuild would see, for garbage collection: key -> (segment id, stamp) of its committed row.
        self._durable: dict[BlockKey, tuple[str, int]] = {}
        self._segment_live: dict[str, int] = {}
        self._gc_todo: set[str] = set()
        self._gate = OutageGate(config.outage_backoff_s, config.outage_backoff_max_s)
        self._ostats = ObjectTierStats()
        self._last_stamp = 0
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, config: ObjectTierConfig, **kwargs: object) -> ObjectTier:
        """A tier whose index is rebuilt from the bucket's manifests and tombstones.

        Raises ``TierUnavailableError`` when the store cannot be reached and ``StoreError`` when the bucket is
        missing (unless ``create_bucket``) or not accessible.
        """
        tier = cls(config, **kwargs)  # type: ignore[arg-type]
        try:
            tier._rebuild()
        except BaseException:
            tier._shutdown_pool()
            raise
        return tier

    def start(self) -> None:
        """Start the background uploader (idempotent). Without it, uploads happen on the thread that seals."""
        with self._lock:
            self._check_open()
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._upload_loop, name="kvfabric-object-upload", daemon=True)
            self._thread.start()

    def flush(self) -> None:
        """Seal the open segment and upload everything waiting; ``TierUnavailableError`` if that is not possible."""
        with self._lock:
            self._check_open()
            self._seal_locked()
        if not self._drain():
            with self._lock:
                waiting = self._backlog.nbytes
            raise TierUnavailableError(
                f"object tier: {waiting} bytes in {len(self._backlog)} objects still waiting to upload to "
                f"s3://{self.config.bucket}/{self.config.prefix} at {self._store.endpoint}"
            )

    def close(self) -> None:
        """Stop the uploader, seal and upload what is waiting (once; logged if the store is down), release."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._seal_locked()
            self._work.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if not self._drain():
            with self._lock:
                lost = self._backlog.nbytes
            log.error(
                "object tier closed with %d bytes not uploaded to s3://%s/%s (store unreachable)",
                lost, self.config.bucket, self.config.prefix,
            )  # fmt: skip
        self._shutdown_pool()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"object tier for s3://{self.config.bucket}/{self.config.prefix} is closed")

    def _shutdown_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="kvfabric-object-io")
            return self._pool

    def _object_key(self, kind: str, object_id: str) -> str:
        suffix = ".seg" if kind == SEGMENTS else ".parquet"
        return self.config.object_key(kind, object_id + suffix)

    def _next_stamp(self) -> int:
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    # --- writes ----------------------------------------------------------------------------------------------------
    def put(self, block: Block) -> None:
        self.put_many([block])

    def put_many(self, blocks: Iterable[Block]) -> None:
        """Append each block to the open segment; with ``durable_put``, return only once all are committed."""
        stored: list[BlockMeta] = []
        segments: set[str] = set()
        try:
            for block in blocks:
                header, payload = encode_record(block, self.config.codec)  # compression outside the lock
                parsed = decode_header(header)
                with self._lock:
                    self._check_open()
                    waiting = len(self._backlog)
                    segments.add(self._append_locked(block.meta, header, payload, parsed.payload_checksum))
                    sealed = len(self._backlog) > waiting
                stored.append(block.meta)
                if sealed and not self.config.durable_put:
                    self._kick_uploads()
        finally:
            for meta in stored:
                self._emit_stored(meta)
        if stored and self.config.durable_put:
            with self._lock:
                self._seal_locked()
            self._drain()
            with self._lock:
                waiting = segments & self._pending.keys()
            if waiting:
                raise TierUnavailableError(
                    f"object tier: {len(stored)} block(s) queued for upload but not yet durable in "
                    f"s3://{self.config.bucket}/{self.config.prefix} ({self._store.endpoint} unreachable)"
                )

    def _append_locked(self, meta: BlockMeta, header: bytes, payload: bytes | memoryview, checksum: int) -> str:
        record_len = len(header) + len(payload)
        seg = self._open
        if seg is not None and seg.entries and _aligned(seg.nbytes) + record_len > self.config.segment_bytes:
            self._seal_locked()
            seg = None
        open_bytes = _aligned(seg.nbytes) if seg is not None else 0
        if record_len > self.config.backlog_bytes:
            raise BlockTooLargeError(record_len, self.config.backlog_bytes)
        if self._backlog.nbytes + open_bytes + record_len > self.config.backlog_bytes:
            self._ostats.rejected_puts += 1
            raise TierUnavailableError(
                f"object tier upload backlog full ({self._backlog.nbytes + open_bytes} of {self.config.backlog_bytes}"
                f" bytes waiting for {self._store.endpoint}); block {meta.key} not stored"
            )
        if seg is None:
            seg = self._open = PendingSegment(new_object_id(self._next_stamp()))
            self._pending[seg.segment_id] = seg
            self._work.notify_all()  # the uploader times its seal_after_s from here
        offset = _aligned(seg.nbytes)
        seg.data.extend(bytes(offset - seg.nbytes))
        seg.data += header
        seg.data += payload
        entry = SegmentEntry(meta.key, offset, record_len, len(header), checksum, meta, self._next_stamp())
        self._install_locked(Located(seg.segment_id, entry))
        self._stats.puts += 1
        self._stats.bytes_written += record_len
        if seg.nbytes >= self.config.segment_bytes:
            self._seal_locked()
        return seg.segment_id

    def _install_locked(self, located: Located) -> None:
        """Make ``located`` the visible copy of its key, retiring the previous one."""
        key = located.entry.key
        old = self._index.get(key)
        if old is not None:
            self._forget_pending_row_locked(old)
            self._stats.bytes -= old.entry.payload_len
        else:
            self._stats.blocks += 1
        self._stats.bytes += located.entry.payload_len
        self._index[key] = located
        seg = self._pending.get(located.segment_id)
        if seg is not None and not seg.frozen:
            seg.entries[key] = located.entry

    def _forget_pending_row_locked(self, located: Located) -> None:
        seg = self._pending.get(located.segment_id)
        if seg is not None and not seg.frozen and seg.entries.get(located.entry.key) is located.entry:
            del seg.entries[located.entry.key]

    def _seal_locked(self) -> None:
        seg, self._open = self._open, None
        if seg is None:
            return
        if not seg.entries:  # everything in it was deleted or re-put elsewhere: nothing to upload
            self._pending.pop(seg.segment_id, None)
            return
        self._backlog.push_segment(seg)
        self._work.notify_all()

    def upload_segment_file(self, path: str | Path, entries: Sequence[SegmentEntry]) -> str:
        """Upload a sealed segment file (e.g. the disk tier's) as-is, then its manifest built from ``entries``
        (the disk tier lists a sealed segment's entries in this same type).

        Synchronous: returns the new segment id once both objects are in the store; the blocks are then served by
        this tier. Raises ``TierUnavailableError``/``StoreError`` if the upload fails (nothing changes then).
        """
        self._check_open()
        path = Path(path)
        size = path.stat().st_size
        for e in entries:
            if e.offset + e.record_len > size:
                raise ValueError(
                    f"segment entry for {e.key} at [{e.offset}, +{e.record_len}) lies outside {path} ({size} B)"
                )
        with self._lock:
            segment_id = new_object_id(self._next_stamp())
            stamped = [_as_entry(e, self._next_stamp()) for e in entries]
        manifest = encode_manifest(stamped, segment_id=segment_id, segment_bytes=size)
        with self._upload_lock:
            try:
                self._store.upload_file(path, self._object_key(SEGMENTS, segment_id))
                self._store.put(self._object_key(MANIFESTS, segment_id), manifest)
            except StoreError as exc:
                self._note_failure(exc)
                raise
            self._gate.succeeded()
            with self._lock:
                self._ostats.uploads += 2
                self._ostats.uploaded_bytes += size + len(manifest)
                for e in stamped:
                    cur = self._index.get(e.key)
                    if cur is None or cur.entry.stored_ns < e.stored_ns:
                        self._install_locked(Located(segment_id, e))
                self._commit_rows_locked(segment_id, stamped)
            self._collect_garbage()
        return segment_id

    # --- deletes ---------------------------------------------------------------------------------------------------
    def delete(self, key: BlockKey) -> bool:
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Iterable[BlockKey]) -> int:
        removed: list[BlockKey] = []
        with self._lock:
            self._check_open()
            for key in keys:
                if self._remove_locked(key, None):
                    removed.append(key)
            self._stats.deletes += len(removed)
        for key in removed:
            self._emit_removed(key)
        if removed and self.config.durable_put:
            self._drain()  # write-through deletes: best effort now, the backlog keeps them otherwise
        return len(removed)

    def _remove_locked(self, key: BlockKey, expected: Located | None) -> bool:
        """Drop ``key`` (only if it is still at ``expected``, when given) and queue its tombstone if the store
        holds, or is uploading, a copy."""
        located = self._index.get(key)
        if located is None or (expected is not None and located is not expected):
            return False
        del self._index[key]
        self._stats.blocks -= 1
        self._stats.bytes -= located.entry.payload_len
        self._forget_pending_row_locked(located)
        uploading = self._backlog.frozen_head_segment()
        if key in self._durable or (uploading is not None and key in uploading.entries):
            self._backlog.add_tombstone(key, self._next_stamp())
            self._work.notify_all()
        return True

    # --- reads -----------------------------------------------------------------------------------------------------
    def head(self, key: BlockKey) -> BlockMeta | None:
        with self._lock:
            self._check_open()
            located = self._index.get(key)
        return located.entry.meta if located is not None else None

    def keys(self, namespace: Namespace | None = None) -> Iterator[BlockKey]:
        with self._lock:
            snapshot = list(self._index)
        return iter(snapshot if namespace is None else [k for k in snapshot if k.namespace == namespace])

    def locate(self, key: BlockKey) -> ObjectLocation | None:
        """Where the block's record lies in the store; ``None`` if absent or not uploaded yet."""
        with self._lock:
            located = self._index.get(key)
            if located is None or located.segment_id in self._pending:
                return None
        e = located.entry
        return ObjectLocation(self._object_key(SEGMENTS, located.segment_id), e.offset, e.record_len)

    def _lookup(self, key: BlockKey) -> tuple[Located | None, bytes | None]:
        """The key's location and, if its segment is still in memory, a copy of its record."""
        with self._lock:
            self._check_open()
            located = self._index.get(key)
            if located is None:
                self._stats.misses += 1
                return None, None
            seg = self._pending.get(located.segment_id)
            if seg is None:
                return located, None
            e = located.entry
            return located, bytes(seg.data[e.offset : e.offset + e.record_len])

    def get(self, key: BlockKey) -> Block | None:
        located, record = self._lookup(key)
        if located is None:
            return None
        if record is None:
            object_key = self._object_key(SEGMENTS, located.segment_id)
            record = self._read_remote(
                key, located, lambda: self._store.get_range(object_key, located.entry.offset, located.entry.record_len)
            )
            if record is None:
                return None
        return self._checked(key, located, record)

    def _read_remote(self, key: BlockKey, located: Located, read: Callable[[], _T | None]) -> _T | None:
        """``read()`` from the store through the outage gate; ``None`` when the store is down (counted) or the
        object is gone (then the block is lost: dropped and announced)."""
        if not self._may_read():
            return None
        try:
            got = read()
        except StoreError as exc:
            self._read_failed(exc, 1)
            return None
        self._gate.succeeded()
        if got is None:
            self._lost(key, located, corrupt=False)
        return got

    def _checked(self, key: BlockKey, located: Located, record: bytes | memoryview) -> Block | None:
        """The verified block, or ``None`` (counted, dropped, announced) when the bytes cannot be trusted."""
        try:
            header = decode_header(record)
            _check_header_matches(header, key, located.entry)
            block = decode_record(record[: located.entry.record_len])
        except RecordError as exc:
            self._corrupt(key, located, exc)
            return None
        self._count_hit(located.entry.record_len)
        return block

    def _corrupt(self, key: BlockKey, located: Located, exc: RecordError) -> None:
        log.warning("object tier: corrupt record for %s in segment %s: %s", key, located.segment_id, exc)
        self._lost(key, located, corrupt=True)

    def _count_hit(self, record_len: int) -> None:
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes_read += record_len

    def get_into(self, key: BlockKey, out: memoryview) -> BlockMeta | None:
        """Read the payload straight from the response stream into ``out`` and verify it there.

        On a miss ``out`` may have been partly written. Compressed records and blocks still in memory go through
        :meth:`get` and a copy."""
        with self._lock:
            self._check_open()
            located = self._index.get(key)
            in_memory = located is not None and located.segment_id in self._pending
        if located is None or in_memory or located.entry.payload_len != located.entry.meta.nbytes:
            return super().get_into(key, out)
        dst = memoryview(out).cast("B")
        if len(dst) != located.entry.meta.nbytes:
            raise ValueError(f"destination is {len(dst)} bytes, block {key} needs {located.entry.meta.nbytes}")
        e = located.entry
        header_buf = bytearray(e.header_len)
        object_key = self._object_key(SEGMENTS, located.segment_id)
        got = self._read_remote(
            key, located, lambda: self._store.read_range_into(object_key, e.offset, [memoryview(header_buf), dst])
        )
        if got is None:
            return None
        try:
            if got < e.record_len:
                raise TruncatedRecordError(f"segment {located.segment_id} ends {e.record_len - got} bytes into {key}")
            header = decode_header(header_buf)
            _check_header_matches(header, key, e)
            verify_payload(header, dst)
        except RecordError as exc:
            self._corrupt(key, located, exc)
            return None
        self._count_hit(e.record_len)
        return header.meta

    def get_many(self, keys: Iterable[BlockKey]) -> list[Block | None]:
        """Blocks in ``keys`` order; records close together in one object come back by one ranged GET."""
        keys = list(keys)
        out: list[Block | None] = [None] * len(keys)
        remote: dict[str, list[tuple[int, BlockKey, Located]]] = {}
        for i, key in enumerate(keys):
            located, record = self._lookup(key)
            if located is None:
                continue
            if record is not None:
                out[i] = self._checked(key, located, record)
            else:
                remote.setdefault(located.segment_id, []).append((i, key, located))
        if not remote:
            return out
        ranges = [r for members in remote.values() for r in self._coalesce(members)]
        if not self._may_read(sum(len(r) for r in ranges), len(ranges)):
            return out
        if len(ranges) == 1:
            self._fetch_range(ranges[0], out)
        else:
            for f in [self._executor().submit(self._fetch_range, r, out) for r in ranges]:
                f.result()
        return out

    def _coalesce(self, members: list[tuple[int, BlockKey, Located]]) -> list[list[tuple[int, BlockKey, Located]]]:
        """Split one segment's wanted records into runs each fetched by one ranged GET."""
        members.sort(key=lambda m: m[2].entry.offset)
        runs: list[list[tuple[int, BlockKey, Located]]] = []
        start = end = 0
        for m in members:
            e = m[2].entry
            if runs and e.offset - end <= self.config.coalesce_gap_bytes and \
                    max(end, e.offset + e.record_len) - start <= self.config.max_range_bytes:  # fmt: skip
                runs[-1].append(m)
                end = max(end, e.offset + e.record_len)
            else:
                runs.append([m])
                start, end = e.offset, e.offset + e.record_len
        return runs

    def _fetch_range(self, run: list[tuple[int, BlockKey, Located]], out: list[Block | None]) -> None:
        segment_id = run[0][2].segment_id
        start = run[0][2].entry.offset
        end = max(m[2].entry.offset + m[2].entry.record_len for m in run)
        try:
            data = self._store.get_range(self._object_key(SEGMENTS, segment_id), start, end - start)
        except StoreError as exc:
            self._read_failed(exc, len(run))
            return
        self._gate.succeeded()
        if data is None:
            for _, key, located in run:
                self._lost(key, located, corrupt=False)
            return
        view = memoryview(data)
        for i, key, located in run:
            rel = located.entry.offset - start
            out[i] = self._checked(key, located, view[rel : rel + located.entry.record_len])

    def _may_read(self, n: int = 1, gets: int = 1) -> bool:
        """False (and ``n`` misses counted) while the store is known to be down and not yet due for a retry;
        otherwise counts the ``gets`` ranged GETs about to be issued."""
        if self._gate.is_open():
            with self._lock:
                self._ostats.range_gets += gets
            return True
        with self._lock:
            self._stats.misses += n
            self._ostats.unavailable_misses += n
        return False

    def _read_failed(self, exc: StoreError, n: int) -> None:
        if isinstance(exc, TierUnavailableError):
            self._gate.failed()
        log.warning("object tier: read failed, %d miss(es): %s", n, exc)
        with self._lock:
            self._ostats.last_failure = f"read: {exc}"
            self._stats.misses += n
            self._ostats.unavailable_misses += n

    def _lost(self, key: BlockKey, located: Located, *, corrupt: bool) -> None:
        """A committed record that cannot be served (corrupt, or its object gone): miss, drop, tombstone, announce."""
        with self._lock:
            self._stats.misses += 1
            if corrupt:
                self._stats.corrupt += 1
            dropped = self._remove_locked(key, located)
        if dropped:
            self._emit_removed(key)

    # --- uploads ---------------------------------------------------------------------------------------------------
    def _kick_uploads(self) -> None:
        """A segment was sealed: wake the uploader, or upload here when there is none (unless the store is down)."""
        if self._thread is not None:
            return  # _seal_locked notified it
        if self._gate.is_open():
            self._drain()

    def _drain(self) -> bool:
        """Upload the backlog head to tail; ``True`` when it is empty. One drainer at a time keeps FIFO order."""
        with self._upload_lock:
            while True:
                with self._lock:
                    item = self._backlog.head()
                    if item is None:
                        break
                    item.frozen = True
                    rows = sorted(item.entries.values(), key=lambda e: e.offset) if isinstance(
                        item, PendingSegment) else list(item.deleted.items())  # fmt: skip
                try:
                    written = self._upload(item, rows)
                except StoreError as exc:
                    self._note_failure(exc)
                    log.warning(
                        "object tier: upload failed, %d objects wait in the backlog: %s", len(self._backlog), exc
                    )
                    return False
                self._gate.succeeded()
                with self._lock:
                    self._backlog.pop_head(item)
                    self._ostats.uploaded_bytes += written
                    if isinstance(item, PendingSegment):
                        self._ostats.uploads += 2
                        self._pending.pop(item.segment_id, None)
                        self._commit_rows_locked(item.segment_id, rows)  # type: ignore[arg-type]
                    else:
                        self._ostats.uploads += 1
                        self._commit_tombstones_locked(rows)  # type: ignore[arg-type]
            self._collect_garbage()
        return True

    def _upload(self, item: PendingSegment | PendingTombstones, rows: list) -> int:  # type: ignore[type-arg]
        if isinstance(item, PendingTombstones):
            body = encode_tombstones(rows)
            self._store.put(self._object_key(TOMBSTONES, item.batch_id), body)
            return len(body)
        manifest = encode_manifest(rows, segment_id=item.segment_id, segment_bytes=item.nbytes)
        self._store.put(self._object_key(SEGMENTS, item.segment_id), item.data)  # first the data ...
        self._store.put(self._object_key(MANIFESTS, item.segment_id), manifest)  # ... then the commit point
        return item.nbytes + len(manifest)

    def _note_failure(self, exc: BaseException | None = None) -> None:
        self._gate.failed()
        with self._lock:
            self._ostats.upload_failures += 1
            self._ostats.last_failure = f"upload: {exc}" if exc is not None else "upload failed"

    def _commit_rows_locked(self, segment_id: str, rows: Sequence[SegmentEntry]) -> None:
        """Rows of ``segment_id`` are now in the store: latest stamp per key wins, as it will at rebuild."""
        self._segment_live.setdefault(segment_id, 0)
        for e in rows:
            cur = self._durable.get(e.key)
            if cur is not None and cur[1] >= e.stored_ns:
                continue
            if cur is not None:
                self._release_locked(cur[0])
            self._durable[e.key] = (segment_id, e.stored_ns)
            self._segment_live[segment_id] += 1
        if self._segment_live[segment_id] == 0:
            self._release_locked(segment_id, 0)

    def _commit_tombstones_locked(self, deleted: Sequence[tuple[BlockKey, int]]) -> None:
        for key, deleted_ns in deleted:
            cur = self._durable.get(key)
            if cur is not None and deleted_ns >= cur[1]:
                del self._durable[key]
                self._release_locked(cur[0])

    def _release_locked(self, segment_id: str, n: int = 1) -> None:
        self._segment_live[segment_id] -= n
        if self._segment_live[segment_id] <= 0:
            del self._segment_live[segment_id]
            self._gc_todo.add(segment_id)

    def _collect_garbage(self) -> None:
        """Delete segments with nothing live left: manifest first (no rebuild sees them after), then the object."""
        with self._lock:
            todo = sorted(self._gc_todo - self._segment_live.keys())
            self._gc_todo.clear()
        if not todo:
            return
        try:
            self._store.delete([self._object_key(MANIFESTS, s) for s in todo])
            self._store.delete([self._object_key(SEGMENTS, s) for s in todo])
        except StoreError as exc:
            log.warning("object tier: garbage collection of %d segments deferred: %s", len(todo), exc)
            with self._lock:
                self._gc_todo.update(todo)
            return
        with self._lock:
            self._ostats.gc_segments += len(todo)

    def _upload_loop(self) -> None:
        seal_after = self.config.seal_after_s
        while True:
            with self._work:
                while not self._stopping:
                    waits = []
                    if len(self._backlog):
                        if self._gate.is_open():
                            break
                        waits.append(self._gate.seconds_closed())
                    if self._open is not None and seal_after is not None:
                        due = self._open.opened_at + seal_after - time.monotonic()
                        if due <= 0:
                            self._seal_locked()
                            continue
                        waits.append(due)
                    self._work.wait(min(waits) if waits else None)
                if self._stopping:
                    return
            try:
                self._drain()
            except Exception as exc:  # a bug must not silently end uploads: log it, back off, keep going
                log.exception("object tier: uploader failed; retrying after a backoff")
                self._note_failure(exc)

    # --- rebuild ---------------------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Read every manifest and tombstone list under the prefix and rebuild the index; GC what is dead."""
        self._store.ensure_bucket(self.config.create_bucket)
        manifest_keys = self._store.list_keys(self.config.object_key(MANIFESTS, ""))
        tombstone_keys = self._store.list_keys(self.config.object_key(TOMBSTONES, ""))
        manifests = dict(self._read_all(manifest_keys, self._read_manifest))
        tombstones = dict(self._read_all(tombstone_keys, self._read_tombstones))
        plan = resolve(manifests, tombstones)
        with self._lock:
            self._index = dict(plan.live)
            self._durable = {k: (loc.segment_id, loc.entry.stored_ns) for k, loc in plan.live.items()}
            self._segment_live = dict(plan.live_per_segment)
            self._gc_todo = set(plan.dead_segments)
            self._last_stamp = max(self._last_stamp, plan.last_stamp)
            self._stats.blocks = len(plan.live)
            self._stats.bytes = sum(loc.entry.payload_len for loc in plan.live.values())
        self._collect_garbage()
        with self._lock:
            gc_done = not self._gc_todo
        if gc_done and plan.moot_tombstones:
            try:
                self._store.delete([self._object_key(TOMBSTONES, t) for t in plan.moot_tombstones])
            except StoreError as exc:
                log.warning("object tier: pruning %d moot tombstone lists deferred: %s", len(plan.moot_tombstones), exc)
        log.info(
            "object tier: rebuilt %d blocks in %d segments from s3://%s/%s (%d dead segments, %d tombstone lists)",
            len(plan.live), len(plan.live_per_segment), self.config.bucket, self.config.prefix,
            len(plan.dead_segments), len(tombstones),
        )  # fmt: skip

    def _read_all(self, keys: list[str], read: Callable[[str], tuple[str, list] | None]) -> list[tuple[str, list]]:  # type: ignore[type-arg]
        if len(keys) <= 1:
            results = [read(k) for k in keys]
        else:
            results = list(self._executor().map(read, keys))
        return [r for r in results if r is not None]

    def _read_manifest(self, object_key: str) -> tuple[str, list[SegmentEntry]] | None:
        segment_id = _object_id(object_key)
        data = self._store.get(object_key)
        if data is None:
            return None
        try:
            manifest = decode_manifest(data, what=f"manifest s3://{self.config.bucket}/{object_key}")
            if manifest.segment_id != segment_id:
                raise MalformedRecordError(f"manifest {object_key} names segment {manifest.segment_id}")
        except RecordError as exc:
            log.error("object tier: skipping untrustworthy %s", exc)
            with self._lock:
                self._ostats.bad_manifests += 1
            return None
        return segment_id, manifest.entries

    def _read_tombstones(self, object_key: str) -> tuple[str, list[tuple[BlockKey, int]]] | None:
        data = self._store.get(object_key)
        if data is None:
            return None
        try:
            deleted = decode_tombstones(data, what=f"tombstone list s3://{self.config.bucket}/{object_key}")
        except RecordError as exc:
            log.error("object tier: skipping untrustworthy %s", exc)
            with self._lock:
                self._ostats.bad_manifests += 1
            return None
        return _object_id(object_key), deleted

    # --- small documents beside the blocks (the keying check) ------------------------------------------------------
    def _meta_key(self, name: str) -> str:
        return f"{self.config.prefix}/{name}" if self.config.prefix else name

    def read_meta(self, name: str) -> bytes | None:
        """The document ``name`` kept at the top of this tier's prefix, or ``None``."""
        return self._store.get(self._meta_key(name))

    def write_meta(self, name: str, data: bytes) -> None:
        """Keep ``data`` as the document ``name`` at the top of this tier's prefix (one writer per prefix)."""
        self._store.put(self._meta_key(name), data)

    def describe(self) -> str:
        return f"s3://{self.config.bucket}/{self.config.prefix}"

    def holds_blocks(self) -> bool:
        with self._lock:
            return bool(self._index) or bool(self._segment_live)

    # --- stats -----------------------------------------------------------------------------------------------------
    def info(self) -> TierInfo:
        return TierInfo(codec=self.config.codec, objects=self.object_stats())

    def object_stats(self) -> ObjectTierStats:
        """A snapshot of the object-tier counters (backlog, uploads, outages, GC)."""
        with self._lock:
            snap = replace(self._ostats)
            snap.backlog_bytes = self._backlog.nbytes + (self._open.nbytes if self._open is not None else 0)
            snap.backlog_items = len(self._backlog)
            snap.segments = len(self._segment_live)
            snap.store_down = self._gate.down
            snap.pending_blocks = sum(
                1 for seg in self._pending.values() for key in seg.entries
                if (loc := self._index.get(key)) is not None and loc.segment_id == seg.segment_id
            )  # fmt: skip
            snap.uploaded_blocks = self._stats.blocks - snap.pending_blocks
            if not snap.store_down:
                snap.last_failure = None
        return snap


def _object_id(object_key: str) -> str:
    return object_key.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _as_entry(sealed: SegmentEntry, stamp: int) -> SegmentEntry:
    """``sealed`` stamped now unless it carries a stamp (the disk tier's entries do not)."""
    return sealed if sealed.stored_ns else replace(sealed, stored_ns=stamp)


def _check_header_matches(header: RecordHeader, key: BlockKey, entry: SegmentEntry) -> None:
    """The record found is the one the manifest promised (not a valid record of some other block)."""
    if (header.meta != entry.meta or header.meta.key != key or header.record_len != entry.record_len
            or header.payload_checksum != entry.checksum):  # fmt: skip
        raise MalformedRecordError(f"record at offset {entry.offset} is not the manifest's record for {key}")
