"""At a low descriptor limit, idle peers cannot starve the store: connections stop at the limit less
``fd_reserve``, and the store goes on opening what it needs (segment files, registry writes)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvfabric.client import Client
from kvfabric.transport import frames as fr
from tests.chaos.harness import HOSTILE, SPEC, STEADY, Node, beside, scale, start_node
from tests.transport.wire import connect, read_frame

NOFILE = 640


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("chaos-fd"), nofile=NOFILE, extra_server="fd_reserve = 256")
    try:
        yield n
    finally:
        n.stop()


def open_fds(node: Node) -> int:
    return len(list(Path(f"/proc/{node.proc.pid}/fd").iterdir()))


def test_idle_peers_cannot_take_the_stores_descriptors(node: Node) -> None:
    flood = scale(500, 600)
    with beside(node) as steady, Client(node.url, token=STEADY, shm=False, pool_size=1) as writer:
        writer.stats()  # connected before the flood
        socks: list[socket.socket] = []
        try:
            for _ in range(flood):
                s = connect(node.port, timeout=10)
                socks.append(s)
                s.sendall(fr.encode_hello(1, HOSTILE, {}, []))
            refused = 0
            for s in socks:
                reply = read_frame(s)
                if isinstance(reply, fr.Error):
                    assert reply.code == "busy" and "connections" in reply.message
                    refused += 1
            assert refused > 0, "the flood never met the descriptor-derived connection limit"
            assert open_fds(node) < NOFILE - 200  # the reserve is still free
            for i in range(3):  # the store opens files (registry writes, segments): none fails
                writer.register_model(dataclasses.replace(SPEC, model=f"chaos/fd-{i}"))
            time.sleep(0.5)
        finally:
            for s in socks:
                s.close()
        assert steady.latencies
