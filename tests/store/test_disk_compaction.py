"""DiskTier compaction: reclaims space, keeps every live block, survives reopen, tolerates concurrent writes."""

from __future__ import annotations

import threading
from pathlib import Path

from kvfabric.store.disk import DiskTier
from tests.blocks import make_chain
from tests.store.tier_suite import same

SEG = 64 << 10  # 8 records of 8 KiB spans per segment


def test_compaction_reclaims_space_and_keeps_live_blocks(tmp_path: Path) -> None:
    chain = make_chain(64)
    live = [b for i, b in enumerate(chain) if i % 4 == 0]
    dead = [b for i, b in enumerate(chain) if i % 4 != 0]
    with DiskTier(tmp_path, segment_bytes=SEG, fsync="group") as t:
        t.put_many(chain)
        segments_before = t.segment_paths()
        used_before = t.disk_usage()
        assert len(segments_before) == 8
        assert t.delete_many([b.key for b in dead]) == len(dead)
        result = t.compact(min_live_fraction=0.5)
        assert result.segments_removed == 7  # every sealed one; the active segment is never compacted
        assert result.blocks_moved == 14
        assert result.corrupt_dropped == 0
        assert t.disk_usage() < used_before / 2
        assert result.bytes_reclaimed == used_before - t.disk_usage()
        assert not any(p.exists() for p in segments_before[:-1])
        assert all(same(t.get(b.key), b) for b in live)
        assert all(t.get(b.key) is None for b in dead)
        assert t.stats().blocks == len(live)
        # the copies filled and sealed the old active segment, so a second run may take that one; then it settles
        assert [t.compact().segments_removed for _ in range(3)][1:] == [0, 0]
        assert all(same(t.get(b.key), b) for b in live)
    with DiskTier(tmp_path, segment_bytes=SEG) as t:
        assert t.recovery.reindexed == 0 and t.recovery.dropped == 0
        assert all(same(t.get(b.key), b) for b in live)
        assert all(t.get(b.key) is None for b in dead)
        assert t.stats().blocks == len(live)


def test_compaction_leaves_well_filled_segments_alone(tmp_path: Path) -> None:
    chain = make_chain(32)
    with DiskTier(tmp_path, segment_bytes=SEG) as t:
        t.put_many(chain)
        t.delete_many([b.key for b in chain[:2]])  # the first segment is still 3/4 live
        paths = t.segment_paths()
        assert t.compact(0.5).segments_removed == 0
        assert t.segment_paths() == paths
        assert t.compact(0.8).segments_removed == 1  # full segments (fraction 1.0) are never worth it
        assert not paths[0].exists() and all(p.exists() for p in paths[1:])
        assert all(same(t.get(b.key), b) for b in chain[2:])


def test_compaction_with_concurrent_puts_and_deletes(tmp_path: Path) -> None:
    chain = make_chain(200)
    survivors = {b.key: b for b in chain}
    with DiskTier(tmp_path, segment_bytes=SEG, fsync="group", group_commit_ms=0.5) as t:
        t.put_many(chain[:100])
        t.delete_many([b.key for b in chain[:100:3]])
        for b in chain[:100:3]:
            survivors.pop(b.key)
        errors: list[Exception] = []

        def writer() -> None:
            try:
                for b in chain[100:]:
                    t.put(b)
                for b in chain[1:100:3]:
                    t.delete(b.key)
            except Exception as exc:  # noqa: BLE001 - handed to the main thread
                errors.append(exc)

        th = threading.Thread(target=writer)
        th.start()
        for _ in range(5):
            t.compact(0.9)
        th.join()
        assert not errors
        for b in chain[1:100:3]:
            survivors.pop(b.key)
        t.compact(0.9)
        assert all(same(t.get(k), b) for k, b in survivors.items())
        assert t.stats().blocks == len(survivors)
    with DiskTier(tmp_path, segment_bytes=SEG) as t:
        assert {k.to_bytes() for k in t.keys()} == {k.to_bytes() for k in survivors}
        assert all(same(t.get(k), b) for k, b in survivors.items())


def test_compaction_drops_a_corrupt_record_instead_of_copying_it(tmp_path: Path) -> None:
    chain = make_chain(16)
    with DiskTier(tmp_path, segment_bytes=SEG) as t:
        t.put_many(chain)
        t.delete_many([b.key for b in chain[1:8]])
        first = t.segment_paths()[0]
        (entry,) = t.segment_entries(first)
        assert entry.key == chain[0].key
        with open(first, "r+b") as f:
            f.seek(entry.offset + entry.record_len - 1)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
        result = t.compact()
        assert result.corrupt_dropped == 1 and result.segments_removed == 1
        assert t.stats().corrupt == 1
        assert t.get(chain[0].key) is None
        assert all(same(t.get(b.key), b) for b in chain[8:])
