"""The disk tier's index in RocksDB (rocksdict, raw bytes mode): block key -> where its record lives.

Schema (every value little-endian)::

    b"b" + BlockKey.to_bytes()  ->  u32 segment | u64 offset | u16 header_len | u64 payload_len
                                    | u64 payload_xxh3_64 | u64 created_ms | header bytes (header_len)
    b"mhwm"                     ->  u32 segment | u64 offset      high-water mark (see docs/disk-format.md)
    b"mformat"                  ->  ascii format version

Keeping the record header in the entry lets ``head`` answer without touching the segment, and lets a read check the
header bytes on disk against the index with one comparison. Writes are not synced here; the tier decides when
the WAL must be durable (``sync``).

Puts may also be *staged* (``stage``): kept in memory, visible to ``get`` at once, and written to RocksDB with the
next ``write`` (which always carries every staged entry first). The tier stages entries of records that are
already durable in their segment, and writes the high-water mark only in real writes, so a crash that loses staged
entries loses nothing: recovery finds those records again by scanning from the mark. Staging turns one RocksDB
write per put into one per batch of puts.

Recently read or written entries are also kept decoded in memory (``ENTRY_CACHE_ENTRIES``, oldest dropped first),
so a hot read costs a dict lookup instead of a RocksDB get and an unpack. Every change goes through ``write``,
which updates the cache after RocksDB accepted the batch (and forgets the touched keys if it did not), so the
cache never disagrees with the database as long as ``get`` and ``write`` do not run concurrently (the tier calls
both under its lock).

A failed write leaves RocksDB in a sticky error state (every later write fails, even once the cause is gone, and
there is no ``Resume`` in rocksdict): the index then reports ``broken`` and the tier ``reopen``s it in place.
Iteration holds a RocksDB iterator only while it reads a batch (an open iterator would keep the database, and its
lock, alive through a reopen).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from kvfabric.errors import DiskFullError, StoreError
from kvfabric.record import BlockMeta, decode_header
from kvfabric.store.disk.cache import FifoCache
from kvfabric.store.disk.segment import Position, align_up

INDEX_FORMAT = b"1"
ENTRY_CACHE_ENTRIES = 16384
"""Decoded entries kept in memory (about 0.5 KiB each)."""
_BLOCK = b"b"
_HWM = b"mhwm"
_FORMAT = b"mformat"
_ENTRY = struct.Struct("<IQHQQQ")
_POS = struct.Struct("<IQ")
_ITER_BATCH = 1024
"""Entries read per iterator: the iterator is dropped between batches (see the module docstring)."""
_NO_SPACE = ("No space left on device", "NoSpace", "Disk quota exceeded", "File too large")


class IndexEntry(NamedTuple):
    """Where one block's record lives and what it should read back as (a NamedTuple: built on every read, and a
    tuple is the cheapest immutable record to build)."""

    segment: int
    offset: int
    header_len: int
    payload_len: int
    """Stored (possibly compressed) payload bytes."""
    checksum: int
    """XXH3-64 of the stored payload bytes (the record header carries the same value)."""
    created_ms: int
    header: bytes
    """The record header exactly as written to the segment."""

    @property
    def position(self) -> Position:
        return Position(self.segment, self.offset)

    @property
    def record_len(self) -> int:
        return self.header_len + self.payload_len

    @property
    def span(self) -> int:
        """Bytes the record occupies in its segment, padding included."""
        return align_up(self.record_len)

    def meta(self) -> BlockMeta:
        return decode_header(self.header).meta

    def pack(self) -> bytes:
        fixed = _ENTRY.pack(
            self.segment, self.offset, self.header_len, self.payload_len, self.checksum, self.created_ms
        )
        return fixed + self.header

    @classmethod
    def unpack(cls, value: bytes) -> IndexEntry:
        if len(value) < _ENTRY.size:
            raise ValueError(f"index entry of {len(value)} bytes is shorter than {_ENTRY.size}")
        fixed = _ENTRY.unpack_from(value)
        header = value[_ENTRY.size :]
        if len(header) != fixed[2]:
            raise ValueError(f"index entry header is {len(header)} bytes, entry says {fixed[2]}")
        return cls(*fixed, header)


def block_db_key(key_bytes: bytes) -> bytes:
    return _BLOCK + key_bytes


@contextmanager
def _rocksdb(what: str, path: Path) -> Iterator[None]:
    """Translate rocksdict's exceptions (plain ``Exception``) into StoreError naming the operation and the path."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        raise _translate(exc, what, path) from exc


