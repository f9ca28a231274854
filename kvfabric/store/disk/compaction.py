"""Which sealed segments are worth compacting, and what a compaction run did.

Compaction copies a segment's live records to the active segment and deletes the file. The tier does the copying
(through its own append path, so copies are ordered, synced and indexed like puts); this module holds the policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvfabric.store.disk.segment import Segment

COPY_BATCH_BYTES = 64 << 20
"""Copies made durable with one fdatasync and indexed with one write batch."""


@dataclass(frozen=True, slots=True)
class CompactionResult:
    segments_removed: int
    bytes_reclaimed: int
    """Segment file bytes freed, net of the copies written."""
    blocks_moved: int
    corrupt_dropped: int


def live_fraction(seg: Segment) -> float:
    return seg.live_bytes / seg.size if seg.size else 0.0


def select_segments(segments: Iterable[Segment], min_live_fraction: float) -> list[Segment]:
    """Sealed, quiescent segments whose live fraction is below ``min_live_fraction``, emptiest first (the cheapest
    to reclaim)."""
    if not 0.0 <= min_live_fraction <= 1.0:
        raise ValueError(f"min_live_fraction must be within [0, 1], got {min_live_fraction}")
    picked = [
        s for s in segments
        if s.sealed and not s.retired and s.pending == 0 and s.records is None
        and live_fraction(s) < min_live_fraction
    ]  # fmt: skip
    return sorted(picked, key=live_fraction)
