"""DiskTier recovery on open: torn tails, index/segment disagreement, durable deletes, rebuilds."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from rocksdict import AccessType, Options, Rdict

from kvfabric.record import Block, encode_record
from kvfabric.store.disk import DiskTier
from kvfabric.store.disk.index import BlockIndex
from kvfabric.store.disk.segment import Position, align_up, write_record
from kvfabric.store.disk.tier import INDEX_STAGE_ENTRIES
from tests.blocks import make_block, make_chain
from tests.store.tier_suite import same

REPO = Path(__file__).resolve().parents[2]


def open_tier(path: Path, **kw: object) -> DiskTier:
    kw.setdefault("fsync", "always")
    kw.setdefault("segment_bytes", 1 << 20)
    return DiskTier(path, **kw)  # type: ignore[arg-type]


def append_raw(segment: Path, block: Block, *, cut: int | None = None) -> int:
    """Append ``block``'s record at the aligned end of ``segment`` behind the tier's back (as a writer that died
    before indexing would have left it); ``cut`` keeps only that many bytes of it. Returns its offset."""
    header, payload = encode_record(block)
    offset = align_up(segment.stat().st_size)
    fd = os.open(segment, os.O_RDWR)
    try:
        record = header + bytes(payload)
        span = align_up(len(record))
        if cut is None:
            write_record(fd, offset, header, payload, span)
        else:
            os.pwrite(fd, record[:cut], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset


def last_segment(t: DiskTier) -> Path:
    return t.segment_paths()[-1]


def test_torn_tail_is_truncated(tmp_path: Path) -> None:
    chain = make_chain(5)
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        seg = last_segment(t)
    size = seg.stat().st_size
    torn = make_block(seed=99)
    append_raw(seg, torn, cut=300)  # header complete, payload torn
    assert seg.stat().st_size > size
    with open_tier(tmp_path) as t:
        assert t.recovery.truncated_bytes > 0
        assert seg.stat().st_size == size
        assert all(same(t.get(b.key), b) for b in chain)
        assert t.get(torn.key) is None
        t.put(torn)  # the tier stays usable and appends where the torn record was
        assert same(t.get(torn.key), torn)
    with open_tier(tmp_path) as t:
        assert t.recovery.truncated_bytes == 0
        assert all(same(t.get(b.key), b) for b in [*chain, torn])
        assert t.stats().blocks == 6


@pytest.mark.parametrize("cut", [1, 40, 4095, 4096, 4200])
def test_torn_tail_at_any_point(tmp_path: Path, cut: int) -> None:
    chain = make_chain(3)
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        seg = last_segment(t)
    size = seg.stat().st_size
    append_raw(seg, make_block(seed=42), cut=cut)
    with open_tier(tmp_path) as t:
        assert seg.stat().st_size == size
        assert t.stats().blocks == 3
        assert all(same(t.get(b.key), b) for b in chain)


@pytest.mark.parametrize("cut", [3000, 4000])
def test_index_entry_past_segment_end_is_dropped(tmp_path: Path, cut: int) -> None:
    chain = make_chain(4)  # 4 KiB payloads: each record spans 8 KiB, the last ~3.9 KiB of it padding
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        seg = last_segment(t)
        size = seg.stat().st_size
    os.truncate(seg, size - cut)  # 3000: only padding is lost; 4000: the last record loses its end
    lost = cut > 3900
    with open_tier(tmp_path) as t:
        assert t.recovery.dropped == int(lost)
        assert t.stats().blocks == 4 - lost
        assert all(same(t.get(b.key), b) for b in chain[:3])
        assert (t.get(chain[3].key) is None) == lost
        assert t.stats().corrupt == 0  # dropped at open, never read
        extra = make_block(seed=77)
        t.put_many([*chain, extra])
        assert seg.stat().st_size % 4096 == 0
    with open_tier(tmp_path) as t:
        assert all(same(t.get(b.key), b) for b in [*chain, extra])


def test_records_missing_from_index_are_reindexed(tmp_path: Path) -> None:
    chain = make_chain(6)
    with open_tier(tmp_path) as t:
        t.put_many(chain[:2])
        seg = last_segment(t)
    for b in chain[2:]:  # written and synced, but the writer died before indexing them
        append_raw(seg, b)
    with open_tier(tmp_path) as t:
        assert t.recovery.reindexed == 4
        assert t.stats().blocks == 6
        assert all(same(t.get(b.key), b) for b in chain)
    with open_tier(tmp_path) as t:  # and the next open has nothing left to scan
        assert t.recovery.reindexed == 0 and t.recovery.scanned_bytes == 0


def test_newest_record_of_a_key_wins_in_the_scan(tmp_path: Path) -> None:
    old = make_block(seed=1)
    new = Block(replace(old.meta, created_ms=old.meta.created_ms + 1), make_block(seed=2).payload)
    with open_tier(tmp_path) as t:
        t.put(old)
        seg = last_segment(t)
    append_raw(seg, old)
    append_raw(seg, new)
    with open_tier(tmp_path) as t:
        assert same(t.get(old.key), new)
        assert t.stats().blocks == 1


def test_unconfirmed_entry_at_a_bad_record_is_dropped(tmp_path: Path) -> None:
    """Entries at/after the high-water mark (indexed out of order before a crash) are verified at open."""
    chain = make_chain(4)
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        seg = last_segment(t)
        seg_id = int(seg.stem)
        entries = {e.key: e for p in t.segment_paths() for e in t.segment_entries(p)}
    index = BlockIndex(tmp_path / "index")  # rewind the mark to before block 2, as if its write were lost
    bad = entries[chain[2].key]
    index.write(hwm=Position(seg_id, bad.offset), sync=True)
    index.close()
    with open(seg, "r+b") as f:  # ... and block 2's payload never fully reached the disk
        f.seek(bad.offset + bad.record_len - 10)
        f.write(b"\xff" * 10)
    with open_tier(tmp_path) as t:
        assert t.recovery.dropped == 1
        assert t.get(chain[2].key) is None
        assert [same(t.get(b.key), b) for b in chain] == [True, True, False, True]


def test_rebuild_when_the_index_is_lost(tmp_path: Path) -> None:
    chain = make_chain(20)
    with open_tier(tmp_path, segment_bytes=64 << 10) as t:
        t.put_many(chain)
        assert len(t.segment_paths()) > 1
    shutil.rmtree(tmp_path / "index")
    with open_tier(tmp_path, segment_bytes=64 << 10) as t:
        assert t.recovery.reindexed == 20
        assert all(same(t.get(b.key), b) for b in chain)


def test_lost_segment_file_drops_its_entries(tmp_path: Path) -> None:
    chain = make_chain(20)
    with open_tier(tmp_path, segment_bytes=64 << 10) as t:
        t.put_many(chain)
        first = t.segment_paths()[0]
        in_first = {e.key for e in t.segment_entries(first)}
    first.unlink()
    with open_tier(tmp_path, segment_bytes=64 << 10) as t:
        assert t.recovery.dropped == len(in_first)
        for b in chain:
            assert (t.get(b.key) is None) == (b.key in in_first)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from kvfabric.store.disk import DiskTier
    from tests.blocks import make_chain
    chain = make_chain(12)
    t = DiskTier(sys.argv[1], fsync=sys.argv[2], segment_bytes=64 << 10)
    t.put_many(chain)
    for b in chain[::2]:
        assert t.delete(b.key)
    print("deleted", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(): whatever is durable now is all there is
    """
)


