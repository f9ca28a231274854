"""Host staging for an engine's KV cache on a device: pinned buffers reused across steps, host-to-device copies and
scatters on a side stream with one event per layer, device-to-host gathers that the forward pass never waits for.

On a CPU cache (or without CUDA) every operation runs inline on the calling thread; the path taken is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class PinnedPool:
    """Grow-only pinned (page-locked) host buffers keyed by role, so steady-state steps allocate nothing.

    ``pin`` False (CPU caches, or no CUDA) hands out ordinary host memory. Buffers are reused by the next call
    for the same role: a caller must be done with a role's previous tensor before asking again.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = max(1, int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[role] = buf
        return buf[:nbytes].view(dtype).view(shape)


class DeviceStaging:
    """Moves canonical blocks between host memory and an engine cache on ``device``.

    ``cuda`` is True when the cache is a CUDA tensor and CUDA works here: copies then run on a side stream and
    :meth:`wait_layer` makes the engine's current stream wait for that layer's event. Otherwise copies are
    synchronous (the CPU path, and the fallback when a CUDA call fails).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda" and _cuda_usable()
        self.pool = PinnedPool(pin=self.cuda)
        self._stream: Any = torch.cuda.Stream(device=device) if self.cuda else None
        self._events: dict[int, Any] = {}
        if self.cuda:
            log.info("kvfabric: KV cache on %s: pinned staging, side-stream copies, per-layer events", device)
        elif device.type == "cuda":
            log.warning("kvfabric: KV cache on %s but CUDA is not usable here: synchronous copies", device)
        else:
            log.info("kvfabric: KV cache on %s: copies run inline", device)

    def host(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable host buffer (pinned when the cache is on a CUDA device)."""
        return self.pool.take(role, shape, dtype)

    def scatter_async(self, layer: int, run: Callable[[torch.Tensor], None], host: torch.Tensor) -> None:
        """Copy ``host`` to the device and call ``run(device_tensor)`` there; on CUDA both go on the side stream
        after the engine's current work, and layer ``layer``'s event marks their end."""
        if not self.cuda:
            run(host)
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            on_device = host.to(self.device, non_blocking=True)
            run(on_device)
            on_device.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        self._events[layer] = event

    def wait_layer(self, layer: int) -> None:
        """Make the engine's current stream wait for layer ``layer``'s scatter (no host blocking)."""
        event = self._events.pop(layer, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        """Block until the side stream's queued copies are done (before a reused host buffer is rewritten)."""
        if self.cuda:
            self._stream.synchronize()
        self._events.clear()

    def gather_to_host(self, run: Callable[[], torch.Tensor], host: torch.Tensor) -> Any:
        """``host.copy_(run())``; on CUDA the gather and copy are queued on the side stream after the engine's
        current work and the returned event marks their end (``None`` on the inline path)."""
        if not self.cuda:
            host.copy_(run())
            return None
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            host.copy_(run(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event


def _cuda_usable() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install means "use the inline path", logged
        log.warning("kvfabric: CUDA unavailable (%s): copies run inline", exc)
        return False
