"""Building TieredStores for tests out of real tiers: RAM tiers stand in for the lower tiers where a test is about
the store's policies rather than about disk or S3."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvfabric.ids import BlockKey, TierId
from kvfabric.store.config import StoreConfig
from kvfabric.store.memory import MemoryTier
from kvfabric.store.policy import make_policy
from kvfabric.store.tier import Tier
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC

BLOCK = SPEC.block_nbytes


class Clock:
    """A time source the test moves by hand (TTL tests), instead of sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ram_tier(blocks: int, tier_id: str = "ram") -> MemoryTier:
    return MemoryTier(blocks * BLOCK, tier_id=TierId(tier_id), shm_dir=None if tier_id != "ram" else "/dev/shm")


def build(
    ram_blocks: int = 64,
    lower: Sequence[str] = (),
    *,
    lower_blocks: int = 1024,
    clock: Clock | None = None,
    register: bool = True,
    **config: Any,
) -> tuple[TieredStore, dict[str, Tier]]:
    """A store with a RAM tier of ``ram_blocks`` test blocks and RAM-backed lower tiers named ``lower``."""
    config.setdefault("ram_bytes", ram_blocks * BLOCK)
    config.setdefault("ram_high_watermark", 1.0)
    config.setdefault("ram_low_watermark", 1.0)
    cfg = StoreConfig(**config)
    ram = MemoryTier(cfg.ram_bytes, shm_dir=cfg.shm_dir, policy=make_policy(cfg.ram_policy))
    tiers: list[Tier] = [ram_tier(lower_blocks, name) for name in lower]
    store = TieredStore(cfg, ram, tiers, clock=clock or Clock())
    if register:
        store.register_model(SPEC)
    return store, {"ram": ram, **{t.tier_id: t for t in tiers}}


def where(tiers: dict[str, Tier], key: BlockKey) -> set[str]:
    return {name for name, t in tiers.items() if t.contains(key)}


def snapshot(store: TieredStore, tiers: dict[str, Tier]) -> tuple[object, ...]:
    """Everything observable about a store's contents and counters."""
    return (
        store.tier_stats(),
        {name: sorted(k.to_bytes() for k in t.keys()) for name, t in tiers.items()},
        store.namespace_stats(),
        store.store_stats(),
        store.pinned(),
        [m.fingerprint() for m in store.models()],
    )
