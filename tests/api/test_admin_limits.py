"""The admin app refuses a body before reading it: an unknown token gets 401 and an oversized body 413, over a
real socket to real uvicorn, while the sender is still sending; the next request is served as usual."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from kvfabric.api.app import create_app
from kvfabric.config import Settings
from kvfabric.store.tiered import TieredStore
from tests.api.conftest import LiveServer, bearer

LIMIT = 64 << 10


@pytest.fixture
def url(store: TieredStore, settings: Settings, blocks: object) -> Iterator[str]:
    with LiveServer(create_app(store, settings, max_body_bytes=LIMIT)) as u:
        yield u


def _raw_request(url: str, head: str, body_prefix: bytes) -> tuple[int, dict[str, object], int]:
    """Send ``head`` and the start of a body whose Content-Length promises far more, then read the answer.
    Returns (status, JSON body, bytes of the body the server let us send before answering)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body_prefix)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _length(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    body = json.loads(reply[reply.index(b"\r\n\r\n") + 4 :])
    return status, body, len(body_prefix)


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _post_head(path: str, length: int, token: str | None) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n")  # fmt: skip


def test_an_unknown_token_is_refused_before_a_200mb_body_is_read(url: str) -> None:
    status, body, _ = _raw_request(url, _post_head("/v1/evict", 200 << 20, "forged"), b"{")
    assert status == 401 and "invalid bearer token" in str(body["detail"])
    status, body, _ = _raw_request(url, _post_head("/v1/evict", 200 << 20, None), b"{")
    assert status == 401 and "missing bearer token" in str(body["detail"])


def test_a_declared_body_over_the_limit_is_refused_with_413(url: str) -> None:
    token = bearer("admin")["Authorization"].split()[1]
    status, body, _ = _raw_request(url, _post_head("/v1/evict", LIMIT + 1, token), b"{")
    assert status == 413 and str(LIMIT) in str(body["detail"])


def test_a_chunked_body_is_cut_off_at_the_limit(url: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b" " * (8 << 10)  # 512 KiB in all, past the 64 KiB limit, with no Content-Length

    r = httpx.post(f"{url}/v1/evict", content=chunks(), headers={**bearer("admin"), "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert str(LIMIT) in r.json()["detail"]


def test_bodies_within_the_limit_and_bodiless_requests_are_served(url: str) -> None:
    assert httpx.get(f"{url}/healthz").status_code == 200
    r = httpx.get(f"{url}/v1/stats", headers=bearer("a-read"))
    assert r.status_code == 200
    r = httpx.put(f"{url}/v1/namespaces/tenant-a/policy", json={"ttl_s": 60}, headers=bearer("admin"))
    assert r.status_code == 200, r.text


def test_refusals_are_counted_in_metrics(store: TieredStore, settings: Settings, blocks: object) -> None:
    with TestClient(create_app(store, settings, max_body_bytes=LIMIT)) as c:
        assert c.post("/v1/evict", content=b"x" * 10, headers={"Authorization": "Bearer forged"}).status_code == 401
        text = c.get("/metrics", headers=bearer("admin")).text
    assert any("admin_requests" in line and 'status="401"' in line for line in text.splitlines()), text[-2000:]
