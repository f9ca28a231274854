"""Same-host shared memory: read-only views of the server's RAM arena, and the checks that decide whether a
client can use them.

The arena is a file under /dev/shm that the store maps; a same-host client maps the same file read-only and copies
leased blocks out of it, so the socket carries only control frames. Same host means: the client connected over
loopback, reports the same kernel boot id, and opens a file whose (st_dev, st_ino, size) match what the server
announced, which also rules out a container with its own /dev/shm behind the same loopback.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import socket
from pathlib import Path

import numpy as np

from kvfabric.transport.frames import ShmOffer

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def host_identity() -> dict[str, object]:
    """What a client tells the server at hello so the server can decide on shared memory."""
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid()}


def is_loopback(peername: object) -> bool:
    if isinstance(peername, str):  # a Unix socket path
        return True
    if not isinstance(peername, tuple) or not peername:
        return False
    try:
        return ipaddress.ip_address(peername[0]).is_loopback
    except ValueError:
        return False


def same_host(peername: object, client: dict[str, object]) -> bool:
    mine = boot_id()
    return bool(mine) and is_loopback(peername) and client.get("boot_id") == mine


def offer(path: str) -> ShmOffer:
    st = os.stat(path)
    return ShmOffer(path, st.st_dev, st.st_ino, st.st_size)


class ArenaMap:
    """A read-only mapping of an arena file. ``view(offset, nbytes)`` is a zero-copy memoryview of a block."""

    def __init__(self, path: str, expect: ShmOffer | None = None) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
                raise OSError(f"{path} is not the server's arena (another /dev/shm, e.g. a container)")
            self.size = st.st_size
            self._mmap = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path
        self._view = memoryview(self._mmap)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"arena range [{offset}, {offset + nbytes}) outside the {self.size}-byte arena")
        return self._view[offset : offset + nbytes]

    @property
    def base_address(self) -> int:
        """Virtual address of the mapping (registered with NIXL)."""
        return int(np.frombuffer(self._mmap, dtype=np.uint8).ctypes.data) if self.size else 0

    def close(self) -> None:
        """Unmap; fails with BufferError while views handed out are still alive, which is the point."""
        self._view.release()
        self._mmap.close()
