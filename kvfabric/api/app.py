"""The admin app: REST API, ``/metrics`` and the ops dashboard of one node, served on its own port.

``kvfabric serve`` builds the store, then runs this app with uvicorn on ``--admin-port`` in the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

import kvfabric
from kvfabric.api import routes_blocks, routes_health, routes_namespaces, routes_ops, routes_stats
from kvfabric.api.auth import Authenticator
from kvfabric.api.context import AdminContext
from kvfabric.api.guard import RequestGuard
from kvfabric.api.history import ErrorLog, StatsHistory
from kvfabric.api.metrics import Metrics
from kvfabric.api.params import reject_unknown_query
from kvfabric.config import Settings
from kvfabric.errors import ConfigError, InvalidBlockError, KVFabricError, TierUnavailableError
from kvfabric.store.tiered import TieredStore

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"


def create_app(
    store: TieredStore,
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    extra_routers: Iterable[APIRouter] = (),
    max_body_bytes: int | None = None,
) -> FastAPI:
    """The admin app over ``store``. Pass ``metrics`` to share collectors with the transport server (which records
    get/put latencies into it); ``extra_routers`` are mounted as they are (e.g. the index's router endpoint).
    A request body from an unknown token, or over ``max_body_bytes`` (default: ``server.admin_max_body_bytes``),
    is refused before it is read."""
    metrics = metrics if metrics is not None else Metrics()
    ctx = AdminContext(
        store=store,
        settings=settings,
        metrics=metrics,
        auth=Authenticator(settings.server.auth),
        history=StatsHistory(settings.server.stats_history),
        errors=ErrorLog(),
    )
    metrics.attach_store(ctx.snapshot)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_sample_forever(ctx))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="kvfabric admin API",
        version=kvfabric.__version__,
        description="Health, statistics, namespaces, models, blocks, pins, policies and maintenance of one "
        "kvfabric node. Send `Authorization: Bearer <token>`; scopes: read < write < admin.",
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.kvfabric = ctx

    for module in (routes_health, routes_stats, routes_namespaces, routes_blocks, routes_ops):
        app.include_router(module.router)
    for router in extra_routers:
        app.include_router(router)

    # Added before count_requests, so it sits inside it: refusals are counted too.
    app.add_middleware(
        RequestGuard, auth=ctx.auth, max_body_bytes=max_body_bytes or settings.server.admin_max_body_bytes
    )

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        metrics.admin_requests.labels(request.method, _route_path(request), str(response.status_code)).inc()
        return response

    @app.exception_handler(KVFabricError)
    async def store_error(request: Request, exc: KVFabricError) -> JSONResponse:
        code = _status_of(exc)
        if code >= 500:
            ctx.errors.record(type(exc).__name__, f"{request.method} {request.url.path}: {exc}")
            metrics.errors.labels(type(exc).__name__).inc()
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still re-raises after this response, so the server logs the traceback as well.
        ctx.errors.record(type(exc).__name__, f"{request.method} {request.url.path}: {exc}")
        metrics.errors.labels(type(exc).__name__).inc()
        metrics.admin_requests.labels(request.method, _route_path(request), "500").inc()
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        return FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
    return app


def _route_path(request: Request) -> str:
    """The route's template (``/v1/namespaces/{namespace}``), never the raw path: bounded label values."""
    return str(getattr(request.scope.get("route"), "path", "unmatched"))


def _status_of(exc: KVFabricError) -> int:
    if isinstance(exc, (InvalidBlockError, ConfigError)):
        return 400
    if isinstance(exc, TierUnavailableError):
        return 503
    return 500


async def _sample_forever(ctx: AdminContext) -> None:
    interval = ctx.settings.server.stats_interval_s
    while True:
        try:
            await asyncio.to_thread(ctx.sample)
        except Exception as exc:  # the sampler must outlive any one failing read of the store
            log.exception("stats sampling failed")
            ctx.errors.record("stats", f"sampling the store failed: {exc}")
        await asyncio.sleep(interval)
