"""Serving the admin app with uvicorn on the caller's event loop (``kvfabric serve`` runs it beside the data plane).

admin = AdminServer(create_app(store, settings, metrics=metrics), host, settings.server.admin_port)
await admin.start()          # bound; admin.port is the real port (useful with port 0)
...
await admin.close()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process (the data-plane server owns SIGINT and
    SIGTERM and shuts the admin app down itself)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    """The admin app on ``host:port``, as a task on the running event loop."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 9501, *, log_level: str = "warning") -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and start serving; returns once the port is open (raises if uvicorn could not start)."""
        if self._task is not None:
            raise RuntimeError("the admin server is already started")
        self._task = asyncio.create_task(self._serve(), name="kvfabric-admin")
        while not self._server.started:
            if self._task.done():
                task, self._task = self._task, None
                await task  # raises the startup error
            await asyncio.sleep(0.01)

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as exc:  # uvicorn exits the process when it cannot bind; here that is just an error
            where = f"{self._server.config.host}:{self._server.config.port}"
            raise OSError(f"the admin server could not start on {where} (see the log for why)") from exc
        if not self._server.started:
            raise OSError("the admin server stopped before it started")

    @property
    def port(self) -> int:
        """The bound port (the real one when started on port 0)."""
        if not self._server.started:
            raise RuntimeError("the admin server is not started")
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, finish in-flight requests, run the app's shutdown. Idempotent."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
