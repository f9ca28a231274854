"""The admin app's front door: a request body is refused before a byte of it is read when the caller is unknown
or the body is too large.

FastAPI reads and parses a request's body before the route's dependencies (our bearer-token check) run, so
without this a 200 MB body from anyone is read in full only to be answered 401, on the event loop the data plane
shares. This ASGI middleware runs first: it checks the ``Authorization`` header against the known tokens (only that
the token exists; scopes stay with each route), refuses a declared ``Content-Length`` above the cap with 413, and
counts the bytes of a chunked body as they arrive, answering 413 at the first byte past the cap. Each refusal
closes the connection, so the rest of the body is never read.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException

from kvfabric.api.auth import Authenticator

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestGuard:
    """ASGI middleware: 401 before the body for an unknown token, 413 for a body over ``max_body_bytes``."""

    def __init__(self, app: ASGIApp, auth: Authenticator, max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.auth = auth
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        has_body = (declared is not None and declared.strip() != "0") or "transfer-encoding" in headers
        if not has_body:
            await self.app(scope, receive, send)
            return
        try:
            self.auth.principal(headers.get("authorization"))
        except HTTPException as exc:
            await _refuse(send, exc.status_code, str(exc.detail), {"WWW-Authenticate": "Bearer"})
            return
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _refuse(send, 400, f"Content-Length {declared!r} is not a number")
                return
            if length > self.max_body_bytes:
                await _refuse(send, 413, _too_large(self.max_body_bytes))
                return

        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            # Past the cap, answer 413 here and tell the app the client left: FastAPI turns an exception raised
            # while it reads the body into a 400, so the refusal must not depend on the app passing it through.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    if not started:
                        await _refuse(send, 413, _too_large(self.max_body_bytes))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 is the answer; what the app says after the "disconnect" goes nowhere
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


def _too_large(limit: int) -> str:
    return f"request body is larger than the admin API's limit of {limit} bytes"


async def _refuse(send: Send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
