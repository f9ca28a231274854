"""Routing policies: pick the engine for a request from the prefix index and the engines' current load.

kvfabric's policy (:class:`TTFTRouter`) minimises predicted time to first token::

    ttft(e) = pending_prefill_tokens(e) / rate(e)                          queueing
            + sum over blocks d_e <= i < u_e of block_bytes / bw(tier_i)     loading what the fabric holds
            + (request_tokens - u_e * block_size) / rate(e)                prefill of the rest

where ``d_e`` is the engine's own leading match and ``u_e`` extends it with the run of following blocks the fabric
holds, each loaded from the fastest tier holding it (a tier slower than recomputing a block is not used). This is
how an engine with a KV connector behaves: its prefix cache first, then the connector loads the longest run the
fabric has from there. The baselines (round-robin, least-loaded, Dynamo's overlap-weighted cost) share the same
request/decision types, so the simulator and the HTTP endpoint can swap them by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvfabric.errors import ConfigError
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import PrefixIndex


@dataclass(frozen=True, slots=True)
class TierSpeed:
    """How fast an engine can load KV from one fabric medium."""

    medium: TierId
    bytes_per_s: float


@dataclass(frozen=True, slots=True)
class Calibration:
    """The numbers the TTFT model needs; from configuration or measured (``bench/``)."""

    prefill_tokens_per_s: float = 10_000.0
    """Default prefill rate of an engine (an engine's own report overrides it)."""
    kv_bytes_per_token: int = 131_072
    """KV bytes of one token (``ModelSpec.bytes_per_token``); the default is Llama-3-8B in bf16."""
    tiers: tuple[TierSpeed, ...] = (
        TierSpeed(TierId("ram"), 20e9),
        TierSpeed(TierId("disk"), 5e9),
        TierSpeed(TierId("object"), 1e9),
    )
    """Fabric media the router may load from, with their bandwidth to an engine."""

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0:
            raise ConfigError("calibration.prefill_tokens_per_s must be positive")
        if self.kv_bytes_per_token <= 0:
            raise ConfigError("calibration.kv_bytes_per_token must be positive")
        for t in self.tiers:
            if t.bytes_per_s <= 0:
                raise ConfigError(f"calibration.tiers.{t.medium} bandwidth must be positive")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Calibration:
        """From config: ``{"prefill_tokens_per_s": .., "kv_bytes_per_token": .., "tiers": {"ram": bytes_per_s}}``."""
        known = {"prefill_tokens_per_s", "kv_bytes_per_token", "tiers"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown calibration keys: {sorted(unknown)}")
        kwargs: dict[str, object] = {k: data[k] for k in ("prefill_tokens_per_s", "kv_bytes_per_token") if k in data}
        if "tiers" in data:
            tiers = data["tiers"]
            if not isinstance(tiers, Mapping):
                raise ConfigError("calibration.tiers must map medium -> bytes per second")
            kwargs["tiers"] = tuple(TierSpeed(TierId(str(m)), float(bw)) for m, bw in tiers.items())
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """An engine's current load, as it reports it (or as the simulator tracks it)."""

    engine: str
    pending_prefill_tokens: int = 0
    """Prompt tokens queued or being prefilled."""
    active_decode_blocks: int = 0
    """KV blocks of requests currently decoding (Dynamo's load signal)."""
    prefill_tokens_per_s: float | None = None
    """This engine's measured prefill rate; ``None`` takes the calibration's."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A request to place: the prefix hashes of its blocks and its prompt length in tokens.

    The chain normally covers full blocks only; a trace whose last id stands for a partial block is accepted too
    (the last block then has fewer than ``block_size`` tokens)."""

    namespace: Namespace
    model: ModelFingerprint
    chain: Sequence[PrefixHash]
    num_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.chain and self.num_tokens <= (len(self.chain) - 1) * self.block_size:
            raise ValueError(f"{len(self.chain)} blocks of {self.block_size} tokens exceed {self.num_tokens} tokens")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    engine: str
    policy: str
    local_blocks: int
    """Leading blocks the engine already holds."""
    fabric_blocks: int
    """Blocks after those that the engine would load from the fabric."""
    prefill_tokens: int
    """Tokens the engine would compute."""
    predicted_ttft_s: float
    fabric_tiers: tuple[tuple[TierId, int], ...] = field(default=())
    """Blocks to load per medium."""


class RoutingPolicy(Protocol):
    name: str

    def route(self, request: RouteRequest, engines: Sequence[EngineLoad]) -> RouteDecision: ...


@dataclass(slots=True)
class _Assessment:
    """Per-engine predictions for one request (arrays aligned with the engines sequence)."""

    local: np.ndarray  # leading blocks held by the engine
    usable: np.ndarray  # local + fabric run after it
    load_s: np.ndarray
    prefill_tokens: np.ndarray
    queue_s: np.ndarray
    rate: np.ndarray
    tiers: list[int]
    tier_names: tuple[TierId, ...]

    @property
    def ttft_s(self) -> np.ndarray:
        return self.queue_s + self.load_s + self.prefill_tokens / self.rate


class _Predictor:
    """Shared machinery: one index walk per request, then vectorised per-engine arithmetic."""

    def __init__(self, index: PrefixIndex, calibration: Calibration, *, use_fabric: bool) -> None:
        self.index = index
        self.calibration = calibration
        self.use_fabric = use_fabric
        self._cache: tuple[object, tuple[dict[str, int], int, list[int], tuple[TierId, ...]]] | None = None
        self._offset = 0

    def _engine_view(self, engines: Sequence[EngineLoad]) -> tuple[dict[str, int], int, list[int], tuple[TierId, ...]]:
        """Engine name -> position, the engines' location mask, and the fabric media masks (fastest first) without
        the engines' own locations; cached while the engine list and the index's locations stay the same."""
        key = (self.index.epoch, tuple(e.engine for e in engines))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        positions = {name: j for j, name in enumerate(key[1])}
        engine_mask = self.index.mask_of(sources=key[1])
        masks: list[int] = []
        names: tuple[TierId, ...] = ()
        if self.use_fabric and self.calibration.tiers:
            speeds = sorted(self.calibration.tiers, key=lambda t: -t.bytes_per_s)
            masks = [self.index.mask_of(media=(t.medium,)) & ~engine_mask for t in speeds]
            names = tuple(t.medium for t in speeds)
        view = (positions, engine_mask, masks, names)
        self._cache = (key, view)
        return view

    def assess(self, request: RouteRequest, engines: Sequence[EngineLoad]) -> _Assessment:
        if not engines:
            raise ValueError("no engines to route to")
        positions, engine_mask, masks, names = self._engine_view(engines)
        walk = self.index.walk(request.namespace, request.model, request.chain, masks, sources_mask=engine_mask)
        n = len(engines)
        cal = self.calibration
        rate = np.fromiter(
            (e.prefill_tokens_per_s or cal.prefill_tokens_per_s for e in engines), dtype=np.float64, count=n
        )
        pending = np.fromiter((e.pending_prefill_tokens for e in engines), dtype=np.float64, count=n)
        local = np.zeros(n, dtype=np.int64)
        for source, depth in walk.depths.items():
            j = positions.get(source)
            if j is not None:
                local[j] = depth
        bs = request.block_size
        walked = len(walk.tiers)
        if masks and walked:
            block_bytes = bs * cal.kv_bytes_per_token
            speed = {t.medium: t.bytes_per_s for t in cal.tiers}
            per_tier = np.array([block_bytes / speed[m] for m in names] + [np.inf])
            tiers = np.asarray(walk.tiers, dtype=np.int64)
            load_t = per_tier[tiers]  # -1 indexes the trailing inf: not in the fabric
            # A tier slower than recomputing the block (at the calibrated rate) is not worth loading from.
            load_t = np.where(load_t < bs / cal.prefill_tokens_per_s, load_t, np.inf)
            avail = np.isfinite(load_t)
            idx = np.arange(walked + 1)
            holes = np.where(np.append(~avail, True), idx, walked)
            next_hole = np.minimum.accumulate(holes[::-1])[::-1]
            cum = np.concatenate(([0.0], np.cumsum(np.where(avail, load_t, 0.0))))
            d = np.minimum(local, walked)
            usable = np.maximum(next_hole[d], local)
            load_s = cum[np.minimum(usable, walked)] - cum[d]
        else:
            usable = local
            load_s = np.zeros(n)
        prefill = np.maximum(request.num_tokens - usable * bs, 0).astype(np.float64)
        return _Assessment(local, usable, load_s, prefill, pending / rate, rate, walk.tiers, names)

    def argmin_rotated(self, cost: np.ndarray) -> int:
        """Index of the minimum; ties go round-robin so idle engines share the work."""
        n = len(cost)
        start = self._offset % n
        self._offset += 1
        rolled = np.roll(cost, -start)
        return int((int(np.argmin(rolled)) + start) % n)

    def decision(self, policy: str, a: _Assessment, engines: Sequence[EngineLoad], j: int) -> RouteDecision:
        local, usable = int(a.local[j]), int(a.usable[j])
        counts: dict[TierId, int] = {}
        for t in a.tiers[local:usable]:
            counts[a.tier_names[t]] = counts.get(a.tier_names[t], 0) + 1
        return RouteDecision(
            engine=engines[j].engine,
            policy=policy,
            local_blocks=local,
            fabric_blocks=usable - local,
            prefill_tokens=int(a.prefill_tokens[j]),
            predicted_ttft_s=float(a.ttft_s[j]),
            fabric_tiers=tuple(sorted(counts.items())),
        )


class TTFTRouter:
    """kvfabric's policy: the engine with the least predicted time to first token."""

    name = "kvfabric"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None, *, use_fabric: bool = True):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=use_fabric)

    def route(self, request: RouteRequest, engines: Sequence[EngineLoad]) -> RouteDecision:
        a = self._p.assess(request, engines)
        return self._p.decision(self.name, a, engines, self._p.argmin_rotated(a.ttft_s))


