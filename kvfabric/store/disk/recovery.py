"""Reconcile the RocksDB index with the segment files when a disk tier opens.

The index stores a high-water mark (HWM) with every write: a position such that every record *before* it has had
its effect on the index (indexed, superseded, or deleted). Only records at or after the durable HWM can be missing
from the index, so recovery:

1. drops index entries whose segment is gone or whose record would extend past the end of its file;
2. walks every record from the HWM to the end of the newest segment, verifying header and payload checksums, and
   cuts each walked segment after its last good record (torn tails);
3. for each key seen in step 2 or indexed at/after the HWM, keeps the newest (highest-position) verified version:
   re-indexes records that were written and synced but never indexed, drops entries whose record did not verify;
4. writes the new HWM (the end of the newest segment) with a synced write, so the next open scans nothing.

Entries before the HWM are trusted to point at good records; a bit flip there is caught when the block is read
(miss, ``stats.corrupt``), which keeps opening a large tier proportional to its index, not its data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvfabric.store.disk.index import BlockIndex, IndexEntry
from kvfabric.store.disk.segment import ALIGN, Position, ScannedRecord, Segment, SegmentScan, align_up

_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening the tier found and repaired."""

    scanned_from: Position
    scanned_bytes: int
    reindexed: int
    """Records present in segments but missing from the index (synced, index write lost), now indexed."""
    dropped: int
    """Index entries removed: segment missing, record past the end of its file, or record failing verification."""
    truncated_bytes: int
    """Torn tail bytes cut from the ends of segments."""


@dataclass(slots=True)
class Recovered:
    """The reconciled state: the report, plus the accounting the tier keeps in memory."""

    report: RecoveryReport
    blocks: int = 0
    bytes: int = 0
    live_bytes: dict[int, int] = field(default_factory=dict)
    newest_records: dict[int, bytes] = field(default_factory=dict)
    """offset -> key bytes of the live records in the newest segment (the one that stays active)."""


def _entry_of(rec: ScannedRecord, segment: int) -> IndexEntry:
    h = rec.header
    return IndexEntry(
        segment, rec.offset, h.header_len, h.payload_len, h.payload_checksum, h.meta.created_ms, rec.header_bytes
    )


class _Accounting:
    def __init__(self, newest: int) -> None:
        self.newest = newest
        self.blocks = 0
        self.bytes = 0
        self.live: dict[int, int] = {}
        self.newest_records: dict[int, bytes] = {}

    def add(self, kb: bytes, e: IndexEntry, sign: int = 1) -> None:
        self.blocks += sign
        self.bytes += sign * e.payload_len
        self.live[e.segment] = self.live.get(e.segment, 0) + sign * e.span
        if e.segment == self.newest:
            if sign > 0:
                self.newest_records[e.offset] = kb
            else:
                self.newest_records.pop(e.offset, None)


def recover(index: BlockIndex, segments: dict[int, Segment]) -> Recovered:
    """Reconcile ``index`` with ``segments`` (which must not be empty); mutates both, returns the accounting."""
    newest = max(segments)
    hwm = index.hwm() or Position(min(segments), 0)
    acct = _Accounting(newest)

    # 1. bounds check every entry; set aside the ones at/after the HWM for verification by the scan
    drops: list[bytes] = []
    unconfirmed: dict[bytes, IndexEntry] = {}
    for kb, e in index.entries():
        seg = segments.get(e.segment)
        if seg is None or e.offset + e.record_len > seg.size:
            drops.append(kb)
        elif e.position >= hwm:
            unconfirmed[kb] = e
        else:
            acct.add(kb, e)
    dropped_keys = set(drops)

    # 2. walk the tail, verifying every record; cut torn tails
    found: dict[bytes, IndexEntry] = {}
    verified: dict[Position, bytes] = {}
    scanned = truncated = 0
    for seg in (segments[i] for i in sorted(segments) if i >= hwm.segment):
        start = hwm.offset if seg.id == hwm.segment else 0
        if start > seg.size:
            continue  # the file ends before the mark (lost with the page cache): step 1 dropped what it lost
        scan = SegmentScan(seg.fd, start, verify_payloads=True)
        for rec in scan:
            e = _entry_of(rec, seg.id)
            verified[e.position] = e.header
            found[rec.header.meta.key.to_bytes()] = e  # walk order is position order: the last one is the newest
        scanned += seg.size - start
        if seg.size != scan.valid_end:
            truncated += max(0, seg.size - scan.valid_end)
            os.ftruncate(seg.fd, scan.valid_end)
            os.fdatasync(seg.fd)
            seg.size = scan.valid_end

    # 3. per key, the newest verified version wins
    puts: list[tuple[bytes, IndexEntry]] = []
    reindexed = 0
    for kb in found.keys() | unconfirmed.keys():
        current: IndexEntry | None = None  # what the index holds now and keeps unless something newer verified
        old = unconfirmed.get(kb)
        if old is not None:
            if verified.get(old.position) == old.header:
                current = old
            else:
                drops.append(kb)
        elif kb not in dropped_keys:
            current = index.get(kb)  # an entry before the HWM, already accounted in step 1
            if current is not None:
                acct.add(kb, current, -1)
        new = found.get(kb)
        best = current if new is None or (current is not None and current.position >= new.position) else new
        if best is None:
            continue
        acct.add(kb, best)
        if best is not current:
            puts.append((kb, best))
            reindexed += 1

    put_keys = {kb for kb, _ in puts}
    deletes = [kb for kb in dict.fromkeys(drops) if kb not in put_keys]
    for i in range(0, max(len(deletes), len(puts)), _BATCH):
        index.write(puts=puts[i : i + _BATCH], deletes=deletes[i : i + _BATCH])
    newest_seg = segments[newest]
    if newest_seg.size % ALIGN:  # appends must start aligned
        newest_seg.size = align_up(newest_seg.size)
        os.ftruncate(newest_seg.fd, newest_seg.size)
        os.fdatasync(newest_seg.fd)
    index.write(hwm=newest_seg.position, sync=True)

    report = RecoveryReport(hwm, scanned, reindexed, len(set(drops)), truncated)
    return Recovered(report, acct.blocks, acct.bytes, acct.live, acct.newest_records)
