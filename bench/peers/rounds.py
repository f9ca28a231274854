"""The timed loop every peer client runs (in the bench virtualenv): the same blocks, rounds and checks for all peers.

A round puts ``count`` blocks (timed), gets them back (timed), checks every byte (untimed) and clears the keys
(untimed) so the next round stores into the same amount of memory. One untimed warm-up round comes first: connection
set-up, first-touch page faults and lazy allocations are not what the figures compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SEED = 20240611


@dataclass(frozen=True, slots=True)
class PeerOps:
    """One peer's client, as four callables over the block index range ``range(count)``."""

    put_all: Callable[[], None]  # store every block; returns once the server holds them all
    get_all: Callable[[], None]  # fetch every block into client memory
    verify: Callable[[], bool]  # the fetched bytes equal the source bytes, block by block
    clear: Callable[[], None]  # drop the fetched copies and, where the peer can, the stored keys


@dataclass(frozen=True, slots=True)
class RoundTimes:
    put_seconds: list[float]
    get_seconds: list[float]
    verified: bool


def source_blocks(size: int, count: int) -> np.ndarray:
    """``count`` blocks of ``size`` random bytes in one contiguous array (block i is ``[i * size, (i + 1) * size)``).

    Random so no peer can profit from compression or deduplication; seeded so every peer moves the same bytes.
    """
    return np.random.default_rng(SEED).integers(0, 256, size * count, dtype=np.uint8)


def run_rounds(ops: PeerOps, rounds: int) -> RoundTimes:
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    verified = True
    put_seconds: list[float] = []
    get_seconds: list[float] = []
    for index in range(rounds + 1):
        t0 = time.perf_counter()
        ops.put_all()
        t1 = time.perf_counter()
        ops.get_all()
        t2 = time.perf_counter()
        verified = ops.verify() and verified
        ops.clear()
        if index > 0:  # round 0 is the warm-up
            put_seconds.append(t1 - t0)
            get_seconds.append(t2 - t1)
    return RoundTimes(put_seconds, get_seconds, verified)
