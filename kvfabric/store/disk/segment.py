"""Segment files: append-only runs of block records, each starting at a 4 KiB-aligned offset.

A segment holds nothing but records from :func:`kvfabric.record.encode_record`, back to back, each padded with zeros
to the next multiple of :data:`ALIGN`, so O_DIRECT and GPUDirect Storage can read any record (and its payload, at
``offset + header_len``) in place. The file name carries the segment id; the file itself has no superblock, so a
sealed segment can be uploaded and range-read as is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kvfabric.errors import RecordError
from kvfabric.record import MAX_HEADER_LEN, RecordHeader, checksum, decode_header

ALIGN = 4096
"""Every record starts at a multiple of this (the logical block size O_DIRECT and GDS need)."""

SUFFIX = ".seg"
_ZEROS = bytes(ALIGN)


class Position(NamedTuple):
    """Where a record starts: (segment id, byte offset). Tuple order is write order across the whole tier."""

    segment: int
    offset: int


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_path(directory: Path, segment_id: int) -> Path:
    return directory / f"{segment_id:010d}{SUFFIX}"


def list_segment_ids(directory: Path) -> list[int]:
    """Ids of the segment files in ``directory``, ascending; foreign files are ignored."""
    ids = []
    for p in directory.iterdir():
        if p.suffix == SUFFIX and p.stem.isdigit():
            ids.append(int(p.stem))
    return sorted(ids)


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and removals of entries in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True, eq=False)
class Segment:
    """One open segment file and the tier's bookkeeping for it (all fields but ``fd`` guarded by the tier lock)."""

    id: int
    path: Path
    fd: int
    size: int
    """Append end: the aligned end of the last reserved record (the file length once pending writes land)."""
    live_bytes: int = 0
    """Aligned spans of the records the index points at; compaction picks segments where this is low."""
    pending: int = 0
    """Writes reserved in this segment and not yet committed or abandoned; a segment with pending writes is
    neither announced as sealed nor compacted."""
    readers: int = 0
    """Reads in progress; a retired segment's fd is closed when the last one finishes."""
    sealed: bool = False
    retired: bool = False
    """Removed by compaction: the file is unlinked and no index entry points here any more."""
    records: dict[int, bytes] | None = None
    """offset -> key of the records appended while this segment was active (for the sealed-segment hook)."""

    @property
    def position(self) -> Position:
        return Position(self.id, self.size)

    @classmethod
    def create(cls, directory: Path, segment_id: int) -> Segment:
        path = segment_path(directory, segment_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fsync_dir(directory)  # the new name must survive a crash before the records that land in it are acked
        return cls(segment_id, path, fd, 0, records={})

    @classmethod
    def open(cls, directory: Path, segment_id: int) -> Segment:
        path = segment_path(directory, segment_id)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return cls(segment_id, path, fd, os.fstat(fd).st_size)


def write_record(fd: int, offset: int, header: bytes, payload: bytes | memoryview, span: int) -> None:
    """Write ``header || payload || zero padding`` (``span`` bytes in all) at ``offset`` with pwritev, never copying
    the payload; short writes are continued. Raises OSError (ENOSPC, EIO, ...) with the file possibly torn."""
    pad = span - len(header) - len(payload)
    bufs: list[memoryview] = [memoryview(header), memoryview(payload).cast("B")]
    if pad:
        bufs.append(memoryview(_ZEROS)[:pad])
    if not _transfer(os.pwritev, fd, offset, bufs, span):
        raise OSError(f"pwritev wrote nothing at offset {offset}")


def read_into(fd: int, offset: int, bufs: list[Any]) -> bool:
    """Fill ``bufs`` (flat byte buffers) from ``offset`` with preadv (straight into the caller's memory); ``False``
    if the file ends first."""
    return _transfer(os.preadv, fd, offset, bufs, sum(map(len, bufs)))


def _transfer(call: Callable[[int, Any, int], int], fd: int, offset: int, bufs: list[Any], want: int) -> bool:
    """Move ``want`` bytes between ``bufs`` and the file at ``offset`` with ``call`` (pwritev or preadv): one call
    as a rule, continued after a short one; ``False`` if a call moves nothing (end of file, or a stuck write)."""
    done = call(fd, bufs, offset) if want else 0
    if done == want:
        return True
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    n = done
    while views:
        if n == 0:
            return False
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
        if views:
            n = call(fd, views, offset)
    return True


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    """A record found by walking a segment: its header (verified) and, when asked for, a verified payload."""

    offset: int
    header: RecordHeader
    header_bytes: bytes

    @property
    def span(self) -> int:
        return align_up(self.header.record_len)


class SegmentScan:
    """Walks the records of one segment file from ``start`` to its end.

    Each aligned slot either starts a record whose header checksum holds, or is skipped (torn or garbage bytes:
    the walk resynchronises at the next aligned offset). A record whose header holds but whose payload fails
    verification is skipped whole, by the span its header claims, so bytes *inside* a payload are never taken
    for a header. ``valid_end`` is the aligned end of the last good record, where a torn tail is cut.
    """

    def __init__(self, fd: int, start: int, *, verify_payloads: bool) -> None:
        self.fd = fd
        self.start = start
        self.end = os.fstat(fd).st_size
        self.verify_payloads = verify_payloads
        self.valid_end = start

    def __iter__(self) -> Iterator[ScannedRecord]:
        pos = self.start
        while pos < self.end:
            head = os.pread(self.fd, min(MAX_HEADER_LEN, self.end - pos), pos)
            try:
                header = decode_header(head)
            except RecordError:
                pos += ALIGN
                continue
            span = align_up(header.record_len)
            if pos + header.record_len > self.end:
                pos += ALIGN  # torn: the header landed, the payload did not (fully)
                continue
            if self.verify_payloads and not self._payload_ok(pos, header):
                pos += span
                continue
            self.valid_end = pos + span
            yield ScannedRecord(pos, header, bytes(head[: header.header_len]))
            pos += span

    def _payload_ok(self, pos: int, header: RecordHeader) -> bool:
        payload = np.empty(header.payload_len, dtype=np.uint8)
        if not read_into(self.fd, pos + header.header_len, [memoryview(payload)]):
            return False
        return checksum(payload) == header.payload_checksum
