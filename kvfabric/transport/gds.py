"""GPUDirect Storage reads (kvikio): a disk-tier record's payload straight from NVMe into CUDA memory.

Optional: needs the ``gds`` extra (``kvikio-cu12``) and a CUDA device. Everywhere else :class:`PayloadReader`
reads into host memory with ``os.preadv`` and, for a CUDA destination, copies once to the device; it logs which
path it took once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def _kvikio() -> tuple[Any, str]:
    try:
        import kvikio
    except Exception as exc:  # ImportError, or CUDA libraries missing at import
        return None, f"kvikio unavailable ({exc})"
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device"
    except ImportError:
        return None, "torch is not installed"
    return kvikio, ""


class PayloadReader:
    """``read_into(path, offset, nbytes, dst)``: fill ``dst`` (numpy array, torch CPU or CUDA tensor) from a file."""

    def __init__(self, use_gds: bool = True) -> None:
        self._kvikio, why = _kvikio() if use_gds else (None, "disabled")
        if self._kvikio is None:
            log.info("GPUDirect Storage off: %s; disk reads go through host memory", why)
        else:
            log.info("GPUDirect Storage on: disk reads go straight to CUDA memory (kvikio)")

    @property
    def gds(self) -> bool:
        return self._kvikio is not None

    def read_into(self, path: str | os.PathLike[str], offset: int, nbytes: int, dst: Any) -> None:
        is_cuda = type(dst).__module__.startswith("torch") and dst.device.type == "cuda"
        if is_cuda and self._kvikio is not None:
            with self._kvikio.CuFile(os.fspath(path), "r") as f:
                got = f.pread(dst, nbytes, file_offset=offset).get()
            if got != nbytes:
                raise OSError(f"short GDS read from {path}: {got} of {nbytes} bytes at {offset}")
            return
        if is_cuda:
            import torch

            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            _pread_exact(path, offset, memoryview(host.numpy()))
            dst.reshape(-1).view(torch.uint8)[:nbytes].copy_(host)
            return
        _pread_exact(path, offset, _host_bytes(dst)[:nbytes])


def _host_bytes(dst: Any) -> memoryview:
    if type(dst).__module__.startswith("torch"):
        import torch

        return memoryview(dst.reshape(-1).view(torch.uint8).numpy())
    view = memoryview(dst)
    if view.readonly or not view.contiguous:
        raise ValueError("destination must be writable and contiguous")
    return view.cast("B")


def _pread_exact(path: str | os.PathLike[str], offset: int, view: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], offset + pos)
            if got == 0:
                raise OSError(f"{path} ends before byte {offset + len(view)}")
            pos += got
    finally:
        os.close(fd)


__all__ = ["PayloadReader"]
