"""Bearer-token authentication and scope checks for the admin API.

Scopes nest: ``admin`` implies ``write`` implies ``read``. A token also names the namespaces it may touch; node-wide
views (``/metrics``, tier stats over all namespaces) need a token for all namespaces (``"*"``). With auth disabled
every request is the anonymous operator: every scope, every namespace.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvfabric.config import AuthSettings

Scope = Literal["read", "write", "admin"]
_RANK: dict[str, int] = {"read": 1, "write": 2, "admin": 3}
ALL_NAMESPACES = "*"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling and what they may do."""

    tenant: str
    scope_rank: int
    namespaces: frozenset[str]

    @property
    def all_namespaces(self) -> bool:
        return ALL_NAMESPACES in self.namespaces

    def has(self, scope: Scope) -> bool:
        return self.scope_rank >= _RANK[scope]

    def may_access(self, namespace: str) -> bool:
        return self.all_namespaces or namespace in self.namespaces

    def visible(self, namespaces: list[str]) -> list[str]:
        return [ns for ns in namespaces if self.may_access(ns)]


OPERATOR = Principal("anonymous", _RANK["admin"], frozenset({ALL_NAMESPACES}))
"""The identity of every request when auth is disabled."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps bearer tokens to principals. Tokens are compared by SHA-256 digest with ``hmac.compare_digest`` over
    every configured token, so the time taken does not depend on which token (or how much of one) matched."""

    def __init__(self, settings: AuthSettings) -> None:
        self.enabled = settings.enabled
        self._tokens = [
            (
                _digest(t.token.get_secret_value()),
                Principal(t.tenant, max(_RANK[s] for s in t.scopes), frozenset(t.allowed_namespaces)),
            )
            for t in settings.tokens
        ]

    def principal(self, authorization: str | None) -> Principal:
        """The caller behind an ``Authorization`` header; raises 401 when it is missing or unknown."""
        if not self.enabled:
            return OPERATOR
        if not authorization:
            raise _unauthorized("missing bearer token (send 'Authorization: Bearer <token>')")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        digest = _digest(token)
        found: Principal | None = None
        for known, principal in self._tokens:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise _unauthorized("invalid bearer token")
        return found


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def forbidden(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)


_bearer = HTTPBearer(auto_error=False, description="A token from server.auth.tokens; scopes read < write < admin.")
"""Declares the bearer scheme in the OpenAPI spec; the check itself is :meth:`Authenticator.principal`."""


class require:
    """FastAPI dependency: the caller, who must hold ``scope`` (and all namespaces when ``node_wide``)."""

    def __init__(self, scope: Scope, *, node_wide: bool = False) -> None:
        self.scope = scope
        self.node_wide = node_wide

    def __call__(
        self, request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        auth: Authenticator = request.app.state.kvfabric.auth
        principal = auth.principal(request.headers.get("authorization"))
        if not principal.has(self.scope):
            raise forbidden(f"this token lacks the '{self.scope}' scope")
        if self.node_wide and not principal.all_namespaces:
            raise forbidden("this view spans every namespace: it needs a token for all namespaces ('*')")
        return principal


def check_namespace(principal: Principal, namespace: str) -> None:
    """403 unless the caller may touch ``namespace``."""
    if not principal.may_access(namespace):
        raise forbidden(f"this token may not access namespace '{namespace}'")
