"""Blocks of one model in one namespace: listing, metadata and location, delete (one block, or a prefix with every
block extending it), pin and unpin; and the pins a token may see."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query

from kvfabric.api.auth import Principal, check_namespace, require
from kvfabric.api.context import AdminContext, get_context
from kvfabric.api.params import HEX64, FingerprintParam, NamespaceParam, PrefixParam, block_key, namespace_of
from kvfabric.api.schemas import BlockOut, BlockPage, Deleted, ErrorBody, Pinned, PinOut
from kvfabric.ids import BlockKey, ModelFingerprint, Namespace, PrefixHash
from kvfabric.record import BlockMeta

MODEL = "/v1/namespaces/{namespace}/models/{fingerprint}"
router = APIRouter(tags=["blocks"], responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}})
Ctx = Annotated[AdminContext, Depends(get_context)]
Reader = Annotated[Principal, Depends(require("read"))]
Writer = Annotated[Principal, Depends(require("write"))]


def _key(principal: Principal, namespace: str, fingerprint: str, prefix: str) -> BlockKey:
    check_namespace(principal, namespace_of(namespace))
    return block_key(namespace, fingerprint, prefix)


def _block_out(key: BlockKey, meta: BlockMeta, tier: str, pinned: bool) -> BlockOut:
    return BlockOut(
        namespace=key.namespace, fingerprint=key.model.hex(), prefix=key.prefix.hex(), parent=meta.parent.hex(),
        dtype=meta.dtype.name.lower(), shape=list(meta.shape), token_count=meta.token_count, nbytes=meta.nbytes,
        created_ms=meta.created_ms, tier=tier, pinned=pinned,
    )  # fmt: skip


def _model_keys(ctx: AdminContext, namespace: Namespace, fingerprint: str) -> list[BlockKey]:
    model = ModelFingerprint(bytes.fromhex(fingerprint))
    return [k for k in ctx.store.keys(namespace) if k.model == model]


@router.get(
    MODEL + "/blocks", response_model=BlockPage, summary="A model's blocks in a namespace, by prefix hash, paged"
)
def list_blocks(
    namespace: NamespaceParam, fingerprint: FingerprintParam, ctx: Ctx, principal: Reader,
    after: Annotated[str | None, Query(pattern=HEX64, description="continue after this prefix hash")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> BlockPage:  # fmt: skip
    ns = namespace_of(namespace)
    check_namespace(principal, ns)
    keys = sorted(_model_keys(ctx, ns, fingerprint), key=lambda k: k.prefix)
    if after is not None:
        start = bytes.fromhex(after)
        keys = [k for k in keys if k.prefix > start]
    pinned = ctx.store.pinned()
    page: list[BlockOut] = []
    for key in keys:
        if len(page) == limit:
            break
        found = ctx.store.head(key)
        if found is not None:  # deleted meanwhile
            page.append(_block_out(key, found[0], str(found[1]), key in pinned))
    more = len(page) == limit and keys[-1].prefix.hex() != page[-1].prefix  # keys past the last one returned
    return BlockPage(blocks=page, next=page[-1].prefix if more else None)


@router.get(
    MODEL + "/blocks/{prefix}",
    response_model=BlockOut,
    responses={404: {"model": ErrorBody}},
    summary="A block's metadata and tier",
)
def get_block(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx, principal: Reader
) -> BlockOut:
    key = _key(principal, namespace, fingerprint, prefix)
    found = ctx.store.head(key)
    if found is None:
        raise HTTPException(404, f"no block {key}")
    return _block_out(key, found[0], str(found[1]), key in ctx.store.pinned())


@router.delete(MODEL + "/blocks/{prefix}", response_model=Deleted, summary="Delete a block from every tier")
def delete_block(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx, principal: Writer
) -> Deleted:
    return Deleted(deleted=int(ctx.store.delete(_key(principal, namespace, fingerprint, prefix))))


@router.delete(
    MODEL + "/prefixes/{prefix}",
    response_model=Deleted,
    summary="Delete a prefix: the block with this hash and every block whose chain extends it",
)
def delete_prefix(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx, principal: Writer
) -> Deleted:
    root = _key(principal, namespace, fingerprint, prefix)
    children: dict[PrefixHash, list[BlockKey]] = defaultdict(list)
    for key in _model_keys(ctx, root.namespace, fingerprint):
        found = ctx.store.head(key)
        if found is not None:
            children[found[0].parent].append(key)
    doomed, todo = [], [root]
    while todo:  # the subtree under root, through parent links (blocks of a chain may be missing: it stops there)
        key = todo.pop()
        doomed.append(key)
        todo.extend(children.get(key.prefix, ()))
    return Deleted(deleted=ctx.store.delete_many(doomed))


@router.put(
    MODEL + "/blocks/{prefix}/pin", response_model=Pinned, responses={404: {"model": ErrorBody}}, summary="Pin a block"
)
def pin(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx, principal: Writer
) -> Pinned:
    key = _key(principal, namespace, fingerprint, prefix)
    if ctx.store.head(key) is None:
        raise HTTPException(404, f"no block {key}")
    ctx.store.pin(key)
    return Pinned(pinned=True)


@router.delete(
    MODEL + "/blocks/{prefix}/pin", response_model=Pinned, summary="Unpin a block (no-op when it is not pinned)"
)
def unpin(
    namespace: NamespaceParam, fingerprint: FingerprintParam, prefix: PrefixParam, ctx: Ctx, principal: Writer
) -> Pinned:
    ctx.store.unpin(_key(principal, namespace, fingerprint, prefix))
    return Pinned(pinned=False)


@router.get("/v1/pins", response_model=list[PinOut], summary="Pinned blocks in the token's namespaces")
def pins(ctx: Ctx, principal: Reader) -> list[PinOut]:
    out = []
    for key in sorted(ctx.store.pinned(), key=BlockKey.to_bytes):
        if principal.may_access(key.namespace):
            out.append(
                PinOut(
                    namespace=key.namespace, fingerprint=key.model.hex(), prefix=key.prefix.hex(),
                    stored=ctx.store.head(key) is not None,
                )
            )  # fmt: skip
    return out
