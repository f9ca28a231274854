"""Caller buffers as raw bytes: numpy arrays, torch CPU tensors (bf16 too), CUDA tensors, bytearray, memoryview.

Receiving writes straight into host memory. A CUDA tensor gets a pinned host staging buffer and one device copy
after the bytes have arrived (``Destination.finish``); torch is imported only when a torch tensor is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _is_torch(obj: object) -> bool:
    return type(obj).__module__.startswith("torch")


def _torch_bytes(t: Any) -> Any:
    """A contiguous tensor's bytes as a flat uint8 tensor sharing its memory."""
    import torch

    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return t.reshape(-1).view(torch.uint8)


def readable(obj: Any) -> memoryview:
    """Flat byte view of ``obj`` for sending; a CUDA tensor is copied to host first."""
    if _is_torch(obj):
        t = _torch_bytes(obj)
        if t.device.type != "cpu":
            t = t.cpu()
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
        if self.device_tensor is not None:
            self.device_tensor.copy_(self.staging[: self.device_tensor.numel()], non_blocking=False)

    @property
    def address(self) -> int:
        """Host address of ``view`` (for NIXL descriptors)."""
        return int(np.frombuffer(self.view, dtype=np.uint8).ctypes.data)


def writable(obj: Any) -> Destination:
    """A Destination for ``obj``; raises ValueError for read-only or non-contiguous buffers."""
    if _is_torch(obj):
        t = _torch_bytes(obj)
        if t.device.type == "cpu":
            return Destination(memoryview(t.numpy()).cast("B"))
        import torch

        staging = torch.empty(t.numel(), dtype=torch.uint8, pin_memory=True)
        return Destination(memoryview(staging.numpy()).cast("B"), t, staging)
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous or not obj.flags.writeable:
            raise ValueError("array must be C-contiguous and writable")
        return Destination(memoryview(obj.reshape(-1).view(np.uint8)))
    view = memoryview(obj)
    if view.readonly or not view.contiguous:
        raise ValueError("buffer must be writable and contiguous")
    return Destination(view.cast("B"))


def torch_dtype(dtype: Any) -> Any:
    """The torch dtype for a :class:`kvfabric.spec.DType`."""
    import torch

    from kvfabric.spec import DType

    return {
        DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16,
        DType.FLOAT8_E4M3: torch.float8_e4m3fn, DType.FLOAT8_E5M2: torch.float8_e5m2, DType.INT8: torch.int8,
        DType.UINT8: torch.uint8,
    }[DType.parse(dtype)]  # fmt: skip
