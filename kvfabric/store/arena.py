"""One contiguous byte region for the RAM tier, and the allocator that carves it into extents.

The region is an mmap of a file under ``/dev/shm`` so a client on the same host can map the same file read-only and
read a leased block in place (the shm fast path); with ``shm_dir=None`` it is an anonymous mapping instead.

A process that dies without closing its arena (a crash, ``kill -9``) would leave the file, and its memory, behind.
So every arena holds a shared ``flock`` on its file for its whole life, and each new arena first removes the arena
files in its directory that nobody holds a lock on any more. The kernel drops a dead process's locks, in any PID
namespace, so a live arena is never taken for a stale one. A file is created under a hidden temporary name, locked,
then renamed, so it is never visible unlocked.

The allocator is best-fit over a free list of extents kept twice: by offset (to coalesce a freed extent with its
neighbours in O(log n)) and by (size, offset) (to find the smallest extent that fits in O(log n)). Every extent is a
multiple of ``alignment`` bytes and starts at a multiple of it.

Not thread-safe: its owner (the RAM tier) serialises every call under its own lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import time
from pathlib import Path

from sortedcontainers import SortedDict, SortedList

from kvfabric.errors import StoreError

DEFAULT_ALIGNMENT = 64
"""One cache line: copies into and out of the arena start aligned, and small blocks waste little."""
TMP_GRACE_S = 60.0
"""A hidden arena file younger than this may be mid-creation (created, not yet locked): the sweep leaves it."""


def _round_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class Arena:
    """A fixed-size byte region with ``alloc``/``free`` of variable-size extents and ``view`` into them."""

    def __init__(
        self,
        size: int,
        *,
        shm_dir: str | os.PathLike[str] | None = "/dev/shm",
        alignment: int = DEFAULT_ALIGNMENT,
        name_prefix: str = "kvfabric-ram",
        prefault: bool = False,
    ) -> None:
        """``prefault`` maps every page up front (MAP_POPULATE): the arena's memory is committed at once, and first
        writes run at copy speed instead of paying a page fault per 4 KiB."""
        if size <= 0:
            raise ValueError(f"arena size must be positive, got {size}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"arena alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.size = _round_up(size, max(alignment, mmap.PAGESIZE))
        self._path: Path | None = None
        populate = mmap.MAP_POPULATE if prefault else 0
        self._fd: int | None = None
        if shm_dir is None:
            self._mmap = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        else:
            directory = Path(shm_dir)
            sweep_stale_arenas(directory, name_prefix)
            name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(8)}"
            path, tmp = directory / name, directory / f".{name}.tmp"
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot create arena file {path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # held until close: marks the file as in use
                os.ftruncate(fd, self.size)
                self._mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED | populate, mmap.PROT_READ | mmap.PROT_WRITE)
                os.rename(tmp, path)
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise StoreError(f"cannot map arena file {path} of {self.size} bytes: {exc}") from exc
            self._fd = fd
            self._path = path
        self._view = memoryview(self._mmap)
        self._free_by_offset: SortedDict = SortedDict({0: self.size})
        self._free_by_size: SortedList = SortedList([(self.size, 0)])
        self._used: dict[int, int] = {}
        self._used_bytes = 0
        self._closed = False

    # --- introspection -----------------------------------------------------------------------------------------
    @property
    def path(self) -> str | None:
        """The shared-memory file backing the arena, or ``None`` for an anonymous mapping."""
        return str(self._path) if self._path is not None else None

    @property
    def used_bytes(self) -> int:
        """Bytes in allocated extents (alignment padding included)."""
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self.size - self._used_bytes

    @property
    def largest_free(self) -> int:
        """The biggest single allocation that would succeed now."""
        return self._free_by_size[-1][0] if self._free_by_size else 0

    def extent_size(self, n: int) -> int:
        """How many arena bytes an allocation of ``n`` bytes takes."""
        return _round_up(max(n, 1), self.alignment)

    # --- allocation ----------------------------------------------------------------------------------------------
    def alloc(self, n: int) -> int | None:
        """Offset of a fresh extent of at least ``n`` bytes, or ``None`` when no free extent is big enough."""
        if self._closed:
            raise StoreError("arena is closed")
        need = self.extent_size(n)
        i = self._free_by_size.bisect_left((need, -1))
        if i == len(self._free_by_size):
            return None
        size, offset = self._free_by_size.pop(i)
        del self._free_by_offset[offset]
        if size > need:
            self._add_free(offset + need, size - need)
        self._used[offset] = need
        self._used_bytes += need
        return offset

    def free(self, offset: int) -> None:
        """Return the extent at ``offset`` to the free list, merged with free neighbours."""
        try:
            size = self._used.pop(offset)
        except KeyError:
            raise ValueError(f"arena offset {offset} is not an allocated extent") from None
        self._used_bytes -= size
        nxt = offset + size
        if nxt in self._free_by_offset:
            size += self._remove_free(nxt)
        i = self._free_by_offset.bisect_left(offset)
        if i > 0:
            prev, prev_size = self._free_by_offset.peekitem(i - 1)
            if prev + prev_size == offset:
                self._remove_free(prev)
                offset, size = prev, prev_size + size
        self._add_free(offset, size)

    def split(self, offset: int, sizes: list[int]) -> list[int]:
        """Cut the allocated extent at ``offset`` into consecutive extents of ``sizes`` (each a multiple of the
        alignment, adding up to the extent's size), each then freed on its own; their offsets."""
        size = self._used.get(offset)
        if size is None:
            raise ValueError(f"arena offset {offset} is not an allocated extent")
        if sum(sizes) != size or any(n <= 0 or n % self.alignment for n in sizes):
            raise ValueError(f"cannot split an extent of {size} bytes into {sizes}")
        offsets = []
        for n in sizes:
            self._used[offset] = n
            offsets.append(offset)
            offset += n
        return offsets

    def view(self, offset: int, n: int) -> memoryview:
        """A writable view of ``n`` bytes at ``offset``; valid until the extent is freed or the arena closed."""
        if self._closed:
            raise StoreError("arena is closed")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(f"view [{offset}, {offset + n}) outside the arena of {self.size} bytes")
        return self._view[offset : offset + n]

    def close(self) -> None:
        """Unmap and unlink. Views still held by callers keep the mapping alive until they are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when the last one is garbage-collected
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    # --- free-list bookkeeping -----------------------------------------------------------------------------------
    def _add_free(self, offset: int, size: int) -> None:
        self._free_by_offset[offset] = size
        self._free_by_size.add((size, offset))

    def _remove_free(self, offset: int) -> int:
        size = self._free_by_offset.pop(offset)
        self._free_by_size.remove((size, offset))
        return size


def sweep_stale_arenas(directory: Path, name_prefix: str) -> list[Path]:
    """Remove this user's arena files in ``directory`` that no process holds locked (their owner died); the paths
    removed."""
    removed = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        is_tmp = entry.name.startswith(f".{name_prefix}-")
        if not (entry.name.startswith(f"{name_prefix}-") or is_tmp):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or st.st_uid != uid:
                continue
            if is_tmp and time.time() - st.st_mtime < TMP_GRACE_S:
                continue  # possibly being created right now, not yet locked
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live arena
        finally:
            os.close(fd)  # (also drops the lock just taken)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
