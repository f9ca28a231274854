"""Durable KV block storage: RAM -> NVMe -> S3 tiers behind one contract, composed by :class:`TieredStore`."""

from kvfabric.store.arena import Arena
from kvfabric.store.catalog import NamespaceStats, UsageStats
from kvfabric.store.config import WRITE_BACK, WRITE_THROUGH, NamespacePolicy, StoreConfig
from kvfabric.store.counters import StoreStats
from kvfabric.store.memory import Lease, MemoryTier
from kvfabric.store.policy import EvictionPolicy, LRUPolicy, PrefixCostPolicy, make_policy
from kvfabric.store.tier import Tier, TierCapabilities, TierStats
from kvfabric.store.tiered import TieredStore

__all__ = [
    "WRITE_BACK",
    "WRITE_THROUGH",
    "Arena",
    "EvictionPolicy",
    "LRUPolicy",
    "Lease",
    "MemoryTier",
    "NamespacePolicy",
    "NamespaceStats",
    "PrefixCostPolicy",
    "StoreConfig",
    "StoreStats",
    "Tier",
    "TierCapabilities",
    "TierStats",
    "TieredStore",
    "UsageStats",
    "make_policy",
]
