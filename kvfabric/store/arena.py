"""One contiguous byte region for the RAM tier, and the allocator that carves it into extents.

The region is an mmap of a file under ``/dev/shm`` so a client on the same host can map the same file read-only and
read a leased block in place (the shm fast path); with ``shm_dir=None`` it is an anonymous mapping instead.

The allocator is best-fit over a free list of extents kept twice: by offset (to coalesce a freed extent with its
neighbours in O(log n)) and by (size, offset) (to find the smallest extent that fits in O(log n)). Every extent is a
multiple of ``alignment`` bytes and starts at a multiple of it.

Not thread-safe: its owner (the RAM tier) serialises every call under its own lock.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

from sortedcontainers import SortedDict, SortedList

from kvfabric.errors import StoreError

DEFAULT_ALIGNMENT = 64
"""One cache line: copies into and out of the arena start aligned, and small blocks waste little."""


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
        name_prefix: str = "kvfabric-arena",
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
        if shm_dir is None:
            self._mmap = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        else:
            # Unique per instance (pid + random), created exclusively and private to this user.
            path = Path(shm_dir) / f"{name_prefix}-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot create arena file {path}: {exc}") from exc
            try:
                os.ftruncate(fd, self.size)
                self._mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED | populate, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                os.unlink(path)
                raise StoreError(f"cannot map arena file {path} of {self.size} bytes: {exc}") from exc
            finally:
                os.close(fd)
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
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    # --- free-list bookkeeping -----------------------------------------------------------------------------------
    def _add_free(self, offset: int, size: int) -> None:
        self._free_by_offset[offset] = size
        self._free_by_size.add((size, offset))

    def _remove_free(self, offset: int) -> int:
        size = self._free_by_offset.pop(offset)
        self._free_by_size.remove((size, offset))
        return size
