"""HTTP endpoints of the index and router: a FastAPI ``APIRouter`` the admin app mounts.

    POST   /v1/route                  pick an engine for tokens or a hash chain        (query access)
    POST   /v1/index/match            per-source leading matches of a chain            (query access)
    GET    /v1/index/stats            locations, block counts, engines, feeds          (stats access)
    PUT    /v1/engines/{engine}/load  register an engine / report its load             (report access)
    DELETE /v1/engines/{engine}       the engine is gone: drop it and everything it held (remove access)

Who may call what is an :class:`IndexAccess`: four FastAPI dependencies, each returning the caller. The admin app
passes ones built on its bearer tokens and scopes (``kvfabric.api.routes_index``); without one every request is
allowed (a router on a trusted network, tests). A chain's namespace must be one the caller may access (403), and
token ids are hashed under that namespace's tenant salt, which the service derives; a client never supplies it.

Handlers are ``async def`` on purpose: they run on the event loop that owns the index (a plain ``def`` would run in
a worker thread, next to the subscribers applying events).
"""

# No ``from __future__ import annotations``: FastAPI must evaluate the handlers' ``Depends(access.*)`` annotations,
# which name a local of create_index_router.
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Path, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvfabric.errors import UnknownModelError
from kvfabric.hashing import MAX_TOKEN_ID
from kvfabric.ids import HASH_BYTES, MAX_NAMESPACE_BYTES, ModelFingerprint, Namespace, PrefixHash
from kvfabric.index.router import EngineLoad
from kvfabric.index.service import ROUTE_POLICIES, IndexService, NoEnginesError

HexHash = Annotated[str, Field(pattern=f"^[0-9a-fA-F]{{{2 * HASH_BYTES}}}$")]
MAX_COUNT = 1 << 48
"""Bound on token and block counts in bodies: far above any real load, and exact as a float."""


