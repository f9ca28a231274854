"""DiskTier recovery on open: torn tails, index/segment disagreement, durable deletes, rebuilds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from kvfabric.record import Block, encode_record
from kvfabric.store.disk import DiskTier
from kvfabric.store.disk.index import BlockIndex
from kvfabric.store.disk.segment import Position, align_up, write_record
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


def test_delete_is_durable_when_the_index_tail_is_rewound(tmp_path: Path) -> None:
    """The delete moved the high-water mark past the deleted record, so a rescan cannot bring it back."""
    chain = make_chain(3)
    with open_tier(tmp_path) as t:
        t.put_many(chain)
        t.delete(chain[2].key)
        seg_id = int(last_segment(t).stem)
    index = BlockIndex(tmp_path / "index")
    hwm = index.hwm()
    index.close()
    assert hwm is not None and hwm.segment == seg_id
    with open_tier(tmp_path) as t:
        assert t.get(chain[2].key) is None
        assert t.recovery.reindexed == 0
