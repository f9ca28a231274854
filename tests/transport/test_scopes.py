"""Scopes on the data plane, as on the admin API: read < write < admin, per namespace, for every operation, with
two tenants. A refused request changes nothing and the connection carries on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from kvfabric.client import Client
from kvfabric.errors import AuthError
from kvfabric.store.tiered import TieredStore
from kvfabric.transport.auth import TokenGrant
from tests.blocks import SPEC
from tests.transport.servers import ThreadServer, thread_server

TOKENS: dict[str, str | TokenGrant] = {
    "a-read": TokenGrant("tenant-a", "read"),
    "a-write": TokenGrant("tenant-a", "write"),
    "a-admin": TokenGrant("tenant-a", "admin"),
    "b-read": TokenGrant("tenant-b", "read"),
    "b-write": TokenGrant("tenant-b", "write"),
    "a-all": TokenGrant("tenant-a", "read", frozenset({"*"})),
    "a-elsewhere": TokenGrant("tenant-a", "admin", frozenset({"tenant-c"})),
}
WORDS = np.arange(4 * SPEC.block_size)
OTHER_SPEC = dataclasses.replace(SPEC, model="test/never-registered")


def kv(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SPEC.block_nbytes), dtype=np.uint8)


@pytest.fixture
def secured(store: TieredStore) -> Iterator[ThreadServer]:
    with thread_server(store, tokens=TOKENS, nixl=False) as srv:
        yield srv


def _ops(c: Client, hashes: list[Any]) -> dict[str, Callable[[], Any]]:
    """Every data-plane operation a client can send, by name, acting on tenant-a's blocks (or the caller's own)."""
    return {
        "register_known": lambda: c.register_model(SPEC),
        "register_new": lambda: c.register_model(OTHER_SPEC),
        "lookup": lambda: c.lookup(SPEC, WORDS),
        "exists": lambda: c.exists(SPEC, hashes),
        "get": lambda: c.get_blocks(SPEC, hashes),
        "get_chunked": lambda: c.get_blocks(SPEC, hashes, chunks=2),
        "stats": lambda: c.stats(),
        "put": lambda: c.put(SPEC, WORDS, np.zeros((4, SPEC.block_nbytes), np.uint8)),
        "pin": lambda: c.pin(SPEC, hashes),
        "unpin": lambda: c.unpin(SPEC, hashes),
        "delete": lambda: c.delete(SPEC, hashes),
    }


READ_OPS = {"register_known", "lookup", "exists", "get", "get_chunked", "stats"}
WRITE_OPS = {"register_new", "put", "pin", "unpin", "delete"}


@pytest.mark.parametrize("shm", [False, True])
@pytest.mark.parametrize("token,allowed", [
    ("a-read", READ_OPS), ("a-all", READ_OPS), ("a-write", READ_OPS | WRITE_OPS),
    ("a-admin", READ_OPS | WRITE_OPS),
])  # fmt: skip
def test_every_operation_against_every_scope(secured: ThreadServer, token: str, allowed: set[str], shm: bool) -> None:
    data = kv(4, seed=7)
    with Client(secured.url, token="a-write", shm=False) as owner:
        assert owner.put(SPEC, WORDS, data) == 4
        hashes = owner.block_hashes(SPEC, WORDS)
    changed = False  # an allowed put or delete changes tenant-a's blocks; until then they must be intact
    with Client(secured.url, token=token, shm=shm) as c, Client(secured.url, token="a-read", shm=False) as reader:
        for name, op in _ops(c, hashes).items():
            if name in allowed:
                op()
                changed |= name in ("put", "delete")
            else:
                with pytest.raises(AuthError, match="scope"):
                    op()
            if not changed:
                got = reader.get_blocks(SPEC, hashes)
                assert all(g is not None and np.array_equal(g, d) for g, d in zip(got, data, strict=True)), name
        assert c.stats()["tenant"] == "tenant-a"  # the connection survived every refusal
    registered = {s.model for s in secured.store.models()}
    assert ("test/never-registered" in registered) == ("register_new" in allowed)


def test_a_read_token_cannot_overwrite_a_block_with_zeros(secured: ThreadServer) -> None:
    data = kv(4, seed=3)
    with Client(secured.url, token="a-write", shm=False) as w, Client(secured.url, token="a-read", shm=False) as r:
        assert w.put(SPEC, WORDS, data) == 4
        with pytest.raises(AuthError, match="'write' scope"):
            r.put(SPEC, WORDS, np.zeros_like(data))
        got = r.get_blocks(SPEC, w.block_hashes(SPEC, WORDS))
        assert all(np.array_equal(g, d) for g, d in zip(got, data, strict=True))


def test_write_scope_of_one_tenant_reaches_nothing_of_the_other(secured: ThreadServer) -> None:
    data = kv(4, seed=5)
    with Client(secured.url, token="a-write", shm=False) as a, Client(secured.url, token="b-write", shm=False) as b:
        assert a.put(SPEC, WORDS, data) == 4
        a_hashes = a.block_hashes(SPEC, WORDS)
        assert b.delete(SPEC, a_hashes) == 0  # B's namespace holds none of them
        assert b.pin(SPEC, a_hashes) == 0
        assert b.get_blocks(SPEC, a_hashes) == [None] * 4
        assert b.put(SPEC, WORDS, np.zeros_like(data)) == 4  # B's own blocks, under B's salt
        got = a.get_blocks(SPEC, a_hashes)
        assert all(np.array_equal(g, d) for g, d in zip(got, data, strict=True))
    with Client(secured.url, token="b-read", shm=False) as b_reader:
        with pytest.raises(AuthError, match="'write' scope"):
            b_reader.delete(SPEC, b_reader.block_hashes(SPEC, WORDS))
        assert b_reader.lookup(SPEC, WORDS).blocks == 4


def test_a_token_whose_namespaces_leave_out_its_tenant_cannot_say_hello(secured: ThreadServer) -> None:
    with Client(secured.url, token="a-elsewhere", shm=False, retries=0) as c:
        with pytest.raises(AuthError, match="leave out its tenant"):
            c.stats()
