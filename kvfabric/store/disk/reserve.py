"""Room kept back on the disk tier's filesystem so that deletes, compaction and a RocksDB reopen still work once
the disk is full.

A preallocated file (``posix_fallocate``: real blocks, not a sparse hole) is created when the tier opens. When a
write fails for want of space the tier releases it: the freed blocks are what the index's delete records, a
compaction's first copies and RocksDB's reopen (a new WAL and MANIFEST) need. Puts stay refused until the
filesystem has the reserve *and* as much again free, so they cannot eat the room the deletes need; then the reserve
is taken back and puts resume.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kvfabric.store.disk.segment import fsync_dir

DEFAULT_RESERVE_BYTES = 16 << 20
NAME = "space-reserve"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write failures that mean: no room (the filesystem, a quota, or a file-size limit)."""


def free_bytes(path: Path) -> int:
    """Bytes this process can still write on ``path``'s filesystem (root may use the blocks kept for root)."""
    st = os.statvfs(path)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


class SpaceReserve:
    """The reserve file of one tier. Not thread-safe: the tier calls it under its state lock."""

    def __init__(self, directory: Path, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {nbytes}")
        self.path = directory / NAME
        self.nbytes = nbytes

    @property
    def held(self) -> bool:
        return self.nbytes == 0 or (self.path.exists() and self.path.stat().st_size >= self.nbytes)

    def take(self) -> bool:
        """Allocate the reserve if it is not held; ``False`` (and nothing left behind) when there is no room."""
        if self.held:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.path.parent)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            self.release()
            return False
        return True

    def release(self) -> bool:
        """Give the reserve's blocks back to the filesystem; ``True`` if there was one to give."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        try:
            fsync_dir(self.path.parent)
        except OSError:
            pass  # the unlink is what frees the blocks; its durability does not matter
        return True