@pytest.mark.parametrize("fsync", ["always", "group", "none"])
def test_delete_is_durable_across_a_crash(tmp_path: Path, fsync: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "d"), fsync],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "deleted"
    chain = make_chain(12)
    with DiskTier(tmp_path / "d", segment_bytes=64 << 10) as t:
        for i, b in enumerate(chain):
            got = t.get(b.key)
            if i % 2 == 0:
                assert got is None, i
            else:  # created_ms differs from the writer's blocks, the bytes must not
                assert got is not None and bytes(memoryview(got.payload).cast("B")) == b.payload, i
        assert t.stats().blocks == 6


def test_delete_moves_the_high_water_mark_past_the_deleted_record(tmp_path: Path) -> None:
    """Recovery rescans from the mark; a delete must leave it past every record of the key, durably, before it
    returns (checked through a read-only view of the live index, with the tier still open)."""
    chain = make_chain(3)
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        (last,) = [e for e in t.segment_entries(last_segment(t)) if e.key == chain[2].key]
        t.delete(chain[2].key)
        view = Rdict(str(tmp_path / "index"), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            hwm = Position(*struct.unpack("<IQ", view[b"mhwm"]))
        finally:
            view.close()
        assert hwm >= Position(int(last_segment(t).stem), last.offset + last.record_len)


def test_delete_waits_for_older_writes_still_in_flight(tmp_path: Path) -> None:
    """A record of the key sits after a write that is still waiting for its group commit; the delete may only
    return once that write is done, or the mark it leaves behind would let recovery rescan (and resurrect) it."""
    chain = make_chain(10)
    k = chain[0]
    with open_tier(tmp_path, fsync="group", group_commit_ms=1500, segment_bytes=32 << 10) as t:
        t.put_many(chain[:5])  # k shares the first segment with 3 others...
        t.delete_many([b.key for b in chain[1:4]])  # ... that are deleted: compaction will move k
        t.put(chain[5])  # a sync starts now: the next group waits out the 1.5 s window
        a_done = threading.Event()

        def put_a() -> None:
            t.put(chain[6])
            a_done.set()

        writer = threading.Thread(target=put_a)
        writer.start()
        while not t._pending:
            time.sleep(0.001)
        assert t.compact(0.5).blocks_moved >= 1  # k's copy lands after A's slot and is indexed (always synced)
        assert not a_done.is_set()
        assert t.delete(k.key)
        assert a_done.is_set()  # the delete waited for A
        writer.join()
        assert t.get(k.key) is None and same(t.get(chain[6].key), chain[6])


_KILLED_STAGER = textwrap.dedent(
    """
    import os, signal, sys
    from kvfabric.store.disk import DiskTier
    from tests.blocks import make_chain
    chain = make_chain(int(sys.argv[3]))
    t = DiskTier(sys.argv[1], fsync=sys.argv[2])
    for b in chain:
        t.put(b)  # one by one: each put stages its index entry until a batch is full
    print(t._index.staged, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # staged index entries die with the process; the records are durable
    """
)


@pytest.mark.parametrize("fsync", ["always", "group", "none"])
@pytest.mark.parametrize("count", [5, 70])
def test_staged_index_entries_lost_in_a_crash_are_rebuilt(
    tmp_path: Path, fsync: str, count: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Index entries are written to RocksDB in batches; the ones still staged when the process dies are found
    again by the scan from the high-water mark, so every acknowledged put is there after the crash (and the
    repair is logged)."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_STAGER, str(tmp_path / "d"), fsync, str(count)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    staged = int(proc.stdout)
    assert staged == count % INDEX_STAGE_ENTRIES  # 70 puts wrote one full batch; 5 never fill one
    chain = make_chain(count)
    with caplog.at_level(logging.INFO, logger="kvfabric.store.disk.tier"), DiskTier(tmp_path / "d") as t:
        assert t.recovery.reindexed == staged
        assert f"re-indexed {staged}," in caplog.text
        for b in chain:
            got = t.get(b.key)
            assert got is not None and bytes(memoryview(got.payload).cast("B")) == b.payload
        assert t.stats().blocks == count


def test_staged_entries_are_visible_to_every_read(tmp_path: Path) -> None:
    """A staged entry is answered by get/head/contains at once, and written before any iteration of the index."""
    chain = make_chain(3)
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        assert t._index.staged == 3
        assert all(t.contains(b.key) and t.head(b.key) is not None and same(t.get(b.key), b) for b in chain)
        assert sorted(k.prefix for k in t.keys()) == sorted(b.key.prefix for b in chain)  # noqa: SIM118
        assert t._index.staged == 0
        assert len(list(t.iter_created_ms())) == 3
