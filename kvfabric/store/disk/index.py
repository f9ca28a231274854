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
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from kvfabric.errors import StoreError
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
        raise StoreError(f"RocksDB index at {path}: {what} failed: {exc}") from exc


class BlockIndex:
    """Thin typed layer over one RocksDB database; callers serialise writes that must stay ordered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_background_jobs(2)
        with _rocksdb("open", path):
            self._db = Rdict(str(path), options)
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
            fmt = self._db.get(_FORMAT)
        if fmt is None:
            with _rocksdb("write format", path):
                self._db.put(_FORMAT, INDEX_FORMAT, self._sync)
        elif fmt != INDEX_FORMAT:
            self._db.close()
            raise StoreError(f"RocksDB index at {path} has format {fmt!r}, this build reads {INDEX_FORMAT!r}")

    def get(self, key_bytes: bytes) -> IndexEntry | None:
        entry = self._cache.get(key_bytes)
        if entry is not None:
            return entry
        entry = self._staged.get(key_bytes)  # staged, and since pushed out of the cache
        if entry is not None:
            return entry
        try:  # no context manager here: this is on every read's path
            value = self._db.get(_BLOCK + key_bytes)
        except Exception as exc:
            raise StoreError(f"RocksDB index at {self.path}: get failed: {exc}") from exc
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
            with _rocksdb("write", self.path):
                self._db.write(batch, self._sync if sync else self._nosync)
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
        with _rocksdb("sync WAL", self.path):
            self._db.flush_wal(True)

    def hwm(self) -> Position | None:
        with _rocksdb("read high-water mark", self.path):
            value = self._db.get(_HWM)
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
        with _rocksdb("iterate", self.path):
            it = self._db.iter()
            it.seek(prefix)
        strip = len(_BLOCK)
        while True:
            with _rocksdb("iterate", self.path):
                if not it.valid():
                    return
                key = it.key()
                if not key.startswith(prefix):
                    return
                value = it.value()
                it.next()
            yield key[strip:], value

    def close(self) -> None:
        self._cache.clear()
        with _rocksdb("close", self.path):
            self._db.flush_wal(True)
            self._db.close()
