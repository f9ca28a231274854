"""What a sealed segment holds, for whoever ships sealed segments elsewhere (the object tier).

A segment is *sealed* when the tier has moved on to a new active segment and every write reserved in the old one
has finished (synced and indexed, or abandoned): from then on its bytes never change until compaction removes the
file. The tier calls ``on_segment_sealed(path, entries)`` once per segment it seals while running, from the thread
that finished the segment's last write, outside the tier's locks; the hook should only enqueue work. Segments
sealed before a restart are not announced again: list them with ``DiskTier.sealed_segments()`` and their live
records with ``DiskTier.segment_entries()``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvfabric.store.entry import SegmentEntry

__all__ = ["SealedSegmentHook", "SegmentEntry"]


SealedSegmentHook = Callable[[Path, list[SegmentEntry]], None]
