"""Statistics: the current picture, its recent history, recent errors, and the tier and node configuration."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends

import kvfabric
from kvfabric.api.auth import Principal, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.history import HistoryPoint, TierRates, node_hit_rate
from kvfabric.api.schemas import (
    ConfigOut,
    ErrorBody,
    ErrorEntryOut,
    HistoryOut,
    HistoryPointOut,
    ModelUsageOut,
    NamespaceOut,
    NamespacePolicyOut,
    StatsOut,
    StoreCountersOut,
    TierOut,
    TierRatesOut,
    Totals,
)  # fmt: skip
from kvfabric.api.storeview import NamespaceUsage

router = APIRouter(prefix="/v1", tags=["stats"], responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}})
Ctx = Annotated[AdminContext, Depends(get_context)]
Reader = Annotated[Principal, Depends(require("read"))]
NodeReader = Annotated[Principal, Depends(require("read", node_wide=True))]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def policy_out(ctx: AdminContext, namespace: str) -> NamespacePolicyOut:
    """The namespace's effective TTL and quota (its own, else the ``"*"`` default)."""
    policy = ctx.store.config.namespace_policy(namespace)
    if policy is None:
        return NamespacePolicyOut(ttl_s=None, quota_bytes=None)
    return NamespacePolicyOut(ttl_s=policy.ttl_s, quota_bytes=policy.quota_bytes)


def namespace_out(ctx: AdminContext, usage: NamespaceUsage) -> NamespaceOut:
    return NamespaceOut(
        namespace=usage.namespace,
        blocks=usage.blocks,
        bytes=usage.bytes,
        policy=policy_out(ctx, usage.namespace),
        models=[
            ModelUsageOut(fingerprint=m.fingerprint, model=m.model, blocks=m.blocks, bytes=m.bytes)
            for m in usage.models
        ],
    )


@router.get("/stats", response_model=StatsOut, summary="Per tier, per namespace and per model statistics")
def stats(ctx: Ctx, principal: Reader) -> StatsOut:
    snap = ctx.snapshot()
    points = ctx.history.points()
    last = {t.tier: t for t in points[-1].tiers} if points else {}
    tiers = []
    for t in snap.tiers:
        rates = last.get(t.tier)
        tiers.append(
            TierOut(
                **asdict(t), occupancy=t.bytes / t.capacity_bytes if t.capacity_bytes else None,
                hit_rate=_ratio(t.hits, t.hits + t.misses),
                read_bytes_per_s=rates.read_bytes_per_s if rates else 0.0,
                write_bytes_per_s=rates.write_bytes_per_s if rates else 0.0,
            )
        )  # fmt: skip
    since_start = tuple(
        TierRates(t.tier, t.bytes, t.capacity_bytes, t.hits, t.misses, None, 0.0, 0.0) for t in snap.tiers
    )
    visible = [ns for ns in snap.namespaces if principal.may_access(ns.namespace)]
    node = principal.all_namespaces  # tiers, counters and backlog mix every tenant's traffic: the node's view only
    return StatsOut(
        node_id=ctx.settings.store.node_id,
        version=kvfabric.__version__,
        time=snap.time,
        uptime_s=time.time() - ctx.started,
        view="node" if node else "namespaces",
        tiers=tiers if node else [],
        totals=Totals(
            blocks=sum(ns.blocks for ns in visible),
            bytes=sum(ns.bytes for ns in visible),
            hit_rate=node_hit_rate(since_start) if node else None,
        ),
        namespaces=[namespace_out(ctx, ns) for ns in visible],
        upload_backlog_bytes=snap.upload_backlog_bytes if node else None,
        store=StoreCountersOut.model_validate(snap.counters, from_attributes=True) if node else None,
    )


def _point_out(p: HistoryPoint) -> HistoryPointOut:
    return HistoryPointOut(
        time=p.time, interval_s=p.interval_s, hit_rate=p.hit_rate, read_bytes_per_s=p.read_bytes_per_s,
        write_bytes_per_s=p.write_bytes_per_s, upload_backlog_bytes=p.upload_backlog_bytes,
        tiers=[TierRatesOut.model_validate(t, from_attributes=True) for t in p.tiers],
    )  # fmt: skip


@router.get(
    "/stats/history",
    response_model=HistoryOut,
    summary="Node-wide rates over the last hour, sampled (read scope, all namespaces)",
)
def history(ctx: Ctx, _: NodeReader) -> HistoryOut:
    return HistoryOut(
        interval_s=ctx.settings.server.stats_interval_s, points=[_point_out(p) for p in ctx.history.points()]
    )


@router.get(
    "/errors",
    response_model=list[ErrorEntryOut],
    summary="Recent errors, newest last (read scope, all namespaces)",
)
def errors(ctx: Ctx, _: NodeReader) -> list[ErrorEntryOut]:
    return [ErrorEntryOut(time=e.time, kind=e.kind, message=e.message) for e in ctx.errors.entries()]


@router.get(
    "/config", response_model=ConfigOut, summary="Effective configuration, secrets masked (admin, all namespaces)"
)
def config(ctx: Ctx, _: Annotated[Principal, Depends(require("admin", node_wide=True))]) -> ConfigOut:
    shown = ctx.settings.masked()
    # The disk tier's size as the store runs it: an unset disk_bytes means a default, 0 means no disk tier.
    shown.setdefault("store", {})["disk_bytes"] = ctx.store.config.disk_capacity or 0
    return ConfigOut(config=shown)
