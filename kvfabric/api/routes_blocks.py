"""Single blocks: metadata and location, delete, pin and unpin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from kvfabric.api.auth import Principal, check_namespace, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.params import FingerprintParam, NamespaceParam, PrefixParam, block_key, namespace_of
from kvfabric.api.schemas import BlockOut, Deleted, ErrorBody, Pinned
from kvfabric.ids import BlockKey

router = APIRouter(
    prefix="/v1/namespaces/{namespace}/models/{fingerprint}/blocks/{prefix}",
    tags=["blocks"],
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
)
Ctx = Annotated[AdminContext, Depends(get_context)]


def _key(principal: Principal, namespace: str, fingerprint: str, prefix: str) -> BlockKey:
    check_namespace(principal, namespace_of(namespace))
    return block_key(namespace, fingerprint, prefix)


@router.get("", response_model=BlockOut, responses={404: {"model": ErrorBody}}, summary="A block's metadata and tier")
def get_block(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx,
    principal: Annotated[Principal, Depends(require("read"))],
) -> BlockOut:  # fmt: skip
    key = _key(principal, namespace, fingerprint, prefix)
    found = ctx.store.head(key)
    if found is None:
        raise HTTPException(404, f"no block {key}")
    meta, tier = found
    return BlockOut(
        namespace=key.namespace, fingerprint=fingerprint.lower(), prefix=prefix.lower(), parent=meta.parent.hex(),
        dtype=meta.dtype.name.lower(), shape=list(meta.shape), token_count=meta.token_count, nbytes=meta.nbytes,
        created_ms=meta.created_ms, tier=str(tier), pinned=key in ctx.store.pinned(),
    )  # fmt: skip


@router.delete("", response_model=Deleted, summary="Delete a block from every tier")
def delete_block(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx,
    principal: Annotated[Principal, Depends(require("write"))],
) -> Deleted:  # fmt: skip
    return Deleted(deleted=int(ctx.store.delete(_key(principal, namespace, fingerprint, prefix))))


@router.put("/pin", response_model=Pinned, responses={404: {"model": ErrorBody}}, summary="Pin a block")
def pin(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx,
    principal: Annotated[Principal, Depends(require("write"))],
) -> Pinned:  # fmt: skip
    key = _key(principal, namespace, fingerprint, prefix)
    if ctx.store.head(key) is None:
        raise HTTPException(404, f"no block {key}")
    ctx.store.pin(key)
    return Pinned(pinned=True)


@router.delete("/pin", response_model=Pinned, summary="Unpin a block (no-op when it is not pinned)")
def unpin(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx,
    principal: Annotated[Principal, Depends(require("write"))],
) -> Pinned:  # fmt: skip
    ctx.store.unpin(_key(principal, namespace, fingerprint, prefix))
    return Pinned(pinned=False)
