"""One GET frame must not kill the node: a GET repeating one hash N times in 16,384 chunks is refused at parse
time with an ERROR frame, and the largest GETs within the limits run beside a well-behaved client without
starving it."""

from __future__ import annotations

import threading
import time

import numpy as np

from kvfabric.client import Client
from kvfabric.transport import frames as fr
from tests.chaos.harness import HOSTILE, MAX_BATCH, SPEC, Node, beside, scale
from tests.transport.wire import connect, hello, read_frame


def _hostile_hash(node: Node) -> bytes:
    with Client(node.url, token=HOSTILE, shm=False) as c:
        words = np.arange(SPEC.block_size)
        c.put(SPEC, words, np.zeros((1, SPEC.block_nbytes), np.uint8))
        return c.block_hashes(SPEC, words)[0]


def test_a_get_of_one_hash_n_times_in_16384_chunks(node: Node) -> None:
    h = _hostile_hash(node)
    n = scale(1024, 4096)
    rounds = scale(20, 200)
    refused: list[fr.Frame] = []
    with beside(node) as steady:
        with connect(node.port, timeout=30) as s:
            hello(s, HOSTILE)
            for i in range(rounds):
                started = time.monotonic()
                count = n if i % 2 else MAX_BATCH  # over max_batch, or within it and over max_reply_views
                s.sendall(fr.encode_get(100 + i, SPEC.fingerprint(), [h] * count, 16384))
                reply = read_frame(s)
                assert time.monotonic() - started < 5
                refused.append(reply)
        assert steady.latencies
    assert all(isinstance(r, fr.Error) and r.code == "frame_too_large" for r in refused), refused[:2]
    assert {r.request_id for r in refused} == {100 + i for i in range(rounds)}  # type: ignore[union-attr]
    assert "max_reply_views" in refused[0].message and "max_batch" in refused[1].message  # type: ignore[union-attr]


def test_the_largest_gets_within_the_limits_share_the_node(node: Node) -> None:
    h = _hostile_hash(node)
    duration = scale(4, 30)
    conns = scale(2, 8)
    replies: list[int] = []
    problems: list[str] = []

    def hammer(worst: list[bytes], chunks: int) -> None:
        with connect(node.port, timeout=60) as s:
            hello(s, HOSTILE)
            end = time.monotonic() + duration
            i = 0
            while time.monotonic() < end:
                i += 1
                s.sendall(fr.encode_get(i, SPEC.fingerprint(), worst, chunks))
                reply = read_frame(s)
                if isinstance(reply, fr.Blocks):
                    replies.append(reply.payload_len)
                else:
                    problems.append(repr(reply))

    views = fr.MAX_REPLY_VIEWS
    shapes = [([h] * (views // 16384), 16384), ([h] * MAX_BATCH, views // MAX_BATCH)]  # 65,536 views each
    with beside(node) as steady:
        threads = [threading.Thread(target=hammer, args=shapes[i % 2]) for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 60)
    assert not problems, problems[:2]
    assert len(replies) >= conns  # the hostile clients were served too, only not at the others' expense
    assert steady.p99() > 0


def test_a_pipelined_flood_of_large_requests_from_one_connection(node: Node) -> None:
    """Thousands of requests written without reading a reply: the server stops reading that connection (its
    requests in progress and its unsent replies are bounded) and serves everyone else meanwhile."""
    h = _hostile_hash(node)
    n = scale(1000, 10000)
    frames = b"".join(fr.encode_keys(i, "exists", SPEC.fingerprint(), [h] * MAX_BATCH) if i % 2 else
                      fr.encode_get(i, SPEC.fingerprint(), [h] * 2) for i in range(1, n + 1))  # fmt: skip
    with beside(node) as steady:
        with connect(node.port, timeout=60) as s:
            hello(s, HOSTILE)
            sender = threading.Thread(target=s.sendall, args=(frames,), daemon=True)
            sender.start()
            time.sleep(scale(1, 10))  # not reading: the server's send buffer fills and it stops reading us
            got = 0
            while got < n:
                reply = read_frame(s)
                assert isinstance(reply, fr.Flags | fr.Blocks), reply
                got += 1
            sender.join(30)
        assert steady.latencies
