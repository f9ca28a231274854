"""Request and response bodies of the admin API (these are what the OpenAPI spec publishes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

from kvfabric.api.history import TierRates
from kvfabric.config import parse_size
from kvfabric.store.counters import StoreStats, published
from kvfabric.store.tier import TierStats

HEX64 = r"^[0-9a-fA-F]{64}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    detail: str
    degraded: dict[str, str] = Field(
        default_factory=dict, description="tiers that refuse writes now (a full disk), and why"
    )


def model_of(
    name: str,
    record: type,
    *,
    first: Sequence[tuple[str, Any]] = (),
    after: Mapping[str, Sequence[tuple[str, Any]]] = {},
    last: Sequence[tuple[str, Any]] = (),
    doc: str | None = None,
    every_field: bool = False,
) -> type[BaseModel]:
    """A response model whose fields are the published fields of a store statistics dataclass (``stat(...)``), or
    with ``every_field`` all of a plain dataclass's, in their order and with their help as description, plus
    ``first``/``after`` a field/``last`` derived ones. Built with ``from_attributes``, so
    ``model_validate(record_instance, from_attributes=True)`` fills it."""
    hints = get_type_hints(record)
    spec: dict[str, Any] = dict(first)
    for f in fields(record) if every_field else published(record):
        spec[f.name] = (hints[f.name], Field(description=f.metadata.get("help")))
        spec.update(after.get(f.name, ()))
    spec.update(last)
    return create_model(name, __config__=ConfigDict(from_attributes=True), __doc__=doc, **spec)  # fmt: skip


_RATE = (float, Field(description="over the last sampling interval"))

TierOut = model_of(
    "TierOut", TierStats, first=[("tier", (str, ...))],
    after={
        "capacity_bytes": [("occupancy", (float | None, Field(description="bytes / capacity_bytes, 0..1")))],
        "misses": [(
            "hit_rate",
            (float | None, Field(description="hits / (hits + misses) since start; null before any read")),
        )],
    },
    last=[("read_bytes_per_s", _RATE), ("write_bytes_per_s", _RATE)],
    doc="One tier's counters (``TierStats``), its occupancy and hit rate, and its recent byte rates.",
)  # fmt: skip


class ModelUsageOut(BaseModel):
    fingerprint: str
    model: str | None
    blocks: int
    bytes: int


class NamespacePolicyOut(BaseModel):
    ttl_s: float | None
    quota_bytes: int | None


class NamespaceOut(BaseModel):
    namespace: str
    blocks: int
    bytes: int
    policy: NamespacePolicyOut
    models: list[ModelUsageOut]


class Totals(BaseModel):
    blocks: int
    bytes: int
    hit_rate: float | None


StoreCountersOut = model_of(
    "StoreCountersOut", StoreStats,
    last=[("writeback_pending", (dict[str, int], Field(description="blocks waiting per write-back tier")))],
    doc="What the store does between its tiers (``StoreStats``).",
)  # fmt: skip


class StatsOut(BaseModel):
    node_id: str
    version: str
    time: float
    uptime_s: float
    view: Literal["node", "namespaces"]
    """``node``: a token for all namespaces sees the whole node. ``namespaces``: any other token sees only its
    namespaces' blocks and bytes; the tiers, the store's counters and the upload backlog (node-wide, every tenant's
    traffic in them) are left out."""
    tiers: list[TierOut]
    totals: Totals
    namespaces: list[NamespaceOut]
    upload_backlog_bytes: int | None
    store: StoreCountersOut | None


TierRatesOut = model_of("TierRatesOut", TierRates, every_field=True, doc="What one tier did over one interval.")


class HistoryPointOut(BaseModel):
    time: float
    interval_s: float
    tiers: list[TierRatesOut]
    hit_rate: float | None
    read_bytes_per_s: float
    write_bytes_per_s: float
    upload_backlog_bytes: int


class HistoryOut(BaseModel):
    interval_s: float
    points: list[HistoryPointOut]


class ErrorEntryOut(BaseModel):
    time: float
    kind: str
    message: str


class ModelOut(BaseModel):
    fingerprint: str
    spec: dict[str, Any]
    blocks: int
    bytes: int


class BlockOut(BaseModel):
    namespace: str
    fingerprint: str
    prefix: str
    parent: str
    dtype: str
    shape: list[int]
    token_count: int
    nbytes: int
    created_ms: int
    tier: str
    pinned: bool


class Deleted(BaseModel):
    deleted: int = Field(description="blocks removed")


class Pinned(BaseModel):
    pinned: bool


SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]([iI]?[bB])?|[bB])?\s*$"
"""Size strings ``parse_size`` accepts: ``"4096"``, ``"64GiB"``, ``"1.5 GB"``, ``"2k"``."""


def _size_schema(minimum: int) -> WithJsonSchema:
    # Published as what the API really accepts: a byte count, or a size string.
    return WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": minimum}, {"type": "string", "pattern": SIZE_PATTERN}]
    })  # fmt: skip


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0), _size_schema(0)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0), _size_schema(1)]


class PolicyIn(_Body):
    """Fields left out keep their current value; null removes the limit."""

    ttl_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    quota_bytes: PositiveSize | None = Field(default=None, description="bytes, or a size string such as '10GiB'")


class EvictIn(_Body):
    tier: str = Field(min_length=1, description="tier to evict from, e.g. 'ram'")
    bytes: Size = Field(description="how many bytes to free (a size string such as '1GiB' works too)")


class Evicted(BaseModel):
    tier: str
    evicted_bytes: int = Field(description="bytes freed in the tier (pinned blocks are never evicted)")


class Compacted(BaseModel):
    result: dict[str, Any]


class RecoveryOut(BaseModel):
    """What reconciling the index with the segment files did when the disk tier opened."""

    scanned_from_segment: int
    scanned_from_offset: int
    scanned_bytes: int = Field(description="record bytes re-read and verified from the high-water mark on")
    reindexed: int = Field(description="durable records whose index entries a crash had lost, indexed again")
    dropped: int = Field(description="index entries removed: file gone, record past its end, or failing checks")
    truncated_bytes: int = Field(description="torn tail bytes cut from the ends of segments")


class DiskStateOut(BaseModel):
    """The disk tier now: is its filesystem full (puts refused; reads and deletes served), its space reserve."""

    model_config = ConfigDict(from_attributes=True)  # filled from the tier's DiskState

    full: bool
    reason: str | None = Field(description="the write failure that made the tier full; null when not full")
    full_since: float | None = Field(description="unix time it became full")
    free_bytes: int = Field(description="free space on the filesystem")
    resume_free_bytes: int = Field(description="free space a full tier waits for before puts resume")
    reserve_bytes: int = Field(description="space kept back for deletes, compaction and an index reopen")
    reserve_held: bool
    full_episodes: int
    refused_puts: int
    index_reopens: int


class ObjectStateOut(BaseModel):
    """The object tier now: what is uploaded, what waits in memory, whether the store answers."""

    store_up: bool
    uploaded_blocks: int
    pending_blocks: int = Field(description="blocks accepted and not uploaded yet")
    backlog_bytes: int
    backlog_items: int = Field(description="sealed segments and tombstone lists waiting to upload")
    uploads: int
    uploaded_bytes: int
    upload_failures: int
    unavailable_misses: int
    rejected_puts: int = Field(description="puts refused because the backlog was full")
    last_failure: str | None = Field(description="the last failed upload or read while the store is down")


class TierConfigOut(BaseModel):
    tier: str
    capacity_bytes: int | None
    persistent: bool
    shared: bool
    codec: str
    write_policy: str
    recovery: RecoveryOut | None = Field(None, description="the disk tier's recovery at open; null for other tiers")
    disk_state: DiskStateOut | None = Field(None, description="the disk tier's live space state; null for others")
    object_state: ObjectStateOut | None = Field(None, description="the object tier's live state; null for others")


class TiersOut(BaseModel):
    tiers: list[TierConfigOut]


class ConfigOut(BaseModel):
    config: dict[str, Any] = Field(description="effective configuration, secrets masked")


class BlockPage(BaseModel):
    blocks: list[BlockOut]
    next: str | None = Field(description="pass as `after` for the next page; null on the last page")


class PinOut(BaseModel):
    namespace: str
    fingerprint: str
    prefix: str
    stored: bool = Field(description="the block is stored now (a pin may be recorded before its block arrives)")
