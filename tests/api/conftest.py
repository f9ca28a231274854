"""Fixtures for the admin API: a real TieredStore with data, settings with auth on, and an in-process client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kvfabric.store.tiered import TieredStore

from kvfabric.api.app import create_app
from kvfabric.api.server import AdminServer
from kvfabric.config import Settings
from kvfabric.record import Block
from kvfabric.spec import ModelSpec
from tests.blocks import SPEC, make_chain

SPEC_B = ModelSpec(model="test/other-model", num_layers=1, kv_heads=1, head_dim=8, block_size=16)

TOKENS = {
    "admin": {"token": "admin-token-0123456789", "tenant": "ops", "scopes": ["admin"], "namespaces": ["*"]},
    "ops-read": {"token": "opsread-token-0123456789", "tenant": "ops", "scopes": ["read"], "namespaces": ["*"]},
    "a-read": {"token": "aread-token-0123456789", "tenant": "tenant-a", "scopes": ["read"]},
    "a-write": {"token": "awrite-token-0123456789", "tenant": "tenant-a", "scopes": ["write"]},
    "b-write": {"token": "bwrite-token-0123456789", "tenant": "tenant-b", "scopes": ["write"]},
    "a-admin": {"token": "aadmin-token-0123456789", "tenant": "tenant-a", "scopes": ["admin"]},
}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]['token']}"}


def make_settings(data_dir: Path, **server: object) -> Settings:
    return Settings(
        server={
            "server_secret": "test-server-secret",
            "auth": {"enabled": True, "tokens": list(TOKENS.values())},
            "stats_interval_s": 0.05,
            **server,
        },
        store={"data_dir": str(data_dir), "ram_bytes": "64MiB", "disk_bytes": "256MiB", "node_id": "test-node"},
        namespaces={"tenant-a": {"ttl_s": 3600, "quota_bytes": "128MiB"}},
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def store(settings: Settings) -> Iterator[TieredStore]:
    s = TieredStore.open(settings.store_config())
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def blocks(store: TieredStore) -> dict[str, list[Block]]:
    """Data in two namespaces and two models: tenant-a holds 5 SPEC + 2 SPEC_B blocks, tenant-b 3 SPEC blocks."""
    store.register_model(SPEC)
    store.register_model(SPEC_B)
    data = {
        "a": make_chain(5, namespace="tenant-a", seed=1),
        "a2": make_chain(2, spec=SPEC_B, namespace="tenant-a", seed=2),
        "b": make_chain(3, namespace="tenant-b", seed=3),
    }
    for chain in data.values():
        store.put_many(chain)
    return data


@pytest.fixture
def client(store: TieredStore, settings: Settings, blocks: dict[str, list[Block]]) -> Iterator[TestClient]:
    with TestClient(create_app(store, settings)) as c:
        yield c


class LiveServer:
    """The admin app served by :class:`AdminServer` (real uvicorn, real socket, ephemeral port) on an event loop in
    a thread of the test process; ``with LiveServer(app) as url``."""

    def __init__(self, app: FastAPI) -> None:
        self.admin = AdminServer(app, "127.0.0.1", 0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="admin-server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.admin.start(), self.loop).result(timeout=30)
        return f"http://127.0.0.1:{self.admin.port}"

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.admin.close(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()
