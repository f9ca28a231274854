"""The NVMe tier: append-only segment files of 4 KiB-aligned block records, indexed by RocksDB."""

from kvfabric.store.disk.compaction import CompactionResult
from kvfabric.store.disk.durability import FsyncPolicy
from kvfabric.store.disk.recovery import RecoveryReport
from kvfabric.store.disk.sealed import SealedSegmentHook, SegmentEntry
from kvfabric.store.disk.segment import ALIGN
from kvfabric.store.disk.tier import DEFAULT_SEGMENT_BYTES, DiskTier

__all__ = [
    "ALIGN",
    "DEFAULT_SEGMENT_BYTES",
    "CompactionResult",
    "DiskTier",
    "FsyncPolicy",
    "RecoveryReport",
    "SealedSegmentHook",
    "SegmentEntry",
]
