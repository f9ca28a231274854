"""HTTP endpoints of the index and router: a FastAPI ``APIRouter`` the admin app mounts.

    POST   /v1/route                  pick an engine for tokens or a hash chain
    POST   /v1/index/match            per-source leading matches of a chain
    GET    /v1/index/stats            locations, block counts, engines, feeds
    PUT    /v1/engines/{engine}/load  register an engine / report its load
    DELETE /v1/engines/{engine}       the engine is gone: drop it and everything it held

Handlers are ``async def`` on purpose: they run on the event loop that owns the index (a plain ``def`` would run in
a worker thread, next to the subscribers applying events).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field, field_validator

from kvfabric.errors import UnknownModelError
from kvfabric.hashing import MAX_TOKEN_ID
from kvfabric.ids import HASH_BYTES, ModelFingerprint, Namespace, PrefixHash
from kvfabric.index.router import EngineLoad
from kvfabric.index.service import IndexService, NoEnginesError

HexHash = Annotated[str, Field(pattern=f"^[0-9a-fA-F]{{{2 * HASH_BYTES}}}$")]


class EngineLoadBody(BaseModel):
    pending_prefill_tokens: int = Field(0, ge=0)
    active_decode_blocks: int = Field(0, ge=0)
    prefill_tokens_per_s: float | None = Field(None, gt=0)


class EngineBody(EngineLoadBody):
    engine: str = Field(min_length=1)


class ChainBody(BaseModel):
    model: HexHash
    """Model fingerprint, hex."""
    namespace: str = Field("default", min_length=1, max_length=255)
    tokens: list[int] | None = None
    hashes: list[HexHash] | None = None
    block_size: int | None = Field(None, gt=0)

    @field_validator("tokens")
    @classmethod
    def _token_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 or t > MAX_TOKEN_ID for t in v):
            raise ValueError("token ids must be in [0, 2**32)")
        return v


class RouteBody(ChainBody):
    num_tokens: int | None = Field(None, ge=0)
    policy: str = "kvfabric"
    engines: list[EngineBody] | None = None
    """Loads for this decision only; by default the reported loads of the registered engines."""


def _chain(body: ChainBody) -> tuple[Namespace, ModelFingerprint, list[PrefixHash] | None]:
    if (body.tokens is None) == (body.hashes is None):
        raise HTTPException(422, "give exactly one of 'tokens' or 'hashes'")
    model = ModelFingerprint(bytes.fromhex(body.model))
    ns = Namespace(body.namespace)
    hashes = None if body.hashes is None else [PrefixHash(bytes.fromhex(h)) for h in body.hashes]
    return ns, model, hashes


def create_index_router(service: IndexService) -> APIRouter:
    router = APIRouter(tags=["index"])

    @router.post("/v1/route")
    async def route(body: RouteBody) -> dict[str, object]:
        ns, model, hashes = _chain(body)
        engines = None
        if body.engines is not None:
            engines = [EngineLoad(e.engine, e.pending_prefill_tokens, e.active_decode_blocks, e.prefill_tokens_per_s)
                       for e in body.engines]  # fmt: skip
        try:
            d = service.route(ns, model, tokens=body.tokens, hashes=hashes, num_tokens=body.num_tokens,
                              block_size=body.block_size, policy=body.policy, engines=engines)  # fmt: skip
        except UnknownModelError as exc:
            raise HTTPException(404, str(exc)) from exc
        except NoEnginesError as exc:
            raise HTTPException(409, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {
            "engine": d.engine,
            "policy": d.policy,
            "local_blocks": d.local_blocks,
            "fabric_blocks": d.fabric_blocks,
            "fabric_tiers": dict(d.fabric_tiers),
            "prefill_tokens": d.prefill_tokens,
            "predicted_ttft_s": d.predicted_ttft_s,
        }

    @router.post("/v1/index/match")
    async def match(body: ChainBody) -> dict[str, object]:
        ns, model, hashes = _chain(body)
        try:
            chain = hashes if hashes is not None else service.chain_for(ns, model, body.tokens or [])
        except UnknownModelError as exc:
            raise HTTPException(404, str(exc)) from exc
        matches = service.index.match(ns, model, chain)
        return {
            "blocks": len(chain),
            "matches": [{"source": m.source, "blocks": m.blocks, "media": dict(m.media)} for m in matches],
        }

    @router.get("/v1/index/stats")
    async def stats() -> dict[str, object]:
        return service.stats()

    @router.put("/v1/engines/{engine}/load")
    async def report_load(engine: str, body: EngineLoadBody) -> dict[str, object]:
        service.report_load(
            EngineLoad(engine, body.pending_prefill_tokens, body.active_decode_blocks, body.prefill_tokens_per_s)
        )
        return {"engine": engine, "registered": True}

    @router.delete("/v1/engines/{engine}")
    async def remove_engine(engine: str) -> dict[str, object]:
        known = any(e.engine == engine for e in service.engines()) or engine in service.index.sources()
        if not known:
            raise HTTPException(404, f"unknown engine {engine!r}")
        return {"engine": engine, "blocks_dropped": service.remove_engine(engine)}

    return router