class Caller(Protocol):
    """Whoever an :class:`IndexAccess` dependency let in."""

    def may_access(self, namespace: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class IndexAccess:
    """FastAPI dependencies authorising each kind of index request; each returns the :class:`Caller` (or raises
    401/403 itself)."""

    query: Callable[..., Caller]
    """Route and match (then the chain's namespace must pass ``caller.may_access``)."""
    stats: Callable[..., Caller]
    """Index statistics: every namespace's block counts and every engine."""
    report: Callable[..., Caller]
    """Engines registering and reporting their load (affects every tenant's routing)."""
    remove: Callable[..., Caller]
    """Dropping an engine and everything it held."""


class _Anyone:
    def may_access(self, namespace: str) -> bool:
        return True


def _anyone() -> Caller:
    return _Anyone()


OPEN = IndexAccess(query=_anyone, stats=_anyone, report=_anyone, remove=_anyone)
"""No authentication: every request is allowed."""


# --- bodies ------------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    """Request bodies: no unknown fields, no coercion (``false`` is not 0, ``"12"`` is not 12)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EngineLoadBody(_Body):
    pending_prefill_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    active_decode_blocks: int = Field(0, ge=0, le=MAX_COUNT)
    prefill_tokens_per_s: float | None = Field(None, ge=1.0, le=1e12)
    """This engine's measured prefill rate; unset: the node's calibration."""


class EngineBody(EngineLoadBody):
    engine: str = Field(min_length=1, max_length=255)


class ChainBody(_Body):
    model: HexHash
    """Model fingerprint, hex."""
    namespace: str = Field("default", min_length=1, max_length=MAX_NAMESPACE_BYTES)
    """The tenant key space (the data plane's tenant name); the caller must be allowed in it."""
    tokens: list[int] | None = None
    hashes: list[HexHash] | None = None
    block_size: int | None = Field(None, gt=0, le=MAX_COUNT)

    @field_validator("tokens")
    @classmethod
    def _token_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (min(v, default=0) < 0 or max(v, default=0) > MAX_TOKEN_ID):
            raise ValueError("token ids must be in [0, 2**32)")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace_bytes(cls, v: str) -> str:
        if len(v.encode()) > MAX_NAMESPACE_BYTES:
            raise ValueError(f"namespace must be at most {MAX_NAMESPACE_BYTES} UTF-8 bytes")
        return v

    @model_validator(mode="after")
    def _one_chain(self) -> "ChainBody":
        if (self.tokens is None) == (self.hashes is None):
            raise ValueError("give exactly one of 'tokens' or 'hashes'")
        return self


class RouteBody(ChainBody):
    num_tokens: int | None = Field(None, ge=0, le=MAX_COUNT)
    policy: str = "kvfabric"
    engines: list[EngineBody] | None = None
    """Loads for this decision only; by default the reported loads of the registered engines."""

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in ROUTE_POLICIES:
            raise ValueError(f"unknown routing policy {v!r}; known: {', '.join(ROUTE_POLICIES)}")
        return v

    @field_validator("engines")
    @classmethod
    def _distinct_engines(cls, v: list[EngineBody] | None) -> list[EngineBody] | None:
        names = [e.engine for e in v or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"engine {next(n for n in names if names.count(n) > 1)!r} is listed twice")
        return v


# --- answers -----------------------------------------------------------------------------------------------------
class Problem(BaseModel):
    detail: str


class RouteOut(BaseModel):
    engine: str
    policy: str
    local_blocks: int
    """Leading blocks the engine already holds."""
    fabric_blocks: int
    """Blocks after those that it would load from the fabric."""
    fabric_tiers: dict[str, int]
    """Blocks to load per fabric medium."""
    prefill_tokens: int
    predicted_ttft_s: float


class SourceMatchOut(BaseModel):
    source: str
    blocks: int
    media: dict[str, int]


class MatchOut(BaseModel):
    blocks: int
    """Blocks in the chain."""
    matches: list[SourceMatchOut]


class LocationOut(BaseModel):
    source: str
    medium: str
    blocks: int


class EngineOut(BaseModel):
    engine: str
    pending_prefill_tokens: int
    active_decode_blocks: int


class FeedOut(BaseModel):
    endpoint: str
    batches: int
    gaps: int
    errors: int


class LocalFeedOut(BaseModel):
    published: int
    applied: int
    dropped: int
    errors: int
    pending: int


class IndexStatsOut(BaseModel):
    scopes: int
    blocks: int
    retired_bits: int
    events_applied: int
    locations: list[LocationOut]
    engines: list[EngineOut]
    feeds: list[FeedOut]
    local_feeds: list[LocalFeedOut]


class EngineRegistered(BaseModel):
    engine: str
    registered: bool


class EngineRemoved(BaseModel):
    engine: str
    blocks_dropped: int


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers (400: a body that is not JSON)."""
    return {code: {"model": Problem} for code in codes}


def _invalid(field: str, message: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own (a list of errors naming the field)."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


def _chain(body: ChainBody, caller: Caller) -> tuple[Namespace, ModelFingerprint, list[PrefixHash] | None]:
    if not caller.may_access(body.namespace):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this token may not access namespace '{body.namespace}'")
    hashes = None if body.hashes is None else [PrefixHash(bytes.fromhex(h)) for h in body.hashes]
    return Namespace(body.namespace), ModelFingerprint(bytes.fromhex(body.model)), hashes


EngineName = Annotated[str, Path(min_length=1, max_length=255, description="engine name (routing target)")]


def create_index_router(service: IndexService, access: IndexAccess = OPEN) -> APIRouter:
    router = APIRouter(tags=["index"], responses=_problems(401, 403))

    @router.post("/v1/route", response_model=RouteOut, responses=_problems(400, 404, 409),
                 summary="Pick the engine with the least predicted time to first token for a prompt")  # fmt: skip
    async def route(body: RouteBody, caller: Annotated[Caller, Depends(access.query)]) -> RouteOut:
        ns, model, hashes = _chain(body, caller)
        engines = None
        if body.engines is not None:
            engines = [EngineLoad(e.engine, e.pending_prefill_tokens, e.active_decode_blocks, e.prefill_tokens_per_s)
                       for e in body.engines]  # fmt: skip
        try:
            d = service.route(ns, model, tokens=body.tokens, hashes=hashes, num_tokens=body.num_tokens,
                              block_size=body.block_size, policy=body.policy, engines=engines)  # fmt: skip
        except UnknownModelError as exc:
            raise HTTPException(404, f"unknown model {exc}") from exc
        except NoEnginesError as exc:
            raise HTTPException(409, str(exc)) from exc
        except ValueError as exc:
            raise _invalid("num_tokens", str(exc)) from exc  # the chain is longer than num_tokens
        return RouteOut(engine=d.engine, policy=d.policy, local_blocks=d.local_blocks, fabric_blocks=d.fabric_blocks,
                        fabric_tiers=dict(d.fabric_tiers), prefill_tokens=d.prefill_tokens,
                        predicted_ttft_s=d.predicted_ttft_s)  # fmt: skip

    @router.post("/v1/index/match", response_model=MatchOut, responses=_problems(400, 404),
                 summary="How many leading blocks of a chain each source holds, overall and per medium")  # fmt: skip
    async def match(body: ChainBody, caller: Annotated[Caller, Depends(access.query)]) -> MatchOut:
        ns, model, hashes = _chain(body, caller)
        try:
            chain = hashes if hashes is not None else service.chain_for(ns, model, body.tokens or [])
        except UnknownModelError as exc:
            raise HTTPException(404, f"unknown model {exc}") from exc
        matches = service.index.match(ns, model, chain)
        return MatchOut(blocks=len(chain), matches=[SourceMatchOut(source=m.source, blocks=m.blocks,
                                                                   media=dict(m.media)) for m in matches])  # fmt: skip

    @router.get("/v1/index/stats", response_model=IndexStatsOut, summary="Index size, locations, engines and feeds")
    async def stats(_: Annotated[Caller, Depends(access.stats)]) -> dict[str, object]:
        return service.stats()

    @router.put("/v1/engines/{engine}/load", response_model=EngineRegistered, responses=_problems(400),
                summary="Register an engine or report its load")  # fmt: skip
    async def report_load(
        engine: EngineName, body: EngineLoadBody, _: Annotated[Caller, Depends(access.report)]
    ) -> EngineRegistered:
        service.report_load(
            EngineLoad(engine, body.pending_prefill_tokens, body.active_decode_blocks, body.prefill_tokens_per_s)
        )
        return EngineRegistered(engine=engine, registered=True)

    @router.delete("/v1/engines/{engine}", response_model=EngineRemoved, responses=_problems(404),
                   summary="The engine is gone: forget it and every block it held")  # fmt: skip
    async def remove_engine(engine: EngineName, _: Annotated[Caller, Depends(access.remove)]) -> EngineRemoved:
        known = any(e.engine == engine for e in service.engines()) or engine in service.index.sources()
        if not known:
            raise HTTPException(404, f"unknown engine {engine!r}")
        return EngineRemoved(engine=engine, blocks_dropped=service.remove_engine(engine))

    return router
