"""Caller buffers as raw bytes: numpy arrays, torch CPU tensors (bf16 too), CUDA tensors, bytearray, memoryview.

Receiving writes straight into host memory. A CUDA tensor gets a pinned host staging buffer, taken from the
client's :class:`PinnedStaging` and reused across calls, and one asynchronous device copy after its bytes have
arrived (``Destination.finish``); :func:`settle` waits for those copies and returns the buffers at the end of the
call. Sending a CUDA tensor copies it into a pinned buffer the same way. torch is imported only when a torch tensor
is passed in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, Union

import numpy as np

if TYPE_CHECKING:
    import torch

    from kvfabric.spec import DType

log = logging.getLogger(__name__)

Buffer: TypeAlias = Union[np.ndarray, "torch.Tensor", bytearray, memoryview]
"""One block's bytes in caller memory: a contiguous numpy array, torch tensor (CPU or CUDA), bytearray or
memoryview (writable, to receive into)."""
KV: TypeAlias = Union["torch.Tensor", Sequence[Buffer]]
"""Consecutive blocks to store: a tensor ``[n_blocks, *block_shape]`` or one buffer per block."""


class PinnedStaging:
    """Page-locked host buffers for CUDA sources and destinations, reused across calls (thread-safe).

    ``acquire`` hands out the smallest free buffer that fits (or pins a new one); ``release`` returns it. At most
    ``keep`` buffers stay pinned between calls, so a burst does not pin host memory for good.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._logged = False

    def acquire(self, nbytes: int) -> Any:
        import torch

        with self._lock:
            fits = [b for b in self._free if b.numel() >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self._free.remove(buf)
                return buf
            first = not self._logged
            self._logged = True
        pin = torch.cuda.is_available()
        if first:
            log.info("kvfabric client: CUDA tensors go through %s host staging, reused across calls",
                     "pinned" if pin else "pageable (no CUDA here)")  # fmt: skip
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def release(self, buffers: Iterable[Any]) -> None:
        with self._lock:
            self._free.extend(buffers)
            if len(self._free) > self.keep:
                self._free.sort(key=lambda b: b.numel(), reverse=True)
                del self._free[self.keep :]


def _is_torch(obj: object) -> bool:
    return type(obj).__module__.startswith("torch")


def _torch_bytes(t: Any) -> Any:
    """A contiguous tensor's bytes as a flat uint8 tensor sharing its memory."""
    import torch

    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return t.reshape(-1).view(torch.uint8)


def readable(obj: Any, staging: PinnedStaging | None = None, held: list[Any] | None = None) -> memoryview:
    """Flat byte view of ``obj`` for sending; a CUDA tensor is copied to host first (into a buffer of ``staging``,
    appended to ``held`` for the caller to release once the bytes are sent)."""
    if _is_torch(obj):
        t = _torch_bytes(obj)
        if t.device.type != "cpu":
            if staging is None or held is None:
                t = t.cpu()
            else:
                host = staging.acquire(t.numel())
                held.append(host)
                t = host[: t.numel()]
                t.copy_(_torch_bytes(obj))  # synchronous: the bytes must be on the host before they are sent
        return memoryview(t.numpy()).cast("B")
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError("array must be C-contiguous")
        return memoryview(obj.reshape(-1).view(np.uint8))
    view = memoryview(obj)
    if not view.contiguous:
        raise ValueError("buffer must be contiguous")
    return view.cast("B")


@dataclass(slots=True)
class Destination:
    """Where one block's bytes land: ``view`` is host memory; ``finish()`` moves them to the device if needed."""

    view: memoryview
    device_tensor: Any = None  # the caller's CUDA tensor (flat uint8 view) when staging
    staging: Any = None

    def finish(self) -> None:
        """Queue the device copy (asynchronous from pinned memory); :func:`settle` waits for it."""
        if self.device_tensor is not None:
            self.device_tensor.copy_(self.staging[: self.device_tensor.numel()], non_blocking=True)

    @property
    def address(self) -> int:
        """Host address of ``view`` (for NIXL descriptors)."""
        return int(np.frombuffer(self.view, dtype=np.uint8).ctypes.data)


def writable(obj: Any, staging: PinnedStaging | None = None) -> Destination:
    """A Destination for ``obj``; raises ValueError for read-only or non-contiguous buffers."""
    if _is_torch(obj):
        t = _torch_bytes(obj)
        if t.device.type == "cpu":
            return Destination(memoryview(t.numpy()).cast("B"))
        import torch

        if staging is not None:
            host = staging.acquire(t.numel())
        else:
            host = torch.empty(t.numel(), dtype=torch.uint8, pin_memory=True)
        return Destination(memoryview(host[: t.numel()].numpy()).cast("B"), t, host)
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous or not obj.flags.writeable:
            raise ValueError("array must be C-contiguous and writable")
        return Destination(memoryview(obj.reshape(-1).view(np.uint8)))
    view = memoryview(obj)
    if view.readonly or not view.contiguous:
        raise ValueError("buffer must be writable and contiguous")
    return Destination(view.cast("B"))


def settle(dests: Iterable[Destination], staging: PinnedStaging | None) -> None:
    """Wait for the device copies ``finish`` queued, then return the staging buffers to ``staging``."""
    staged = [d for d in dests if d.device_tensor is not None]
    if not staged:
        return
    import torch

    for device in {d.device_tensor.device for d in staged}:
        torch.cuda.current_stream(device).synchronize()
    if staging is not None:
        staging.release(d.staging for d in staged)


def torch_dtype(dtype: DType | str) -> torch.dtype:
    """The torch dtype of a spec's KV elements (a :class:`kvfabric.spec.DType` or its name)."""
    import torch

    from kvfabric.spec import DType

    return {
        DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16,
        DType.FLOAT8_E4M3: torch.float8_e4m3fn, DType.FLOAT8_E5M2: torch.float8_e5m2, DType.INT8: torch.int8,
        DType.UINT8: torch.uint8,
    }[DType.parse(dtype)]  # fmt: skip