def _translate(exc: Exception, what: str, path: Path) -> StoreError:
    message = f"RocksDB index at {path}: {what} failed: {exc}"
    if any(s in str(exc) for s in _NO_SPACE):
        return DiskFullError(message)
    return StoreError(message)


class BlockIndex:
    """Thin typed layer over one RocksDB database; callers serialise writes that must stay ordered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db_lock = threading.Lock()
        """Held by whatever uses ``_db`` without the tier's lock (sync, iteration batches) and by ``reopen``."""
        self.broken = False
        """A write failed: RocksDB refuses writes until the database is reopened."""
        self.reopens = 0
        self._db: Rdict | None = self._open_db()
        self._cache: FifoCache[bytes, IndexEntry] = FifoCache(ENTRY_CACHE_ENTRIES)
        self._staged: dict[bytes, IndexEntry] = {}
        self.staged_bytes = 0
        """Record bytes (headers and payloads) of the staged entries: what recovery rescans if they are lost."""
        self.writes = 0
        """Batches written (or attempted) so far: a caller that read an entry can tell whether it may be stale."""
        self._nosync = WriteOptions()
        self._sync = WriteOptions()
        self._sync.sync = True
        with _rocksdb("read format", path):
            fmt = self._live_db().get(_FORMAT)
        if fmt is None:
            with _rocksdb("write format", path):
                self._live_db().put(_FORMAT, INDEX_FORMAT, self._sync)
        elif fmt != INDEX_FORMAT:
            self._live_db().close()
            raise StoreError(f"RocksDB index at {path} has format {fmt!r}, this build reads {INDEX_FORMAT!r}")

    def _open_db(self) -> Rdict:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_background_jobs(2)
        with _rocksdb("open", self.path):
            return Rdict(str(self.path), options)

    def reopen(self) -> None:
        """Close and reopen the database in place, clearing RocksDB's sticky background error; what it had
        acknowledged comes back from its WAL, staged entries stay staged. Callers hold the tier's lock (no ``get``
        or ``write`` meanwhile). Raises ``StoreError``/``DiskFullError`` if it cannot be opened again (then
        ``broken`` stays set and a later call tries again)."""
        with self._db_lock:
            if self._db is not None:
                try:
                    self._db.close()  # fails with the sticky error after releasing the files; nothing to keep
                except Exception:  # noqa: BLE001 - a database in error state reports its error on close
                    pass
                self._db = None
            self._cache.clear()  # a write that failed may or may not have landed: ask RocksDB again
            self._db = self._open_db()
            self.broken = False
            self.reopens += 1

    def _live_db(self) -> Rdict:
        if self._db is None:
            raise StoreError(f"RocksDB index at {self.path} is not open (a reopen after a write failure failed)")
        return self._db

    def get(self, key_bytes: bytes) -> IndexEntry | None:
        entry = self._cache.get(key_bytes)
        if entry is not None:
            return entry
        entry = self._staged.get(key_bytes)  # staged, and since pushed out of the cache
        if entry is not None:
            return entry
        try:  # no context manager here: this is on every read's path
            value = self._db.get(_BLOCK + key_bytes)  # type: ignore[union-attr]
        except Exception as exc:
            if self._db is None:
                raise StoreError(f"RocksDB index at {self.path} is not open") from exc
            raise _translate(exc, "get", self.path) from exc
        if value is None:
            return None
        entry = IndexEntry.unpack(value)
        self._cache.put(key_bytes, entry)
        return entry

    @property
    def staged(self) -> int:
        """Entries staged and not yet written."""
        return len(self._staged)

    def stage(self, puts: Sequence[tuple[bytes, IndexEntry]]) -> None:
        """Make ``puts`` visible to ``get`` now and write them with the next ``write``."""
        self.writes += 1
        for kb, entry in puts:
            self._staged[kb] = entry
            self.staged_bytes += entry.record_len
            self._cache.put(kb, entry)

    def write(
        self,
        *,
        puts: Sequence[tuple[bytes, IndexEntry]] = (),
        deletes: Sequence[bytes] = (),
        hwm: Position | None = None,
        sync: bool = False,
    ) -> None:
        """Apply every staged entry, then puts, deletes and a new high-water mark, atomically (one WriteBatch)."""
        self.writes += 1
        batch = WriteBatch(raw_mode=True)
        for kb, entry in self._staged.items():
            batch.put(_BLOCK + kb, entry.pack())
        for kb, entry in puts:
            batch.put(_BLOCK + kb, entry.pack())
        for kb in deletes:
            batch.delete(_BLOCK + kb)
        if hwm is not None:
            batch.put(_HWM, _POS.pack(*hwm))
        try:
            with self._db_lock, _rocksdb("write", self.path):
                try:
                    self._live_db().write(batch, self._sync if sync else self._nosync)
                except StoreError:
                    raise
                except Exception:
                    self.broken = True
                    raise
        except BaseException:
            for kb in (*(kb for kb, _ in puts), *deletes):  # unknown outcome: re-read them from RocksDB
                self._cache.pop(kb, None)
            raise  # staged entries stay staged (and cached): the next write carries them again
        self._staged.clear()
        self.staged_bytes = 0
        for kb, entry in puts:  # in the batch's order: a delete of the same key wins
            self._cache.put(kb, entry)
        for kb in deletes:
            self._cache.pop(kb, None)

    def sync(self) -> None:
        """Make every write so far durable (fsync of the WAL)."""
        with self._db_lock, _rocksdb("sync WAL", self.path):
            try:
                self._live_db().flush_wal(True)
            except StoreError:
                raise
            except Exception:
                self.broken = True
                raise

    def hwm(self) -> Position | None:
        with self._db_lock, _rocksdb("read high-water mark", self.path):
            value = self._live_db().get(_HWM)
        return None if value is None else Position(*_POS.unpack(value))

    def entries(self) -> Iterator[tuple[bytes, IndexEntry]]:
        """Every (key bytes, entry), in key order."""
        for kb, value in self._iter_prefix(_BLOCK):
            yield kb, IndexEntry.unpack(value)

    def entries_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, IndexEntry]]:
        """(key bytes, entry) of every block whose key starts with ``prefix``, in key order."""
        for kb, value in self._iter_prefix(_BLOCK + prefix):
            yield kb, IndexEntry.unpack(value)

    def keys(self, prefix: bytes = b"") -> Iterator[bytes]:
        """Key bytes of every block whose key starts with ``prefix``."""
        for kb, _ in self._iter_prefix(_BLOCK + prefix):
            yield kb

    def _iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        strip = len(_BLOCK)
        start, skip_first = prefix, False
        while True:
            batch = self._read_batch(prefix, start, skip_first)
            for key, value in batch:
                yield key[strip:], value
            if len(batch) < _ITER_BATCH:
                return
            start, skip_first = batch[-1][0], True

    def _read_batch(self, prefix: bytes, start: bytes, skip_first: bool) -> list[tuple[bytes, bytes]]:
        """Up to ``_ITER_BATCH`` (key, value) pairs with ``prefix`` from ``start`` on, with one iterator that is
        gone when this returns."""
        out: list[tuple[bytes, bytes]] = []
        with self._db_lock, _rocksdb("iterate", self.path):
            it = self._live_db().iter()
            it.seek(start)
            if skip_first and it.valid() and it.key() == start:
                it.next()
            while len(out) < _ITER_BATCH and it.valid():
                key = it.key()
                if not key.startswith(prefix):
                    break
                out.append((key, it.value()))
                it.next()
            del it
        return out

    def close(self) -> None:
        self._cache.clear()
        with self._db_lock:
            db, self._db = self._db, None
            if db is None:
                return
            if self.broken:  # everything it acknowledged is in its WAL already; the close reports the old error
                try:
                    db.close()
                except Exception:  # noqa: BLE001
                    pass
                return
            with _rocksdb("close", self.path):
                try:
                    db.flush_wal(True)
                finally:
                    db.close()
