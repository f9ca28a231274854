"""Plain, frozen configuration of the tiered store, one section per tier: :class:`RamConfig`, :class:`DiskConfig`
and the object tier's :class:`~kvfabric.store.object.config.ObjectTierConfig`, inside :class:`StoreConfig`.

These are the one source of every store default: ``kvfabric/config.py`` (the node's settings files) reads its
defaults from here and builds these types. Every value is checked here, once, and a bad one raises
``ConfigError`` naming its key as the settings file spells it (``ram_bytes``, ``disk_codec``, ...).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvfabric.codec import Codec
from kvfabric.errors import ConfigError
from kvfabric.store.object.config import ObjectTierConfig  # plain data: no boto3 behind this import
from kvfabric.store.policy import POLICIES


class WritePolicy(enum.StrEnum):
    """How the store writes a tier below RAM. Values are the settings files' spellings."""

    WRITE_THROUGH = "write-through"
    """A put returns once the tier holds the block."""
    WRITE_BACK = "write-back"
    """A put returns once RAM holds it; the tier is written in the background."""


class FsyncMode(enum.StrEnum):
    """Disk tier durability."""

    ALWAYS = "always"
    """fsync per write."""
    GROUP = "group"
    """One fsync per ``group_commit_ms`` for every write in it."""
    NONE = "none"
    """Leave it to the page cache."""


WRITE_THROUGH = WritePolicy.WRITE_THROUGH
WRITE_BACK = WritePolicy.WRITE_BACK
FSYNC_MODES = tuple(m.value for m in FsyncMode)
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


@dataclass(frozen=True, slots=True)
class RamConfig:
    """The RAM tier: the arena every block is written to first and read from in place."""

    bytes: int = 1 << 30
    """Arena size (settings: ``store.ram_bytes``)."""
    policy: str = "lru"
    """Eviction: ``lru``, or ``prefix-cost`` (keeps blocks deep in long prefixes, which cost most to recompute);
    one of ``kvfabric.store.policy.POLICIES`` (settings: ``store.ram_policy``)."""
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    """Above high x bytes the store evicts (demoting to lower tiers) down to low x bytes."""
    shm_dir: str | None = "/dev/shm"
    """Directory of the arena's shared-memory file (same-host zero-copy reads); ``None``: anonymous memory."""
    prefault: bool = False
    """Commit the whole arena at open (MAP_POPULATE) so first writes run at copy speed rather than faulting in every
    page (about 7x slower here). Worth it on a server; it takes ``bytes`` of memory up front."""

    def __post_init__(self) -> None:
        _positive("ram_bytes", self.bytes)
        if self.policy not in POLICIES:
            raise ConfigError(f"ram_policy: unknown RAM eviction policy {self.policy!r}; known: {sorted(POLICIES)}")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError(
                "need 0 < ram_low_watermark <= ram_high_watermark <= 1, got "
                f"{self.low_watermark} and {self.high_watermark}"
            )


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """The disk tier under ``data_dir/disk``: segment files and a RocksDB index."""

    bytes: int | None = None
    """Capacity. ``None``: ``DEFAULT_DISK_BYTES`` when the store has a data dir; ``0``: no disk tier even with one
    (settings: ``store.disk_bytes``)."""
    fsync: FsyncMode = FsyncMode.GROUP
    group_commit_ms: float = 2.0
    codec: Codec = Codec.RAW
    """Payload codec on disk (settings: ``store.codec.disk``)."""

    def __post_init__(self) -> None:
        if self.bytes is not None and self.bytes < 0:
            raise ConfigError(f"disk_bytes must be >= 0, got {self.bytes}")
        try:
            object.__setattr__(self, "fsync", FsyncMode(self.fsync))
        except ValueError:
            raise ConfigError(f"fsync must be one of {FSYNC_MODES}, got {self.fsync!r}") from None
        _positive("group_commit_ms", self.group_commit_ms)
        try:
            object.__setattr__(self, "codec", Codec.parse(self.codec))
        except ValueError as exc:
            raise ConfigError(f"disk_codec: {exc}") from exc


def _default_write_policy() -> dict[str, WritePolicy]:
    # Disk write-through: a put is acknowledged once it is on local NVMe. Object write-back: S3 latency and outages
    # never reach the engine; uploads drain in the background.
    return {"disk": WRITE_THROUGH, "object": WRITE_BACK}


_FLAT_KEYS: dict[str, tuple[str, str]] = {
    "ram_bytes": ("ram", "bytes"), "ram_policy": ("ram", "policy"), "ram_high_watermark": ("ram", "high_watermark"),
    "ram_low_watermark": ("ram", "low_watermark"), "shm_dir": ("ram", "shm_dir"), "ram_prefault": ("ram", "prefault"),
    "disk_bytes": ("disk", "bytes"), "fsync": ("disk", "fsync"), "group_commit_ms": ("disk", "group_commit_ms"),
    "disk_codec": ("disk", "codec"),
}  # fmt: skip
"""The settings file's ``[store]`` keys of one tier -> (section, field). ``StoreConfig`` takes and reads them too, so
callers written before the per-tier split keep working."""


