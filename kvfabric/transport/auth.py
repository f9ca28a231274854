"""Bearer tokens -> tenants, each tenant's hash salt, and what each token may do.

The server never trusts a tenant name or salt from the client: the token names the tenant, the tenant's salt is
derived from the server secret (:func:`kvfabric.hashing.tenant_salt`), and every key a connection names is placed
in that tenant's namespace. With no tokens configured, authentication is off and every client is ``default``.

Scopes are the admin API's (``kvfabric.api.auth``): ``read`` < ``write`` < ``admin``, and a token only acts in the
namespaces it names (by default its tenant's). On the data plane a connection's namespace is its tenant, so a token
whose namespaces leave out its own tenant cannot say HELLO.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from kvfabric.errors import AuthError, ConfigError, ScopeError
from kvfabric.hashing import tenant_salt
from kvfabric.ids import Namespace

DEFAULT_TENANT = Namespace("default")

Scope = Literal["read", "write", "admin"]
SCOPE_RANK: Final[dict[str, int]] = {"read": 1, "write": 2, "admin": 3}
ALL_NAMESPACES: Final = "*"


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What one bearer token may do: its tenant, its highest scope, the namespaces it may touch (``None``: only the
    tenant's own; ``"*"``: all)."""

    tenant: str
    scope: Scope = "admin"
    namespaces: frozenset[str] | None = None

    @classmethod
    def of(cls, tenant: str, scopes: Collection[str], namespaces: Collection[str] | None = None) -> TokenGrant:
        """From a config token's scopes (the highest counts) and namespaces."""
        unknown = set(scopes) - set(SCOPE_RANK)
        if not scopes or unknown:
            raise ConfigError(f"token for tenant {tenant!r} has unknown or no scopes: {sorted(unknown)}")
        top = max(scopes, key=SCOPE_RANK.__getitem__)
        return cls(tenant, top, frozenset(namespaces) if namespaces is not None else None)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Tenant:
    name: Namespace
    salt: bytes
    scope: Scope = "admin"
    node_wide: bool = False
    """The token covers every namespace (``"*"``), or auth is off: it may see node-wide counters (STATS)."""

    def has(self, scope: Scope) -> bool:
        return SCOPE_RANK[self.scope] >= SCOPE_RANK[scope]


class Authenticator:
    """Maps a bearer token to its tenant and scope; tokens are compared by digest in constant time.

    ``tokens`` maps each token to a tenant name (every scope in that tenant: ``kvfabric serve --token``) or to a
    :class:`TokenGrant` (``server.auth.tokens`` of the config)."""

    def __init__(self, server_secret: bytes, tokens: Mapping[str, str | TokenGrant] | None = None) -> None:
        if not server_secret:
            raise ConfigError("server secret must be non-empty")
        self._secret = server_secret
        self._by_digest: dict[bytes, TokenGrant] = {}
        for token, grant in (tokens or {}).items():
            if isinstance(grant, str):
                grant = TokenGrant(grant)
            if not token or not grant.tenant:
                raise ConfigError("auth tokens and tenant names must be non-empty")
            self._by_digest[_digest(token)] = grant

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, token: str | None) -> Tenant:
        """The tenant ``token`` belongs to; raises AuthError for a missing or unknown token when auth is on."""
        if not self.enabled:
            return self.tenant(DEFAULT_TENANT, node_wide=True)
        if not token:
            raise AuthError("this server requires a bearer token")
        digest = _digest(token)
        found: TokenGrant | None = None
        for known, grant in self._by_digest.items():  # every entry compared: the time does not tell which matched
            if hmac.compare_digest(known, digest):
                found = grant
        if found is None:
            raise AuthError("invalid bearer token")
        namespaces = found.namespaces
        if namespaces is not None and ALL_NAMESPACES not in namespaces and found.tenant not in namespaces:
            raise ScopeError(
                f"this token's namespaces {sorted(namespaces)} leave out its tenant {found.tenant!r}, the only "
                "namespace a data-plane connection acts in"
            )
        node_wide = namespaces is not None and ALL_NAMESPACES in namespaces
        return self.tenant(Namespace(found.tenant), found.scope, node_wide=node_wide)

    def tenant(self, name: Namespace, scope: Scope = "admin", *, node_wide: bool = False) -> Tenant:
        return Tenant(name, tenant_salt(self._secret, name), scope, node_wide)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
