"""What waits to be uploaded, in the order it must reach the store.

Sealed segments and batches of tombstones share one FIFO: a tombstone written before a segment is sealed commits
before it, so at rebuild a re-put after a delete is never hidden by that delete. Only the head is ever uploading;
once its upload has started it is *frozen* (its manifest rows are fixed), and everything behind it may still change.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from kvfabric.ids import BlockKey
from kvfabric.store.object.manifest import SegmentEntry

TOMBSTONE_ROW_BYTES = 128
"""Rough in-memory/Parquet cost of one pending tombstone, for the backlog's byte count."""


def new_object_id(stamp_ns: int) -> str:
    """A name that sorts by time and never collides: ``<20-digit ns>-<12 hex>``."""
    return f"{stamp_ns:020d}-{uuid.uuid4().hex[:12]}"


@dataclass(slots=True, eq=False)
class PendingSegment:
    """A segment still in memory: open (taking appends) or sealed (bytes fixed, waiting in the backlog)."""

    segment_id: str
    data: bytearray = field(default_factory=bytearray)
    entries: dict[BlockKey, SegmentEntry] = field(default_factory=dict)
    """Rows its manifest will have; a row leaves when its key is deleted or re-put, unless ``frozen``."""
    frozen: bool = False
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(slots=True, eq=False)
class PendingTombstones:
    """Keys deleted (with the time of each delete) that still have a committed copy in the store."""

    batch_id: str
    deleted: dict[BlockKey, int] = field(default_factory=dict)
    frozen: bool = False

    @property
    def nbytes(self) -> int:
        return TOMBSTONE_ROW_BYTES * len(self.deleted)


PendingItem = PendingSegment | PendingTombstones


class UploadBacklog:
    """FIFO of sealed segments and tombstone batches, with a running byte count. Not thread-safe: the tier's lock
    guards it."""

    def __init__(self) -> None:
        self._items: deque[PendingItem] = deque()
        self._tombstone_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._items if isinstance(i, PendingSegment)) + self._tombstone_bytes

    def head(self) -> PendingItem | None:
        return self._items[0] if self._items else None

    def push_segment(self, segment: PendingSegment) -> None:
        self._items.append(segment)

    def add_tombstone(self, key: BlockKey, deleted_ns: int) -> None:
        """Record a delete in the last batch if it is still open to change, else in a new one at the tail."""
        tail = self._items[-1] if self._items else None
        if not isinstance(tail, PendingTombstones) or tail.frozen:
            tail = PendingTombstones(new_object_id(deleted_ns))
            self._items.append(tail)
        if key not in tail.deleted:
            self._tombstone_bytes += TOMBSTONE_ROW_BYTES
        tail.deleted[key] = deleted_ns

    def pop_head(self, item: PendingItem) -> None:
        if not self._items or self._items[0] is not item:
            raise RuntimeError("backlog head changed while it was uploading")
        self._items.popleft()
        if isinstance(item, PendingTombstones):
            self._tombstone_bytes -= item.nbytes

    def frozen_head_segment(self) -> PendingSegment | None:
        head = self.head()
        return head if isinstance(head, PendingSegment) and head.frozen else None
