"""A real full filesystem under the disk tier (a loop-mounted 64 MiB ext4): the tier says ``tier_full``, keeps
serving reads byte for byte, keeps deleting and compacting, and resumes puts by itself once space is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfabric.errors import DiskFullError, TierFullError
from kvfabric.record import Block
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.disk import DiskTier
from kvfabric.store.disk.index import BlockIndex, IndexEntry
from tests.blocks import make_chain
from tests.loopfs import fill, small_filesystem
from tests.store.tier_suite import same

BIG = ModelSpec(model="test/full", num_layers=4, kv_heads=8, head_dim=64, dtype=DType.BFLOAT16, block_size=16)
"""256 KiB blocks: a 64 MiB filesystem fills in a couple of hundred puts."""
RESERVE = 2 << 20


def put_until_full(t: DiskTier, chain: list[Block]) -> tuple[list[Block], DiskFullError]:
    stored = []
    for b in chain:
        try:
            t.put(b)
        except DiskFullError as exc:
            return stored, exc
        stored.append(b)
    raise AssertionError(f"{len(chain)} blocks fitted: the filesystem never filled")


def test_full_disk_serves_reads_deletes_compacts_and_resumes(tmp_path: Path) -> None:
    chain = make_chain(400, spec=BIG)
    with small_filesystem(tmp_path) as fs:
        t = DiskTier(fs / "disk", segment_bytes=4 << 20, reserve_bytes=RESERVE)
        try:
            assert t.condition() is None and t.disk_state().reserve_held
            stored, exc = put_until_full(t, chain)
            assert isinstance(exc, TierFullError) and "No space left" in str(exc)
            failed = chain[len(stored)]
            state = t.disk_state()
            assert state.full and state.full_episodes == 1 and not state.reserve_held
            assert "No space left" in (t.condition() or "")
            # puts are refused at once, without writing
            usage = t.disk_usage()
            with pytest.raises(DiskFullError, match="puts resume once"):
                t.put(failed)
            assert t.disk_usage() == usage and t.disk_state().refused_puts >= 1
            assert not t.contains(failed.key)
            # reads go on, byte for byte
            assert all(same(t.get(b.key), b) for b in stored)
            # deletes and compaction work on the full disk
            gone, kept = stored[: len(stored) // 2], stored[len(stored) // 2 :]
            assert t.delete_many([b.key for b in gone]) == len(gone)
            result = t.compact()
            assert result.segments_removed > 0 and result.bytes_reclaimed > 0
            assert not any(t.contains(b.key) for b in gone)
            # the room is back: puts resume with no restart, the reserve is held again
            t.put(failed)
            assert t.condition() is None and t.disk_state().reserve_held
            assert same(t.get(failed.key), failed)
            assert all(same(t.get(b.key), b) for b in kept)
        finally:
            t.close()
        with DiskTier(fs / "disk", segment_bytes=4 << 20, reserve_bytes=RESERVE) as t:
            assert {k.to_bytes() for k in t.keys()} == {b.key.to_bytes() for b in [*kept, failed]}
            assert all(same(t.get(b.key), b) for b in [*kept, failed])


def test_disk_filled_by_another_file_recovers_when_it_goes(tmp_path: Path) -> None:
    chain = make_chain(60, spec=BIG)
    with small_filesystem(tmp_path) as fs:
        with DiskTier(fs / "disk", segment_bytes=4 << 20, reserve_bytes=RESERVE) as t:
            t.put_many(chain[:20])
            ballast = fs / "ballast"
            fill(ballast)
            stored, _ = put_until_full(t, chain[20:])
            stored = chain[:20] + stored
            assert t.condition() is not None
            assert all(same(t.get(b.key), b) for b in stored)
            assert t.delete(stored[0].key)  # the released reserve takes the delete's index write
            with pytest.raises(DiskFullError):
                t.put(chain[-1])
            ballast.unlink()
            assert t.condition() is None  # readiness recovers without a put
            t.put_many(chain[-5:])
            assert all(same(t.get(b.key), b) for b in [*stored[1:], *chain[-5:]])


def test_rocksdb_sticky_error_cleared_by_reopen(tmp_path: Path) -> None:
    """RocksDB refuses every write after an out-of-space one, even once space is back; a reopen in place clears
    it and keeps what it had acknowledged."""
    header = b"h" * 64
    with small_filesystem(tmp_path, size_mib=32) as fs:
        index = BlockIndex(fs / "index")
        try:
            entry = IndexEntry(1, 0, len(header), 4096, 7, 1, header)
            first = [(b"a%05d" % i, entry._replace(offset=i)) for i in range(2500)]
            index.write(puts=first, sync=True)
            ballast = fs / "ballast"
            fill(ballast)
            acked = []
            with pytest.raises(DiskFullError, match="No space left"):
                for i in range(200_000):
                    kb = b"k%d" % i
                    index.write(puts=[(kb, entry._replace(offset=i * 4096))], sync=i % 100 == 0)
                    acked.append(kb)
            assert index.broken
            ballast.unlink()
            with pytest.raises(DiskFullError):  # sticky: space is back, RocksDB still refuses
                index.write(puts=[(b"after", entry)])
            index.reopen()
            assert not index.broken and index.reopens == 1
            index.write(puts=[(b"after", entry)], deletes=[first[0][0]], sync=True)
            assert index.get(b"after") == entry and index.get(first[0][0]) is None
            # everything acknowledged before the failure is still there; iteration spans several batches
            want = {kb for kb, _ in first[1:]} | set(acked) | {b"after"}
            assert set(index.keys()) == want
            assert len(want) > 2 * 1024
        finally:
            index.close()

