"""Node maintenance: tier configuration, eviction and compaction triggers (all namespaces; admin to act)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.encoders import jsonable_encoder

from kvfabric.api.auth import Principal, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.schemas import (
    Compacted,
    DiskStateOut,
    ErrorBody,
    Evicted,
    EvictIn,
    ObjectStateOut,
    RecoveryOut,
    TierConfigOut,
    TiersOut,
)
from kvfabric.ids import TierId

if TYPE_CHECKING:
    from kvfabric.store.disk.recovery import RecoveryReport
    from kvfabric.store.disk.tier import DiskState
    from kvfabric.store.object.tier import ObjectTierStats

router = APIRouter(prefix="/v1", tags=["operations"], responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}})
Ctx = Annotated[AdminContext, Depends(get_context)]
# Node-wide operations and views: eviction and compaction act on every tenant's blocks, and the tiers' sizes and
# recovery reports describe the whole node, so they need a token for all namespaces.
NodeAdmin = Annotated[Principal, Depends(require("admin", node_wide=True))]
NodeReader = Annotated[Principal, Depends(require("read", node_wide=True))]


@router.get(
    "/tiers", response_model=TiersOut,
    summary="Tier configuration (capacity, persistence, codec, policy) and live state (disk space, object uploads)",
)  # fmt: skip
def tiers(ctx: Ctx, _: NodeReader) -> TiersOut:
    config = ctx.store.config
    stats = ctx.store.tier_stats()
    nearest = ctx.store.tiers[0]  # RAM: every put lands there first
    out = []
    for tier, caps in ctx.store.tier_capabilities().items():
        info = ctx.store.tier(tier).info()
        out.append(
            TierConfigOut(
                tier=tier, capacity_bytes=stats[tier].capacity_bytes, persistent=caps.persistent, shared=caps.shared,
                codec=info.codec.name.lower(), write_policy="first" if tier == nearest else config.write_policy_of(tier),
                recovery=_recovery(info.recovery),
                disk_state=_disk_out(info.disk), object_state=_object_out(info.objects),
            )
        )  # fmt: skip
    return TiersOut(tiers=out)


def _disk_out(d: DiskState | None) -> DiskStateOut | None:
    return None if d is None else DiskStateOut.model_validate(d, from_attributes=True)


def _object_out(o: ObjectTierStats | None) -> ObjectStateOut | None:
    if o is None:
        return None
    return ObjectStateOut(
        store_up=not o.store_down, uploaded_blocks=o.uploaded_blocks, pending_blocks=o.pending_blocks,
        backlog_bytes=o.backlog_bytes, backlog_items=o.backlog_items, uploads=o.uploads,
        uploaded_bytes=o.uploaded_bytes, upload_failures=o.upload_failures,
        unavailable_misses=o.unavailable_misses, rejected_puts=o.rejected_puts, last_failure=o.last_failure,
    )  # fmt: skip


def _recovery(r: RecoveryReport | None) -> RecoveryOut | None:
    """The tier's recovery report at open (the disk tier's), if it has one."""
    if r is None:
        return None
    return RecoveryOut(
        scanned_from_segment=r.scanned_from.segment, scanned_from_offset=r.scanned_from.offset,
        scanned_bytes=r.scanned_bytes, reindexed=r.reindexed, dropped=r.dropped, truncated_bytes=r.truncated_bytes,
    )  # fmt: skip


@router.post(
    "/evict",
    response_model=Evicted,
    responses={400: {"model": ErrorBody, "description": "unparseable body"}, 404: {"model": ErrorBody}},
    summary="Evict bytes from a tier now (demoting what lower tiers lack; pinned blocks stay)",
)
def evict(body: EvictIn, ctx: Ctx, _: NodeAdmin) -> Evicted:
    if body.tier not in ctx.store.tiers:
        raise HTTPException(404, f"no tier '{body.tier}' on this node; tiers: {', '.join(ctx.store.tiers)}")
    return Evicted(tier=body.tier, evicted_bytes=ctx.store.evict(TierId(body.tier), body.bytes))


@router.post("/compact", response_model=Compacted, summary="Compact the tiers that can (the disk tier) now")
def compact(ctx: Ctx, _: NodeAdmin) -> Compacted:
    return Compacted(result=jsonable_encoder(ctx.store.compact()))
