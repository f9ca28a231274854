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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol

import numpy as np

from kvfabric.errors import ConfigError
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import NO_TIER, PrefixIndex

if TYPE_CHECKING:
    from kvfabric.config import IndexSettings

GPU_MEDIUM = TierId("gpu")


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

    @classmethod
    def from_settings(cls, settings: IndexSettings) -> Calibration:
        """From the node's ``[index]`` settings. ``gpu`` bandwidth is left out: engines' own caches are their local
        prefix, not a medium another engine loads from."""
        tiers = {m: bw for m, bw in settings.tier_bandwidth.items() if m != GPU_MEDIUM}
        return cls.from_mapping({"prefill_tokens_per_s": settings.prefill_tokens_per_s, "tiers": tiers})


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
    block_bytes: int | None = None
    """KV bytes of one block of this model (``ModelSpec.block_nbytes``); default: the calibration's
    ``kv_bytes_per_token`` times ``block_size``."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.block_bytes is not None and self.block_bytes <= 0:
            raise ValueError("block_bytes must be positive")
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


class EngineTable:
    """Candidate engines' loads as columns, the form the routers score.

    Built from a sequence of :class:`EngineLoad` (every policy accepts either), or kept by the owner and updated in
    place as engines report (:meth:`update`, O(1)), so a decision over a stable set of engines does no per-engine
    Python work. Membership is fixed; a new or departed engine means a new table."""

    __slots__ = ("_decode", "_loads", "_pos", "names", "pending", "rate")

    def __init__(self, engines: Iterable[EngineLoad]) -> None:
        loads = list(engines)
        self._loads = loads
        self.names: tuple[str, ...] = tuple(map(attrgetter("engine"), loads))
        self._pos: dict[str, int] | None = None
        if len(set(self.names)) != len(self.names):
            dup = next(name for name in self.names if self.names.count(name) > 1)
            raise ValueError(f"engine {dup!r} is listed twice")
        self.pending = np.array(list(map(attrgetter("pending_prefill_tokens"), loads)), dtype=np.float64)
        """Prompt tokens queued or being prefilled, per engine."""
        rates = list(map(attrgetter("prefill_tokens_per_s"), loads))
        self.rate = (np.full(len(loads), np.nan) if rates.count(None) == len(rates)
                     else np.array(rates, dtype=np.float64))  # fmt: skip
        """Reported prefill rates; NaN where the engine reported none (the calibration's applies)."""
        self._decode: np.ndarray | None = None

    @property
    def decode(self) -> np.ndarray:
        """KV blocks of requests decoding, per engine (built on first use: only some policies read it)."""
        if self._decode is None:
            self._decode = np.array(list(map(attrgetter("active_decode_blocks"), self._loads)), dtype=np.float64)
        return self._decode

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, j: int) -> EngineLoad:
        return self._loads[j]

    def loads(self) -> list[EngineLoad]:
        return list(self._loads)

    def update(self, load: EngineLoad) -> bool:
        """Take ``load`` for an engine already in the table; ``False`` (nothing changed) for an unknown engine."""
        if self._pos is None:
            self._pos = dict(zip(self.names, range(len(self.names)), strict=True))
        j = self._pos.get(load.engine)
        if j is None:
            return False
        self._loads[j] = load
        self.pending[j] = load.pending_prefill_tokens
        if self._decode is not None:
            self._decode[j] = load.active_decode_blocks
        self.rate[j] = np.nan if load.prefill_tokens_per_s is None else load.prefill_tokens_per_s
        return True


Engines = Sequence[EngineLoad] | EngineTable


def engine_table(engines: Engines) -> EngineTable:
    return engines if isinstance(engines, EngineTable) else EngineTable(engines)


class RoutingPolicy(Protocol):
    name: str

    def route(self, request: RouteRequest, engines: Engines) -> RouteDecision: ...


