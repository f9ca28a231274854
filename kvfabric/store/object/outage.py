"""Remembering that the object store is down, so callers miss at once instead of each waiting out the retries."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable


class OutageGate:
    """Closed for a while after a failure: ``base_s`` at first, doubling (with jitter) per consecutive failure up to
    ``max_s``; the first success opens it and resets the backoff. Thread-safe."""

    def __init__(self, base_s: float, max_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._base_s = base_s
        self._max_s = max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._closed_until = 0.0

    def is_open(self) -> bool:
        """Worth trying the store now (never failed, or the backoff has passed)."""
        return self._clock() >= self._closed_until

    def seconds_closed(self) -> float:
        """How long until the next try is due; 0 when open."""
        return max(0.0, self._closed_until - self._clock())

    @property
    def down(self) -> bool:
        """The last attempt failed (the store is believed unreachable, even if a retry is due)."""
        return self._failures > 0

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            backoff = min(self._max_s, self._base_s * 2 ** (self._failures - 1))
            self._closed_until = self._clock() + backoff * random.uniform(0.5, 1.0)

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._closed_until = 0.0
