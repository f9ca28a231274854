"""Plain, frozen configuration of the tiered store. ``kvfabric/config.py`` builds it from settings files.

Every value is checked here, once, and a bad one raises ``ConfigError`` naming its key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvfabric.codec import Codec
from kvfabric.errors import ConfigError
from kvfabric.store.object.config import ObjectTierConfig  # plain data: no boto3 behind this import
from kvfabric.store.policy import POLICIES

WRITE_THROUGH = "write-through"
WRITE_BACK = "write-back"
WritePolicy = Literal["write-through", "write-back"]
FSYNC_MODES = ("always", "group", "none")
DEFAULT_DISK_BYTES = 64 << 30
DEFAULT_NAMESPACE = "*"
"""Key in ``StoreConfig.namespaces`` whose policy applies to every namespace not listed by name."""


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    """Limits for one namespace (tenant). ``None`` means unlimited."""

    ttl_s: float | None = None
    """Blocks older than this (since they were last written) read as misses and are deleted."""
    quota_bytes: int | None = None
    """Raw payload bytes of distinct blocks the namespace may hold across the store's tiers."""

    def __post_init__(self) -> None:
        if self.ttl_s is not None and not (self.ttl_s > 0 and math.isfinite(self.ttl_s)):
            raise ConfigError(f"namespace ttl_s must be a positive number of seconds, got {self.ttl_s!r}")
        if self.quota_bytes is not None and self.quota_bytes <= 0:
            raise ConfigError(f"namespace quota_bytes must be positive, got {self.quota_bytes!r}")


def _default_write_policy() -> dict[str, WritePolicy]:
    # Disk write-through: a put is acknowledged once it is on local NVMe. Object write-back: S3 latency and outages
    # never reach the engine; uploads drain in the background.
    return {"disk": WRITE_THROUGH, "object": WRITE_BACK}


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Everything :meth:`kvfabric.store.TieredStore.open` needs. Treat the mappings as read-only."""

    data_dir: Path | None = None
    """Where persistent state lives (disk tier, registered models, pins). ``None``: RAM only, nothing survives."""
    ram_bytes: int = 1 << 30
    disk_bytes: int | None = None
    """Disk tier capacity. ``None``: 64 GiB when ``data_dir`` is set; ``0``: no disk tier even with a data dir."""
    fsync: str = "group"
    """Disk tier durability: ``always`` (fsync per write), ``group`` (every ``group_commit_ms``), ``none``."""
    group_commit_ms: float = 2.0
    disk_codec: str = "raw"
    """Payload codec on disk: ``raw``, ``zstd`` or ``shuffle-zstd``."""
    object: ObjectTierConfig | None = None
    """The S3-compatible tier; ``None``: no object tier."""
    write_policy: Mapping[str, WritePolicy] = field(default_factory=_default_write_policy)
    """Per lower tier id (``disk``, ``object``): ``write-through`` or ``write-back``. RAM is always written first."""
    max_block_bytes: int = 64 << 20
    namespaces: Mapping[str, NamespacePolicy] = field(default_factory=dict)
    """Per namespace limits; the ``"*"`` entry applies to namespaces not named."""
    node_id: str = "local"
    """Source name in KV events."""
    ram_policy: str = "lru"
    """RAM eviction policy: ``lru`` or ``prefix-cost``."""
    ram_high_watermark: float = 0.95
    ram_low_watermark: float = 0.85
    """When RAM occupancy rises above high x ram_bytes, evict (demoting) down to low x ram_bytes."""
    shm_dir: str | None = "/dev/shm"
    """Directory of the RAM arena's shared-memory file; ``None``: anonymous memory (no same-host shm reads)."""
    ram_prefault: bool = False
    """Commit the whole RAM arena at open (MAP_POPULATE) so first writes run at copy speed rather than faulting in
    every page (about 7x slower here). Worth it on a server; it takes ``ram_bytes`` of memory up front."""
    flush_interval_s: float = 0.2
    """How often the background flusher (``TieredStore.start``) drains write-back queues."""
    writeback_backlog_max: int = 1_000_000
    """Most keys queued for a write-back tier whose data already sits in a persistent tier above it; beyond this
    the oldest are dropped (the data stays durable above; the lower copy is skipped) and counted."""

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        _positive("ram_bytes", self.ram_bytes)
        if self.disk_bytes is not None and self.disk_bytes < 0:
            raise ConfigError(f"disk_bytes must be >= 0, got {self.disk_bytes}")
        if self.fsync not in FSYNC_MODES:
            raise ConfigError(f"fsync must be one of {FSYNC_MODES}, got {self.fsync!r}")
        _positive("group_commit_ms", self.group_commit_ms)
        try:
            Codec.parse(self.disk_codec)
        except ValueError as exc:
            raise ConfigError(f"disk_codec: {exc}") from exc
        for tier, policy in self.write_policy.items():
            if policy not in (WRITE_THROUGH, WRITE_BACK):
                raise ConfigError(f"write_policy.{tier} must be {WRITE_THROUGH!r} or {WRITE_BACK!r}, got {policy!r}")
        if "ram" in self.write_policy:
            raise ConfigError("write_policy.ram: RAM is always written first; set policies for disk/object only")
        _positive("max_block_bytes", self.max_block_bytes)
        if self.object is not None and not isinstance(self.object, ObjectTierConfig):
            raise ConfigError(f"object must be an ObjectTierConfig, got {type(self.object).__name__}")
        for name, ns_policy in self.namespaces.items():
            if not isinstance(ns_policy, NamespacePolicy):
                raise ConfigError(f"namespaces.{name} must be a NamespacePolicy, got {type(ns_policy).__name__}")
        if not self.node_id:
            raise ConfigError("node_id must be non-empty")
        if self.ram_policy not in POLICIES:
            raise ConfigError(f"ram_policy: unknown RAM eviction policy {self.ram_policy!r}; known: {sorted(POLICIES)}")
        if not 0 < self.ram_low_watermark <= self.ram_high_watermark <= 1:
            raise ConfigError(
                "need 0 < ram_low_watermark <= ram_high_watermark <= 1, got "
                f"{self.ram_low_watermark} and {self.ram_high_watermark}"
            )
        _positive("flush_interval_s", self.flush_interval_s)
        _positive("writeback_backlog_max", self.writeback_backlog_max)

    @property
    def disk_capacity(self) -> int | None:
        """Effective disk tier capacity: ``None`` when there is no disk tier."""
        if self.data_dir is None or self.disk_bytes == 0:
            return None
        return DEFAULT_DISK_BYTES if self.disk_bytes is None else self.disk_bytes

    def write_policy_of(self, tier: str) -> WritePolicy:
        return self.write_policy.get(tier, _default_write_policy().get(tier, WRITE_THROUGH))

    def namespace_policy(self, namespace: str) -> NamespacePolicy | None:
        return self.namespaces.get(namespace) or self.namespaces.get(DEFAULT_NAMESPACE)


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{name} must be positive, got {value!r}")