class OverlapRouter:
    """Dynamo's cost: ``overlap_weight * prefill_blocks + decode_blocks``, lowest wins. Only engine-local overlap
    counts (Dynamo's indexer knows engine caches, not a fabric)."""

    name = "overlap"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None, *, overlap_weight: float = 1.0):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=False)
        self.overlap_weight = overlap_weight

    def route(self, request: RouteRequest, engines: Sequence[EngineLoad]) -> RouteDecision:
        a = self._p.assess(request, engines)
        bs = request.block_size
        pending = np.fromiter((e.pending_prefill_tokens for e in engines), dtype=np.float64, count=len(engines))
        decode = np.fromiter((e.active_decode_blocks for e in engines), dtype=np.float64, count=len(engines))
        request_blocks = -(-request.num_tokens // bs)
        prefill_blocks = (pending + request.num_tokens - a.local * bs) / bs
        logit = self.overlap_weight * prefill_blocks + decode + request_blocks
        return self._p.decision(self.name, a, engines, self._p.argmin_rotated(logit))


class LeastLoadedRouter:
    """Fewest pending prefill tokens, then fewest decode blocks; ignores caches."""

    name = "least-loaded"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=False)

    def route(self, request: RouteRequest, engines: Sequence[EngineLoad]) -> RouteDecision:
        a = self._p.assess(request, engines)
        pending = np.fromiter((e.pending_prefill_tokens for e in engines), dtype=np.float64, count=len(engines))
        decode = np.fromiter((e.active_decode_blocks for e in engines), dtype=np.float64, count=len(engines))
        # decode blocks only break ties between equal queues: scale them below one token
        cost = pending + decode / (decode.max() + 1.0)
        return self._p.decision(self.name, a, engines, self._p.argmin_rotated(cost))


class RoundRobinRouter:
    """Each engine in turn; ignores caches and load."""

    name = "round-robin"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=False)
        self._next = 0

    def route(self, request: RouteRequest, engines: Sequence[EngineLoad]) -> RouteDecision:
        a = self._p.assess(request, engines)
        j = self._next % len(engines)
        self._next += 1
        return self._p.decision(self.name, a, engines, j)


POLICIES = ("kvfabric", "overlap", "least-loaded", "round-robin")


def make_policy(
    name: str,
    index: PrefixIndex,
    calibration: Calibration | None = None,
    *,
    use_fabric: bool = True,
    overlap_weight: float = 1.0,
) -> RoutingPolicy:
    """A policy by name: ``kvfabric`` (TTFT), ``overlap`` (Dynamo), ``least-loaded``, ``round-robin``."""
    match name:
        case "kvfabric":
            return TTFTRouter(index, calibration, use_fabric=use_fabric)
        case "overlap":
            return OverlapRouter(index, calibration, overlap_weight=overlap_weight)
        case "least-loaded":
            return LeastLoadedRouter(index, calibration)
        case "round-robin":
            return RoundRobinRouter(index, calibration)
        case _:
            raise ConfigError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
