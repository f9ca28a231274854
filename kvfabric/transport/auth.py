"""Bearer tokens -> tenants, and each tenant's hash salt.

The server never trusts a tenant name or salt from the client: the token names the tenant, the tenant's salt is
derived from the server secret (:func:`kvfabric.hashing.tenant_salt`), and every key a connection names is placed
in that tenant's namespace. With no tokens configured, authentication is off and every client is ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from kvfabric.errors import AuthError, ConfigError
from kvfabric.hashing import tenant_salt
from kvfabric.ids import Namespace

DEFAULT_TENANT = Namespace("default")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: Namespace
    salt: bytes


class Authenticator:
    """Maps a bearer token to its tenant; tokens are compared by digest in constant time."""

    def __init__(self, server_secret: bytes, tokens: Mapping[str, str] | None = None) -> None:
        if not server_secret:
            raise ConfigError("server secret must be non-empty")
        self._secret = server_secret
        self._by_digest: dict[bytes, Namespace] = {}
        for token, tenant in (tokens or {}).items():
            if not token or not tenant:
                raise ConfigError("auth tokens and tenant names must be non-empty")
            self._by_digest[_digest(token)] = Namespace(tenant)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, token: str | None) -> Tenant:
        """The tenant ``token`` belongs to; raises AuthError for a missing or unknown token when auth is on."""
        if not self.enabled:
            return self.tenant(DEFAULT_TENANT)
        if not token:
            raise AuthError("this server requires a bearer token")
        digest = _digest(token)
        for known, tenant in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return self.tenant(tenant)
        raise AuthError("invalid bearer token")

    def tenant(self, name: Namespace) -> Tenant:
        return Tenant(name, tenant_salt(self._secret, name))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
