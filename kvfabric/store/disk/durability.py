"""When segment bytes become durable: the fsync policy and the group committer behind ``fsync="group"``."""

from __future__ import annotations

import enum
import os
import threading
import time

from kvfabric.store.disk.segment import Segment


class FsyncPolicy(enum.Enum):
    ALWAYS = "always"
    """Every put runs its own fdatasync before it returns."""
    GROUP = "group"
    """Puts wait for a shared fdatasync; at most one starts per group-commit window. A put still returns only
    after its bytes are synced: acknowledged means durable."""
    NONE = "none"
    """No fdatasync on the put path: a process crash loses nothing (the page cache survives it), a power loss
    may lose recent puts."""

    @classmethod
    def parse(cls, value: str | FsyncPolicy) -> FsyncPolicy:
        if isinstance(value, FsyncPolicy):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown fsync policy {value!r}; known: {[p.value for p in cls]}") from None


class SyncGroup:
    """The writes that one fdatasync round will cover."""

    __slots__ = ("done", "error", "segments")

    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}
        self.done = False
        self.error: OSError | None = None


class GroupCommitter:
    """Leader-based group commit, with no thread of its own.

    A writer whose pwrite has returned joins the open group, then waits for it. The first waiter to find no sync in
    progress becomes the leader: it holds the group open until ``window_s`` has passed since the previous sync
    started (so concurrent writers pile in), swaps in a fresh open group, runs fdatasync on every segment the group
    touched, and wakes everyone. Writers that arrive during a sync join the next group.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._cond = threading.Condition()
        self._open = SyncGroup()
        self._syncing = False
        self._last_start = 0.0

    def join(self, segment: Segment) -> SyncGroup:
        """Register a completed write to ``segment``; returns the group whose sync will cover it."""
        with self._cond:
            self._open.segments[segment.id] = segment
            return self._open

    def wait(self, group: SyncGroup) -> None:
        """Return once ``group`` is durable; raise the OSError of a failed fdatasync."""
        with self._cond:
            while not group.done:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._lead()
            if group.error is not None:
                raise group.error

    def _lead(self) -> None:
        self._syncing = True
        try:
            deadline = self._last_start + self.window_s
            while (delay := deadline - time.monotonic()) > 0:
                self._cond.wait(delay)  # nobody else leads meanwhile; new writers join the open group
            batch, self._open = self._open, SyncGroup()
            self._last_start = time.monotonic()
            self._cond.release()
            try:
                for seg in batch.segments.values():
                    os.fdatasync(seg.fd)
            except OSError as exc:
                batch.error = exc
            finally:
                self._cond.acquire()
            batch.done = True
        finally:
            self._syncing = False
            self._cond.notify_all()
