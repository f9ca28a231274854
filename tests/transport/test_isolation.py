"""Tenants: B can neither read nor detect A's blocks; a request without a valid token is refused before any work."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest

from kvfabric.client import Client
from kvfabric.errors import AuthError
from kvfabric.hashing import root_hash
from kvfabric.store.tiered import TieredStore
from kvfabric.transport import frames as fr
from kvfabric.transport.auth import TokenGrant
from tests.blocks import SPEC
from tests.transport.servers import ThreadServer, thread_server

TOKENS = {"token-a": "tenant-a", "token-b": "tenant-b"}


@pytest.fixture
def secured(store: TieredStore) -> Iterator[ThreadServer]:
    with thread_server(store, tokens=TOKENS, nixl=False) as srv:
        yield srv


def kv(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(n, SPEC.block_nbytes), dtype=np.uint8)


@pytest.mark.parametrize("shm", [False, True])
def test_tenant_b_cannot_get_lookup_exists_or_delete_a_blocks(secured: ThreadServer, shm: bool) -> None:
    tokens = np.arange(4 * SPEC.block_size)
    with Client(secured.url, token="token-a", shm=shm) as a, Client(secured.url, token="token-b", shm=shm) as b:
        assert a.session.tenant == "tenant-a" and b.session.tenant == "tenant-b"
        assert a.session.salt != b.session.salt
        assert a.put(SPEC, tokens, kv(4)) == 4
        a_hashes = a.block_hashes(SPEC, tokens)
        # B hashing the same tokens gets other hashes (its own salt) ...
        assert b.block_hashes(SPEC, tokens) != a_hashes
        assert b.lookup(SPEC, tokens).blocks == 0
        assert b.get(SPEC, tokens) is None
        # ... and naming A's hashes verbatim still reaches only B's namespace
        assert b.exists(SPEC, a_hashes) == [False] * 4
        assert b.get_blocks(SPEC, a_hashes) == [None] * 4
        assert b.delete(SPEC, a_hashes) == 0
        assert b.pin(SPEC, a_hashes) == 0
        stats = b.stats()  # no node-wide counters to watch another tenant's activity through
        assert "tiers" not in stats and "server" not in stats and stats["tenant"] == "tenant-b"
        # A still has everything
        assert a.lookup(SPEC, tokens).blocks == 4
        assert a.exists(SPEC, a_hashes) == [True] * 4


def test_only_a_token_for_every_namespace_sees_node_wide_stats(store: TieredStore) -> None:
    tokens: dict[str, str | TokenGrant] = {
        "token-a": "tenant-a",
        "token-ops": TokenGrant.of("ops", ["read"], ["*"]),
        "token-a-admin": TokenGrant.of("tenant-a", ["admin"], ["tenant-a"]),
    }
    with thread_server(store, tokens=tokens, nixl=False) as srv:
        for token in ("token-a", "token-a-admin"):  # a tenant's admin is still one tenant
            with Client(srv.url, token=token, shm=False) as c:
                assert set(c.stats()) == {"tenant", "node_id"}
        with Client(srv.url, token="token-ops", shm=False) as ops:
            stats = ops.stats()
        assert stats["tenant"] == "ops" and stats["server"]["connections"] >= 1 and "ram" in stats["tiers"]


def test_salt_is_derived_by_the_server_from_the_token(secured: ThreadServer) -> None:
    from kvfabric.hashing import tenant_salt
    from tests.transport.servers import SECRET

    with Client(secured.url, token="token-b") as b:
        assert b.session.salt == tenant_salt(SECRET, "tenant-b")
        assert b.block_hashes(SPEC, np.arange(16))[0] != root_hash(SPEC.fingerprint())


@pytest.mark.parametrize("token", [None, "", "token-c", "token-a "])
def test_invalid_token_is_refused(secured: ThreadServer, token: str | None) -> None:
    with pytest.raises(AuthError):
        Client(secured.url, token=token).session


def raw_exchange(port: int, data: bytes) -> list[fr.Frame]:
    """Send bytes on a fresh socket and read frames until the server closes it."""
    frames = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    while len(buf) >= fr.HEADER_BYTES:
        header = fr.parse_header(buf)
        end = fr.HEADER_BYTES + header.body_len
        frames.append(fr.parse_body(header, buf[fr.HEADER_BYTES : end]))
        buf = buf[end + header.payload_len :]
    return frames


def test_requests_before_hello_are_refused_before_any_work(secured: ThreadServer, store: TieredStore) -> None:
    model = SPEC.fingerprint()
    h = bytes(32)
    meta = fr.WireMeta(h, SPEC.dtype, SPEC.block_shape, SPEC.block_size)
    work = store.tier_stats()  # hits, misses, puts, deletes...
    for data in (
        fr.encode_get(1, model, [h]),
        fr.encode_keys(1, "delete", model, [h]),
        fr.encode_put(1, model, [fr.PutItem(h, meta)]) + bytes(meta.nbytes),
        fr.encode_hello(1, "wrong", {}, []) + fr.encode_get(2, model, [h]),
    ):
        frames = raw_exchange(secured.port, data)
        assert frames == [fr.Error(0, "auth", frames[0].message)], frames  # type: ignore[union-attr]
    assert store.tier_stats() == work
    assert secured.server.counters.auth_failures == 4
