"""Durable KV block storage: RAM -> NVMe -> S3 tiers behind one contract."""

from kvfabric.store.tier import Tier, TierCapabilities, TierStats

__all__ = ["Tier", "TierCapabilities", "TierStats"]