@dataclass(frozen=True, slots=True, init=False)
class StoreConfig:
    """Everything :meth:`kvfabric.store.TieredStore.open` needs. Treat the mappings as read-only.

    Build it with sections (``StoreConfig(ram=RamConfig(bytes=n), disk=DiskConfig(fsync=FsyncMode.NONE))``) or with
    the flat keys of ``_FLAT_KEYS`` (``StoreConfig(ram_bytes=n, fsync="none")``), which also read back
    (``config.ram_bytes``)."""

    data_dir: Path | None = None
    """Where persistent state lives (disk tier, registered models, pins). ``None``: RAM only, nothing survives."""
    ram: RamConfig = field(default_factory=RamConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    object: ObjectTierConfig | None = None
    """The S3-compatible tier; ``None``: no object tier."""
    write_policy: Mapping[str, WritePolicy] = field(default_factory=_default_write_policy)
    """Per lower tier id (``disk``, ``object``): ``write-through`` or ``write-back``. RAM is always written first."""
    max_block_bytes: int = 64 << 20
    namespaces: Mapping[str, NamespacePolicy] = field(default_factory=dict)
    """Per namespace limits; the ``"*"`` entry applies to namespaces not named."""
    node_id: str = "local"
    """Source name in KV events."""
    flush_interval_s: float = 0.2
    """How often the background flusher (``TieredStore.start``) drains write-back queues."""
    writeback_backlog_max: int = 1_000_000
    """Most keys queued for a write-back tier whose data already sits in a persistent tier above it; beyond this
    the oldest are dropped (the data stays durable above; the lower copy is skipped) and counted."""

    def __init__(self, **values: Any) -> None:
        flat: dict[str, dict[str, Any]] = {"ram": {}, "disk": {}}
        for key in [k for k in values if k in _FLAT_KEYS]:
            section, name = _FLAT_KEYS[key]
            flat[section][name] = values.pop(key)
        for f in fields(StoreConfig):
            if f.name in values:
                value = values.pop(f.name)
            else:
                value = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            object.__setattr__(self, f.name, value)
        if values:
            raise ConfigError(f"unknown store setting(s): {', '.join(sorted(values))}")
        for section, given in flat.items():
            if given:
                object.__setattr__(self, section, replace(getattr(self, section), **given))
        self._check()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: the flat keys of one tier's section.
        if name in _FLAT_KEYS:
            section, key = _FLAT_KEYS[name]
            return getattr(getattr(self, section), key)
        raise AttributeError(f"StoreConfig has no setting {name!r}")

    def _check(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name, kind in (("ram", RamConfig), ("disk", DiskConfig), ("object", ObjectTierConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind) and not (name == "object" and value is None):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        policies = {}
        for tier, policy in self.write_policy.items():
            try:
                policies[tier] = WritePolicy(policy)
            except ValueError:
                raise ConfigError(
                    f"write_policy.{tier} must be {WRITE_THROUGH.value!r} or {WRITE_BACK.value!r}, got {policy!r}"
                ) from None
        if "ram" in policies:
            raise ConfigError("write_policy.ram: RAM is always written first; set policies for disk/object only")
        object.__setattr__(self, "write_policy", policies)
        _positive("max_block_bytes", self.max_block_bytes)
        for name, ns_policy in self.namespaces.items():
            if not isinstance(ns_policy, NamespacePolicy):
                raise ConfigError(f"namespaces.{name} must be a NamespacePolicy, got {type(ns_policy).__name__}")
        if not self.node_id:
            raise ConfigError("node_id must be non-empty")
        _positive("flush_interval_s", self.flush_interval_s)
        _positive("writeback_backlog_max", self.writeback_backlog_max)

    @property
    def disk_capacity(self) -> int | None:
        """Effective disk tier capacity: ``None`` when there is no disk tier."""
        if self.data_dir is None or self.disk.bytes == 0:
            return None
        return DEFAULT_DISK_BYTES if self.disk.bytes is None else self.disk.bytes

    def write_policy_of(self, tier: str) -> WritePolicy:
        return self.write_policy.get(tier, _default_write_policy().get(tier, WRITE_THROUGH))

    def namespace_policy(self, namespace: str) -> NamespacePolicy | None:
        return self.namespaces.get(namespace) or self.namespaces.get(DEFAULT_NAMESPACE)


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{name} must be positive, got {value!r}")
