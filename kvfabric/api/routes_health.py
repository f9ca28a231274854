"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from kvfabric.api.auth import Principal, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.metrics import CONTENT_TYPE
from kvfabric.api.schemas import ErrorBody, Health, Readiness

router = APIRouter(tags=["health"])
Ctx = Annotated[AdminContext, Depends(get_context)]


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers (no auth)")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: the store cannot answer, or a tier refuses writes"}},
    summary="Readiness: the store answers a stats read and every tier takes writes (no auth)",
)
async def readyz(ctx: Ctx) -> Response:
    try:
        await asyncio.to_thread(ctx.store.tier_stats)
        conditions = await asyncio.to_thread(ctx.store.tier_conditions)
    except Exception as exc:  # noqa: BLE001 - any failure to read the store means: send no traffic here
        body = Readiness(ready=False, detail=f"store not readable: {exc}")
        return JSONResponse(body.model_dump(), status_code=503)
    if conditions:  # reads are still served, but a put sent here would fail: route writes elsewhere
        degraded = {str(t): c for t, c in conditions.items()}
        detail = "degraded: " + "; ".join(f"{t} tier: {c}" for t, c in degraded.items())
        return JSONResponse(Readiness(ready=False, detail=detail, degraded=degraded).model_dump(), status_code=503)
    return JSONResponse(Readiness(ready=True, detail="ok").model_dump())


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}, "description": "metrics"},
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
    },
    summary="Prometheus metrics (read scope, all namespaces)",
)
def metrics(ctx: Ctx, _: Annotated[Principal, Depends(require("read", node_wide=True))]) -> Response:
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE)
