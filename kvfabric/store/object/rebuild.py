"""Rebuilding the index from what is in the bucket: pure logic over decoded manifests and tombstone lists.

For each key the latest event wins: a manifest row (a put) or a tombstone (a delete), ordered by their stamps
(``stored_ns`` / ``deleted_ns``; a tie goes to the delete). Segments no live key points into are dead; a tombstone
list is moot once no surviving segment holds an older row for any of its keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvfabric.ids import BlockKey
from kvfabric.store.object.manifest import SegmentEntry


@dataclass(frozen=True, slots=True)
class Located:
    """A record's home: which segment object, and its manifest row."""

    segment_id: str
    entry: SegmentEntry


@dataclass(slots=True)
class RebuildPlan:
    live: dict[BlockKey, Located] = field(default_factory=dict)
    live_per_segment: dict[str, int] = field(default_factory=dict)
    dead_segments: list[str] = field(default_factory=list)
    """Committed segments with no live record: delete manifest, then object."""
    moot_tombstones: list[str] = field(default_factory=list)
    """Tombstone lists that hide nothing once the dead segments are gone."""
    last_stamp: int = 0


def resolve(
    manifests: Mapping[str, Sequence[SegmentEntry]],
    tombstones: Mapping[str, Sequence[tuple[BlockKey, int]]],
) -> RebuildPlan:
    """The live index implied by ``manifests`` (segment id -> rows) and ``tombstones`` (list id -> deletes)."""
    plan = RebuildPlan()
    latest: dict[BlockKey, tuple[int, Located | None]] = {}
    for segment_id, entries in manifests.items():
        for entry in entries:
            cur = latest.get(entry.key)
            if cur is None or entry.stored_ns > cur[0]:
                latest[entry.key] = (entry.stored_ns, Located(segment_id, entry))
            plan.last_stamp = max(plan.last_stamp, entry.stored_ns)
    for deletes in tombstones.values():
        for key, deleted_ns in deletes:
            cur = latest.get(key)
            if cur is None or deleted_ns >= cur[0]:
                latest[key] = (deleted_ns, None)
            plan.last_stamp = max(plan.last_stamp, deleted_ns)

    for key, (_, located) in latest.items():
        if located is not None:
            plan.live[key] = located
            plan.live_per_segment[located.segment_id] = plan.live_per_segment.get(located.segment_id, 0) + 1
    plan.dead_segments = sorted(s for s in manifests if s not in plan.live_per_segment)

    oldest_surviving: dict[BlockKey, int] = {}
    for segment_id, entries in manifests.items():
        if segment_id in plan.live_per_segment:
            for entry in entries:
                prev = oldest_surviving.get(entry.key)
                if prev is None or entry.stored_ns < prev:
                    oldest_surviving[entry.key] = entry.stored_ns
    for list_id, deletes in sorted(tombstones.items()):
        if all(oldest_surviving.get(key, deleted_ns + 1) > deleted_ns for key, deleted_ns in deletes):
            plan.moot_tombstones.append(list_id)
    return plan
