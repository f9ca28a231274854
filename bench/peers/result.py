"""What a peer measurement returns, and the error raised when a peer cannot be measured here."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1 << 30


class PeerUnavailableError(RuntimeError):
    """A peer could not be installed, started or driven; the message says which peer and why."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer!r} unavailable: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PeerMeasurement:
    """Throughput of moving ``count`` blocks of ``size`` bytes through one peer, client and server in two processes.

    ``put_gibps``/``get_gibps`` are medians over ``rounds`` timed rounds (warm-up round excluded); the per-round
    figures are kept in the ``*_samples`` fields so a reader can see the spread.
    """

    peer: str
    size: int
    count: int
    rounds: int
    put_gibps: float
    get_gibps: float
    put_gibps_samples: tuple[float, ...]
    get_gibps_samples: tuple[float, ...]
    verified: bool
    api: str  # which client calls moved the bytes, so figures are read in context
    server: str  # what served them, with version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(size: int, count: int, rounds: int) -> None:
    """Refuse a measurement that cannot mean anything, before any server is started."""
    for name, value in (("size", size), ("count", count), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def gibps(nbytes: int, seconds: float) -> float:
    return nbytes / GIB / seconds


def measurement_from_times(
    peer: str, size: int, count: int, put_seconds: list[float], get_seconds: list[float], verified: bool,
    api: str, server: str,
) -> PeerMeasurement:
    """Turn per-round wall times into GiB/s figures; each round moved ``size * count`` bytes each way."""
    if not put_seconds or len(put_seconds) != len(get_seconds):
        raise ValueError(f"need one put and one get time per round, got {len(put_seconds)} and {len(get_seconds)}")
    nbytes = size * count
    puts = tuple(gibps(nbytes, s) for s in put_seconds)
    gets = tuple(gibps(nbytes, s) for s in get_seconds)
    return PeerMeasurement(
        peer=peer, size=size, count=count, rounds=len(puts),
        put_gibps=statistics.median(puts), get_gibps=statistics.median(gets),
        put_gibps_samples=puts, get_gibps_samples=gets, verified=verified, api=api, server=server,
    )


def measurement_from_dict(data: dict[str, Any]) -> PeerMeasurement:
    """Rebuild a measurement from the JSON line a peer client printed."""
    return PeerMeasurement(
        peer=data["peer"], size=int(data["size"]), count=int(data["count"]), rounds=int(data["rounds"]),
        put_gibps=float(data["put_gibps"]), get_gibps=float(data["get_gibps"]),
        put_gibps_samples=tuple(float(x) for x in data["put_gibps_samples"]),
        get_gibps_samples=tuple(float(x) for x in data["get_gibps_samples"]),
        verified=bool(data["verified"]), api=str(data["api"]), server=str(data["server"]),
    )
