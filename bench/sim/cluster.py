"""Replay a trace through N simulated engines, an optional fabric pool and a routing policy.

Each engine has a KV cache (capacity in blocks, an eviction policy), a prefill rate and a FIFO prefill queue; it
publishes KV events for what its cache stores and evicts, and the fabric pool publishes events for its tiers, all
into one real :class:`~kvfabric.index.prefix_index.PrefixIndex`. The real routing policy picks the engine for each
request from that index and the engines' loads. The outcome then comes from the simulated caches themselves: the
engine's own leading match, then the run of following blocks the fabric holds (loaded at the tier's bandwidth),
then prefill of the rest, whose full blocks the engine publishes to the fabric.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.sim.cache import BlockCache
from bench.sim.fabric import FabricPool, FabricTier
from bench.sim.trace import MOONCAKE_BLOCK_TOKENS, TraceRequest
from kvfabric.events import BlockRemoved, BlockStored, KVEvent
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import PrefixIndex
from kvfabric.index.router import Calibration, EngineLoad, RouteRequest, TierSpeed, make_policy

NAMESPACE = Namespace("trace")
MODEL = ModelFingerprint(bytes(range(32)))
ENGINE_MEDIUM = TierId("gpu")


@dataclass(frozen=True, slots=True)
class SimConfig:
    engines: int = 1
    capacity_tokens: float | None = 1e7
    """KV capacity of each engine; ``None`` = unlimited."""
    eviction: str = "lru"
    router: str = "kvfabric"
    use_fabric_in_router: bool = True
    fabric: tuple[FabricTier, ...] = ()
    """Fabric pool tiers, fastest first; empty = no fabric."""
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    prefill_tokens_per_s: float = 8_000.0
    decode_tokens_per_s: float = 40.0
    """Per request: how fast one request's output is generated (sets how long its blocks stay active)."""
    kv_bytes_per_token: int = 131_072
    overlap_weight: float = 1.0


@dataclass(slots=True)
class _Engine:
    name: str
    cache: BlockCache
    busy_until: float = 0.0
    prefill_tokens: int = 0
    requests: int = 0
    decoding: list[tuple[float, int]] = field(default_factory=list)  # heap of (finish time, blocks)
    decode_blocks: int = 0

    def load(self, now: float, rate: float) -> EngineLoad:
        while self.decoding and self.decoding[0][0] <= now:
            self.decode_blocks -= heapq.heappop(self.decoding)[1]
        pending = int(max(0.0, self.busy_until - now) * rate)
        return EngineLoad(self.name, pending, self.decode_blocks)


@dataclass(frozen=True, slots=True)
class SimResult:
    requests: int
    blocks: int
    hit_blocks: int
    local_hit_blocks: int
    fabric_hit_blocks: int
    fabric_tier_blocks: dict[str, int]
    input_tokens: int
    hit_tokens: int
    request_hit_fraction_sum: float
    prefill_tokens: int
    engine_prefill_tokens: list[int]
    engine_requests: list[int]
    ttft_s: np.ndarray
    wall_s: float
    index_events: int

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def max_mean_load(self) -> float:
        loads = np.asarray(self.engine_prefill_tokens, dtype=np.float64)
        return float(loads.max() / loads.mean()) if loads.size and loads.mean() > 0 else 1.0

    def summary(self) -> dict[str, object]:
        t = self.ttft_s
        return {
            "requests": self.requests,
            "blocks": self.blocks,
            "hit_rate": round(self.hit_rate, 6),
            "local_hit_rate": round(self.local_hit_blocks / self.blocks, 6) if self.blocks else 0.0,
            "fabric_hit_rate": round(self.fabric_hit_blocks / self.blocks, 6) if self.blocks else 0.0,
            "fabric_tier_blocks": self.fabric_tier_blocks,
            "token_hit_rate": round(self.token_hit_rate, 6),
            "mean_request_hit_rate": round(self.request_hit_fraction_sum / self.requests, 6) if self.requests else 0.0,
            "input_tokens": self.input_tokens,
            "prefill_tokens": self.prefill_tokens,
            "engine_prefill_tokens": self.engine_prefill_tokens,
            "max_mean_load": round(self.max_mean_load, 4),
            "ttft_mean_s": round(float(t.mean()), 4) if t.size else 0.0,
            "ttft_p50_s": round(float(np.percentile(t, 50)), 4) if t.size else 0.0,
            "ttft_p99_s": round(float(np.percentile(t, 99)), 4) if t.size else 0.0,
            "index_events": self.index_events,
            "wall_s": round(self.wall_s, 3),
        }