@dataclass(slots=True)
class _Assessment:
    """Per-engine predictions for one request (arrays aligned with the engine table)."""

    table: EngineTable
    local: np.ndarray  # leading blocks held by the engine
    usable: np.ndarray  # local + fabric run after it
    load_s: np.ndarray
    prefill_tokens: np.ndarray
    rate: np.ndarray
    codes: np.ndarray  # per walked position: index of the fastest fabric tier holding it, or NO_TIER
    tier_names: tuple[TierId, ...]

    @property
    def ttft_s(self) -> np.ndarray:
        return (self.table.pending + self.prefill_tokens) / self.rate + self.load_s


@dataclass(frozen=True, slots=True)
class _EngineView:
    """What one set of engines and one index epoch fix: cached across decisions."""

    position_of_bit: np.ndarray  # location bit -> engine position (engines' bits only; -1 elsewhere)
    engine_mask: int
    tier_masks: list[int]  # fabric media, fastest first, without the engines' own locations
    tier_names: tuple[TierId, ...]
    tier_bytes_per_s: np.ndarray


class _Predictor:
    """Shared machinery: one index walk per request, then vectorised per-engine arithmetic."""

    def __init__(self, index: PrefixIndex, calibration: Calibration, *, use_fabric: bool) -> None:
        self.index = index
        self.calibration = calibration
        self.use_fabric = use_fabric
        self._cache: tuple[tuple[int, tuple[str, ...]], _EngineView] | None = None
        self._offset = 0

    def _engine_view(self, table: EngineTable) -> _EngineView:
        """Cached while the engine names and the index's locations stay the same (a table kept by its owner hits
        by identity)."""
        key = (self.index.epoch, table.names)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        positions = {name: j for j, name in enumerate(table.names)}
        position_of_bit = np.full(len(self.index.locations_by_bit()), -1, dtype=np.int64)
        for bit, loc in enumerate(self.index.locations_by_bit()):
            if loc is not None and loc.source in positions:
                position_of_bit[bit] = positions[loc.source]
        engine_mask = self.index.mask_of(sources=table.names)
        masks: list[int] = []
        names: tuple[TierId, ...] = ()
        speeds: list[float] = []
        if self.use_fabric and self.calibration.tiers:
            ordered = sorted(self.calibration.tiers, key=lambda t: -t.bytes_per_s)
            masks = [self.index.mask_of(media=(t.medium,)) & ~engine_mask for t in ordered]
            names = tuple(t.medium for t in ordered)
            speeds = [t.bytes_per_s for t in ordered]
        view = _EngineView(position_of_bit, engine_mask, masks, names, np.array(speeds, dtype=np.float64))
        self._cache = (key, view)
        return view

    def assess(self, request: RouteRequest, engines: Engines) -> _Assessment:
        table = engine_table(engines)
        n = len(table)
        if not n:
            raise ValueError("no engines to route to")
        view = self._engine_view(table)
        walk = self.index.walk(request.namespace, request.model, request.chain, view.tier_masks,
                               sources_mask=view.engine_mask)  # fmt: skip
        cal = self.calibration
        rate = np.where(np.isnan(table.rate), cal.prefill_tokens_per_s, table.rate)
        local = np.zeros(n, dtype=np.int64)
        if walk.bits:
            local[view.position_of_bit[walk.bits]] = walk.bit_depths
        bs = request.block_size
        codes = np.frombuffer(walk.codes, dtype=np.uint8)
        walked = len(codes)
        if view.tier_masks and walked:
            block_bytes = request.block_bytes or bs * cal.kv_bytes_per_token
            per_tier = np.full(NO_TIER + 1, np.inf)
            # A tier slower than recomputing the block (at the calibrated rate) is not worth loading from.
            t = block_bytes / view.tier_bytes_per_s
            per_tier[: len(t)] = np.where(t < bs / cal.prefill_tokens_per_s, t, np.inf)
            load_t = per_tier[codes]
            avail = load_t < np.inf
            holes = np.append(np.flatnonzero(~avail), walked)  # positions no usable tier holds, then the end
            cum = np.zeros(walked + 1)
            np.cumsum(np.where(avail, load_t, 0.0), out=cum[1:])
            d = np.minimum(local, walked)
            usable = np.maximum(holes[np.searchsorted(holes, d)], local)
            load_s = cum[np.minimum(usable, walked)] - cum[d]
        else:
            usable = local
            load_s = np.zeros(n)
        prefill = np.maximum(request.num_tokens - usable * bs, 0).astype(np.float64)
        return _Assessment(table, local, usable, load_s, prefill, rate, codes, view.tier_names)

    def argmin_rotated(self, cost: np.ndarray) -> int:
        """Index of the minimum; ties go round-robin so idle engines share the work."""
        n = len(cost)
        start = self._offset % n
        self._offset += 1
        if not start:
            return int(np.argmin(cost))
        return int((int(np.argmin(np.concatenate((cost[start:], cost[:start])))) + start) % n)

    def decision(self, policy: str, a: _Assessment, j: int) -> RouteDecision:
        local, usable = int(a.local[j]), int(a.usable[j])
        counts = np.bincount(a.codes[local:usable], minlength=len(a.tier_names))
        return RouteDecision(
            engine=a.table.names[j],
            policy=policy,
            local_blocks=local,
            fabric_blocks=usable - local,
            prefill_tokens=int(a.prefill_tokens[j]),
            predicted_ttft_s=float(a.ttft_s[j]),
            fabric_tiers=tuple(sorted((a.tier_names[t], int(c)) for t, c in enumerate(counts) if c)),
        )


