"""The prefix index, the KV-aware router and the event feeds that keep them current (``docs/router.md``)."""

from kvfabric.index.prefix_index import ChainWalk, IndexStats, Location, PrefixIndex, SourceMatch
from kvfabric.index.router import (
    POLICIES,
    Calibration,
    EngineLoad,
    LeastLoadedRouter,
    OverlapRouter,
    RoundRobinRouter,
    RouteDecision,
    RouteRequest,
    RoutingPolicy,
    TierSpeed,
    TTFTRouter,
    make_policy,
)  # fmt: skip
from kvfabric.index.vllm_events import VllmEngineBinding, VllmEventTranslator

__all__ = [
    "POLICIES", "Calibration", "ChainWalk", "EngineLoad", "IndexStats", "LeastLoadedRouter", "Location",
    "OverlapRouter", "PrefixIndex", "RoundRobinRouter", "RouteDecision", "RouteRequest", "RoutingPolicy",
    "SourceMatch", "TTFTRouter", "TierSpeed", "VllmEngineBinding", "VllmEventTranslator", "make_policy",
]  # fmt: skip
