"""The disk index's in-memory entry cache always agrees with RocksDB (real RocksDB, reopened to compare)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rocksdict import AccessType, Options, Rdict

from kvfabric.store.disk import index as index_mod
from kvfabric.store.disk.index import BlockIndex, IndexEntry


def _entry(i: int) -> IndexEntry:
    header = bytes([i % 256]) * 8
    return IndexEntry(1, i * 4096, len(header), 100 + i, 1000 + i, 7, header)


def _on_disk(path: Path, keys: list[bytes]) -> dict[bytes, IndexEntry | None]:
    fresh = BlockIndex(path)
    try:
        return {kb: fresh.get(kb) for kb in keys}
    finally:
        fresh.close()


def test_cache_follows_puts_deletes_and_batch_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "ENTRY_CACHE_ENTRIES", 4)
    path = tmp_path / "index"
    idx = BlockIndex(path)
    keys = [f"k{i}".encode() for i in range(10)]
    idx.write(puts=[(kb, _entry(i)) for i, kb in enumerate(keys)])
    assert [idx.get(kb) for kb in keys] == [_entry(i) for i in range(10)]
    assert len(idx._cache) <= 4  # bounded: the oldest entries were dropped and re-read from RocksDB
    idx.write(deletes=keys[:3])
    idx.write(puts=[(keys[3], _entry(33))], deletes=[keys[3]])  # one batch: the delete wins, as in RocksDB
    idx.write(puts=[(keys[4], _entry(44))])
    expected = {kb: idx.get(kb) for kb in keys}
    assert expected[keys[0]] is None and expected[keys[3]] is None and expected[keys[4]] == _entry(44)
    idx.close()
    assert _on_disk(path, keys) == expected


def test_staged_entries_outlive_cache_eviction_and_reach_rocksdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged entry pushed out of the (tiny) cache is still answered from the stage, and the next write carries
    every staged entry to RocksDB before its own puts and deletes."""
    monkeypatch.setattr(index_mod, "ENTRY_CACHE_ENTRIES", 4)
    path = tmp_path / "index"
    idx = BlockIndex(path)
    keys = [f"s{i}".encode() for i in range(10)]
    idx.stage([(kb, _entry(i)) for i, kb in enumerate(keys)])
    assert idx.staged == 10 and len(idx._cache) <= 4
    assert [idx.get(kb) for kb in keys] == [_entry(i) for i in range(10)]
    assert _on_disk_while_open(path, keys) == dict.fromkeys(keys)  # nothing in RocksDB yet
    idx.write(puts=[(keys[0], _entry(50))], deletes=[keys[1]])  # staged first, then this batch's own changes
    assert idx.staged == 0 and idx.staged_bytes == 0
    idx.close()
    expected = {kb: _entry(i) for i, kb in enumerate(keys)} | {keys[0]: _entry(50), keys[1]: None}
    assert _on_disk(path, keys) == expected


def _on_disk_while_open(path: Path, keys: list[bytes]) -> dict[bytes, IndexEntry | None]:
    """What RocksDB itself holds for ``keys``, through a read-only view beside the open writer."""
    view = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        return {
            kb: None if (v := view.get(index_mod.block_db_key(kb))) is None else IndexEntry.unpack(v) for kb in keys
        }
    finally:
        view.close()