class TTFTRouter:
    """kvfabric's policy: the engine with the least predicted time to first token."""

    name = "kvfabric"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None, *, use_fabric: bool = True):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=use_fabric)

    def route(self, request: RouteRequest, engines: Engines) -> RouteDecision:
        a = self._p.assess(request, engines)
        return self._p.decision(self.name, a, self._p.argmin_rotated(a.ttft_s))


class OverlapRouter:
    """Dynamo's cost: ``overlap_weight * prefill_blocks + decode_blocks``, lowest wins. Only engine-local overlap
    counts (Dynamo's indexer knows engine caches, not a fabric)."""

    name = "overlap"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None, *, overlap_weight: float = 1.0):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=False)
        self.overlap_weight = overlap_weight

    def route(self, request: RouteRequest, engines: Engines) -> RouteDecision:
        a = self._p.assess(request, engines)
        bs = request.block_size
        request_blocks = -(-request.num_tokens // bs)
        prefill_blocks = (a.table.pending + request.num_tokens - a.local * bs) / bs
        logit = self.overlap_weight * prefill_blocks + a.table.decode + request_blocks
        return self._p.decision(self.name, a, self._p.argmin_rotated(logit))


class LeastLoadedRouter:
    """Fewest pending prefill tokens, then fewest decode blocks; ignores caches."""

    name = "least-loaded"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=False)

    def route(self, request: RouteRequest, engines: Engines) -> RouteDecision:
        a = self._p.assess(request, engines)
        decode = a.table.decode
        # decode blocks only break ties between equal queues: scale them below one token
        cost = a.table.pending + decode / (decode.max() + 1.0)
        return self._p.decision(self.name, a, self._p.argmin_rotated(cost))


class RoundRobinRouter:
    """Each engine in turn; ignores caches and load."""

    name = "round-robin"

    def __init__(self, index: PrefixIndex, calibration: Calibration | None = None):
        self._p = _Predictor(index, calibration or Calibration(), use_fabric=False)
        self._next = 0

    def route(self, request: RouteRequest, engines: Engines) -> RouteDecision:
        a = self._p.assess(request, engines)
        j = self._next % len(a.table)
        self._next += 1
        return self._p.decision(self.name, a, j)


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
