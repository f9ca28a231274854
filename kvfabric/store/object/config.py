"""Plain configuration of the object tier; no boto3 here, so the rest of kvfabric can import it cheaply."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvfabric.codec import Codec
from kvfabric.errors import ConfigError

READABLE_STORAGE_CLASSES = frozenset({
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR",
    "EXPRESS_ONEZONE",
})  # fmt: skip
"""Storage classes that serve ranged GETs at once; archive classes (GLACIER, DEEP_ARCHIVE) need a restore first."""


class AddressingStyle(enum.StrEnum):
    """How boto3 puts the bucket in request URLs."""

    PATH = "path"
    """``endpoint/bucket/key``: works with every S3-compatible server."""
    VIRTUAL = "virtual"
    """``bucket.endpoint/key``: AWS."""
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class ObjectTierConfig:
    """Where the object tier keeps its segments and how it talks to the store.

    Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``
    or ``profile``, config files, instance roles) unless both keys are given here, in which case they are handed to
    the boto3 session as they are.
    """

    bucket: str
    prefix: str = "kvfabric"
    """Key prefix of everything this tier writes; one writer per prefix (any number of readers)."""
    endpoint_url: str | None = None
    """e.g. ``http://127.0.0.1:8333`` for SeaweedFS; ``None``: AWS, or boto3's ``AWS_ENDPOINT_URL_S3``."""
    region: str | None = None
    profile: str | None = None
    storage_class: str | None = None
    """``StorageClass`` of uploaded objects; ``None`` leaves the bucket's default."""
    addressing_style: AddressingStyle = AddressingStyle.PATH
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    codec: Codec = Codec.SHUFFLE_ZSTD
    """Payload codec of the blocks in segments (settings: ``store.codec.object``): byte-shuffled zstd, as KV
    tensors compress well once their bytes are grouped by position and S3 bandwidth is what a load waits on."""
    segment_bytes: int = 64 << 20
    """An open segment is sealed and uploaded once it holds this many bytes (or on flush/close/seal_after_s)."""
    seal_after_s: float | None = 5.0
    """With the uploader thread running, an open segment older than this is sealed, bounding what a crash loses."""
    durable_put: bool = False
    """Write-through: ``put`` returns once its block's segment and manifest are in the store."""
    backlog_bytes: int = 1 << 30
    """Most bytes held in memory awaiting upload (open + sealed segments); beyond it ``put`` raises."""

    coalesce_gap_bytes: int = 1 << 20
    """``get_many`` reads records in one object with at most this many bytes between them by one ranged GET."""
    max_range_bytes: int = 64 << 20
    """Largest coalesced ranged GET."""
    max_concurrency: int = 8
    """Parallel ranged GETs in ``get_many`` and manifest reads at rebuild."""

    max_attempts: int = 4
    """Tries per request (botocore ``standard`` retry mode: exponential backoff with jitter on transient errors)."""
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0
    outage_backoff_s: float = 0.5
    """After a request fails for want of the store, calls skip it for this long, doubling per failure ..."""
    outage_backoff_max_s: float = 30.0
    """... up to this; the first success resets it."""
    create_bucket: bool = False
    """Create the bucket on open when it does not exist (embedded/dev setups)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", _parse_codec(self.codec))
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        if not self.bucket:
            raise ConfigError("object.bucket must be set")
        if self.storage_class is not None and self.storage_class not in READABLE_STORAGE_CLASSES:
            raise ConfigError(
                f"object.storage_class {self.storage_class!r} cannot serve ranged GETs without a restore; "
                f"use one of {sorted(READABLE_STORAGE_CLASSES)}"
            )
        try:
            object.__setattr__(self, "addressing_style", AddressingStyle(self.addressing_style))
        except ValueError:
            raise ConfigError(
                f"object.addressing_style must be path, virtual or auto, got {self.addressing_style!r}"
            ) from None
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError("object needs both access_key_id and secret_access_key, or neither")
        positive = ("segment_bytes", "backlog_bytes", "max_range_bytes", "max_concurrency", "max_attempts")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"object.{name} must be positive, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "read_timeout_s", "outage_backoff_s", "outage_backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"object.{name} must be positive, got {getattr(self, name)}")
        if self.coalesce_gap_bytes < 0:
            raise ConfigError(f"object.coalesce_gap_bytes must be >= 0, got {self.coalesce_gap_bytes}")
        if self.seal_after_s is not None and self.seal_after_s <= 0:
            raise ConfigError(f"object.seal_after_s must be positive or None, got {self.seal_after_s}")
        if self.backlog_bytes < self.segment_bytes:
            raise ConfigError(
                f"object.backlog_bytes ({self.backlog_bytes}) must hold at least one segment ({self.segment_bytes})"
            )

    def object_key(self, kind: str, name: str) -> str:
        """``<prefix>/<kind>/<name>``, or ``<kind>/<name>`` with an empty prefix."""
        return f"{self.prefix}/{kind}/{name}" if self.prefix else f"{kind}/{name}"


def _parse_codec(value: Codec | str) -> Codec:
    try:
        return Codec.parse(value)
    except ValueError as exc:
        raise ConfigError(f"object.codec: {exc}") from exc
