"""Node maintenance: tier configuration, eviction and compaction triggers (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from kvfabric.api.auth import Principal, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.schemas import Compacted, ErrorBody, Evicted, EvictIn, TierConfigOut, TiersOut

router = APIRouter(prefix="/v1", tags=["operations"], responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}})
Ctx = Annotated[AdminContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/tiers", response_model=TiersOut, summary="Tier configuration: capacity, persistence, codec, policy")
def tiers(ctx: Ctx, _: Annotated[Principal, Depends(require("read"))]) -> TiersOut:
    return TiersOut(tiers=[TierConfigOut(**info) for info in ctx.store.tier_info()])


@router.post(
    "/evict",
    response_model=Evicted,
    responses={400: {"model": ErrorBody, "description": "unparseable body"}, 404: {"model": ErrorBody}},
    summary="Evict bytes from a tier now",
)
def evict(body: EvictIn, ctx: Ctx, _: Admin) -> Evicted:
    if body.tier not in ctx.store.tier_stats():
        raise HTTPException(404, f"no tier '{body.tier}' on this node")
    blocks, nbytes = ctx.store.evict(body.tier, body.bytes)
    return Evicted(tier=body.tier, evicted_blocks=blocks, evicted_bytes=nbytes)


@router.post("/compact", response_model=Compacted, summary="Compact the disk tier's segments now")
def compact(ctx: Ctx, _: Admin) -> Compacted:
    return Compacted(result=ctx.store.compact() or {})
