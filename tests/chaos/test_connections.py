"""Connections before and without authentication: headers declaring large bodies, partial HELLOs held open
(slow-loris), idle floods up to the per-peer limit. Memory stays small while they are open, comes back once they
are gone, and a well-behaved client beside them sees nothing."""

from __future__ import annotations

import socket
import time

from kvfabric.transport import frames as fr
from tests.chaos.harness import HOSTILE, Node, beside, scale
from tests.transport.wire import closed_by_peer, connect, hello, read_frame


def test_headers_declaring_4_mib_bodies_before_hello(node: Node) -> None:
    n = scale(300, 1000)
    with beside(node) as steady:
        before = node.anon_rss_mib()
        for _ in range(n // 50):
            socks = [connect(node.port, timeout=10) for _ in range(50)]
            for s in socks:
                s.sendall(fr.HEADER.pack(fr.MAGIC, 1, fr.OP_HELLO, 4 << 20, 1, 0) + b"\x00" * 1000)
            for s in socks:
                reply = read_frame(s)
                assert isinstance(reply, fr.Error) and reply.code == "frame_too_large"
                s.close()
        assert node.anon_rss_mib() < before + 64, "refused connections left memory behind"
        assert steady.latencies


def test_partial_hellos_are_dropped_at_the_handshake_deadline(node: Node) -> None:
    n = scale(200, 1000)
    with beside(node) as steady:
        before = node.anon_rss_mib()
        socks = [connect(node.port, timeout=10) for _ in range(n)]
        try:
            for s in socks:  # a header promising an 8 KiB HELLO body, and a few bytes of it
                s.sendall(fr.HEADER.pack(fr.MAGIC, 1, fr.OP_HELLO, 8 << 10, 1, 0) + b"\x94" * 64)
            time.sleep(0.5)
            held = node.anon_rss_mib() - before
            assert held < 32 + n * 0.05, f"{n} unauthenticated connections hold {held:.0f} MiB"
            for s in socks:  # the deadline is 2 s: each gets a timeout ERROR and is closed
                reply = read_frame(s)
                assert isinstance(reply, fr.Error) and reply.code == "timeout"
                assert closed_by_peer(s)
        finally:
            for s in socks:
                s.close()
        assert steady.latencies


def test_an_idle_flood_meets_the_per_peer_limit(node: Node) -> None:
    limit = scale(400, 1200)
    with beside(node) as steady:
        time.sleep(0.3)  # the steady client has its connections
        socks: list[socket.socket] = []
        try:
            refused = 0
            while len(socks) < limit + 20:
                s = connect(node.port, timeout=10)
                socks.append(s)
                s.sendall(fr.encode_hello(1, HOSTILE, {}, []))
            for s in socks:
                reply = read_frame(s)
                if isinstance(reply, fr.Error):
                    assert reply.code == "busy" and "127.0.0.1" in reply.message
                    refused += 1
                else:
                    assert isinstance(reply, fr.HelloOk)
            assert refused >= 20  # everything past the limit, less the steady client's own connections
        finally:
            for s in socks:
                s.close()
        time.sleep(0.5)
        with connect(node.port) as s:  # the slots came back
            hello(s, HOSTILE)
        assert steady.latencies
