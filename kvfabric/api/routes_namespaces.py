"""Namespaces and models: what each holds, deleting them, and a namespace's TTL and quota."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from kvfabric.api.auth import Principal, check_namespace, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.params import FingerprintParam, NamespaceParam, fingerprint_of, namespace_of
from kvfabric.api.routes_stats import namespace_out, policy_out
from kvfabric.api.schemas import Deleted, ErrorBody, ModelOut, NamespaceOut, NamespacePolicyOut, PolicyIn
from kvfabric.store.config import NamespacePolicy

router = APIRouter(prefix="/v1", tags=["namespaces"], responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}})
Ctx = Annotated[AdminContext, Depends(get_context)]
Reader = Annotated[Principal, Depends(require("read"))]
Writer = Annotated[Principal, Depends(require("write"))]
Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/namespaces", response_model=list[NamespaceOut], summary="Namespaces this token may see")
def list_namespaces(ctx: Ctx, principal: Reader) -> list[NamespaceOut]:
    snap = ctx.snapshot()
    return [namespace_out(ctx, ns) for ns in snap.namespaces if principal.may_access(ns.namespace)]


@router.get(
    "/namespaces/{namespace}",
    response_model=NamespaceOut,
    responses={404: {"model": ErrorBody}},
    summary="One namespace: blocks, bytes, policy, models",
)
def get_namespace(namespace: NamespaceParam, ctx: Ctx, principal: Reader) -> NamespaceOut:
    ns = namespace_of(namespace)
    check_namespace(principal, ns)
    usage = next((u for u in ctx.snapshot().namespaces if u.namespace == ns), None)
    if usage is None:
        raise HTTPException(404, f"namespace '{ns}' holds no blocks")
    return namespace_out(ctx, usage)


@router.delete("/namespaces/{namespace}", response_model=Deleted, summary="Delete every block of a namespace")
def delete_namespace(namespace: NamespaceParam, ctx: Ctx, principal: Writer) -> Deleted:
    ns = namespace_of(namespace)
    check_namespace(principal, ns)
    return Deleted(deleted=ctx.store.delete_namespace(ns))


@router.put(
    "/namespaces/{namespace}/policy",
    response_model=NamespacePolicyOut,
    responses={400: {"model": ErrorBody, "description": "unparseable body"}},
    summary="Change a namespace's TTL and quota (admin); omitted fields keep their value, null removes a limit",
)
def set_policy(namespace: NamespaceParam, body: PolicyIn, ctx: Ctx, principal: Admin) -> NamespacePolicyOut:
    ns = namespace_of(namespace)
    check_namespace(principal, ns)
    current = policy_out(ctx, ns).model_dump()
    merged = {**current, **body.model_dump(include=body.model_fields_set)}
    ctx.store.set_namespace_policy(ns, NamespacePolicy(ttl_s=merged["ttl_s"], quota_bytes=merged["quota_bytes"]))
    return policy_out(ctx, ns)


@router.get("/models", response_model=list[ModelOut], summary="Registered models, with blocks held per model (a namespace-scoped token: those its namespaces hold)")
def list_models(ctx: Ctx, principal: Reader) -> list[ModelOut]:
    snap = ctx.snapshot()
    usage: dict[str, tuple[int, int]] = {}
    for ns in snap.namespaces:
        if principal.may_access(ns.namespace):
            for m in ns.models:
                blocks, nbytes = usage.get(m.fingerprint, (0, 0))
                usage[m.fingerprint] = (blocks + m.blocks, nbytes + m.bytes)
    out = []
    for spec in ctx.store.models():
        fp = spec.fingerprint().hex()
        if fp not in usage and not principal.all_namespaces:
            continue  # the registry is node-wide: a tenant sees only the models its namespaces hold blocks of
        blocks, nbytes = usage.get(fp, (0, 0))
        out.append(ModelOut(fingerprint=fp, spec=spec.to_dict(), blocks=blocks, bytes=nbytes))
    return out


@router.delete(
    "/namespaces/{namespace}/models/{fingerprint}",
    response_model=Deleted,
    summary="Delete a model's blocks in a namespace",
)
def delete_model(namespace: NamespaceParam, fingerprint: FingerprintParam, ctx: Ctx, principal: Writer) -> Deleted:
    ns = namespace_of(namespace)
    check_namespace(principal, ns)
    return Deleted(deleted=ctx.store.delete_model(ns, fingerprint_of(fingerprint)))