def unlimited_hit_rate(trace: Sequence[TraceRequest]) -> float:
    """Prefix-hit rate of one infinite cache in request order: the ceiling any cache or router can reach."""
    seen: set[PrefixHash] = set()
    hit = total = 0
    for req in trace:
        total += len(req.chain)
        n = 0
        for h in req.chain:
            if h not in seen:
                break
            n += 1
        hit += n
        seen.update(req.chain)
    return hit / total if total else 0.0


def simulate(trace: Sequence[TraceRequest], cfg: SimConfig) -> SimResult:
    if cfg.engines <= 0:
        raise ValueError("need at least one engine")
    t0 = time.perf_counter()
    cap_blocks = None if cfg.capacity_tokens is None else int(cfg.capacity_tokens // cfg.block_tokens)
    engines = [_Engine(f"engine-{i}", BlockCache(cap_blocks, cfg.eviction)) for i in range(cfg.engines)]
    by_name = {e.name: e for e in engines}
    index = PrefixIndex()
    fabric = FabricPool(cfg.fabric, NAMESPACE, MODEL) if cfg.fabric else None
    calibration = Calibration(
        prefill_tokens_per_s=cfg.prefill_tokens_per_s,
        kv_bytes_per_token=cfg.kv_bytes_per_token,
        tiers=tuple(TierSpeed(t.medium, t.bytes_per_s) for t in cfg.fabric),
    )
    policy = make_policy(
        cfg.router, index, calibration, use_fabric=cfg.use_fabric_in_router, overlap_weight=cfg.overlap_weight
    )
    rate = cfg.prefill_tokens_per_s
    block_bytes = cfg.block_tokens * cfg.kv_bytes_per_token
    tier_load_s = [block_bytes / t.bytes_per_s for t in cfg.fabric]
    blocks = hit_blocks = local_hits = fabric_hits = input_tokens = hit_tokens = 0
    request_hit_sum = 0.0
    tier_blocks = [0] * len(cfg.fabric)
    ttft = np.empty(len(trace))
    n_events = 0
    events: list[KVEvent] = []

    for r, req in enumerate(trace):
        now = req.arrival_s
        loads = [e.load(now, rate) for e in engines]
        decision = policy.route(RouteRequest(NAMESPACE, MODEL, req.chain, req.input_length, cfg.block_tokens), loads)
        eng = by_name[decision.engine]
        chain = req.chain
        local = eng.cache.leading(chain)
        levels = fabric.run_from(chain, local) if fabric is not None else []
        matched = local + len(levels)
        hit_tok = min(matched * cfg.block_tokens, req.input_length)
        prefill = req.input_length - hit_tok
        load_s = sum(tier_load_s[lv] for lv in levels)

        start = max(now, eng.busy_until)
        prefill_s = prefill / rate
        eng.busy_until = start + prefill_s
        ttft[r] = start - now + load_s + prefill_s
        out_blocks = -(-(req.input_length + req.output_length) // cfg.block_tokens)
        heapq.heappush(eng.decoding, (eng.busy_until + load_s + req.output_length / cfg.decode_tokens_per_s,
                                      out_blocks))  # fmt: skip
        eng.decode_blocks += out_blocks
        eng.prefill_tokens += prefill
        eng.requests += 1

        blocks += len(chain)
        hit_blocks += matched
        local_hits += local
        fabric_hits += len(levels)
        for lv in levels:
            tier_blocks[lv] += 1
        input_tokens += req.input_length
        hit_tokens += hit_tok
        request_hit_sum += hit_tok / req.input_length if req.input_length else 0.0

        stored, evicted = eng.cache.admit(chain)
        if stored:
            events.append(BlockStored(eng.name, ENGINE_MEDIUM, NAMESPACE, MODEL, tuple(stored)))
        if evicted:
            events.append(BlockRemoved(eng.name, ENGINE_MEDIUM, NAMESPACE, MODEL, tuple(evicted)))
        if fabric is not None:
            if levels:
                fabric.read(chain[local:matched], levels)
            fabric.write(chain[matched:])
            events.extend(fabric.take_events())
        n_events += index.apply_many(events)
        events.clear()

    return SimResult(
        requests=len(trace),
        blocks=blocks,
        hit_blocks=hit_blocks,
        local_hit_blocks=local_hits,
        fabric_hit_blocks=fabric_hits,
        fabric_tier_blocks={t.medium: n for t, n in zip(cfg.fabric, tier_blocks, strict=True)},
        input_tokens=input_tokens,
        hit_tokens=hit_tokens,
        request_hit_fraction_sum=request_hit_sum,
        prefill_tokens=sum(e.prefill_tokens for e in engines),
        engine_prefill_tokens=[e.prefill_tokens for e in engines],
        engine_requests=[e.requests for e in engines],
        ttft_s=ttft,
        wall_s=time.perf_counter() - t0,
        index_events=n_events,
    )
