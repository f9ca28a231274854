"""PUTs that stop half way: each holds at most its own payload, counts against the node's in-flight budget, and is
dropped at the frame deadline, giving the bytes back; a well-behaved client's puts go on beside them."""

from __future__ import annotations

import time

import numpy as np

from kvfabric.client import Client
from kvfabric.transport import frames as fr
from tests.chaos.harness import HOSTILE, MAX_FRAME_BYTES, OPS, SPEC, Node, beside, scale
from tests.transport.wire import closed_by_peer, connect, hello, read_frame


def test_partial_puts_of_the_largest_frame(node: Node) -> None:
    n_blocks = MAX_FRAME_BYTES // SPEC.block_nbytes
    rounds = scale(1, 4)
    with Client(node.url, token=HOSTILE, shm=False) as c:
        c.register_model(SPEC)
        words = np.arange(n_blocks * SPEC.block_size)
        hashes = c.block_hashes(SPEC, words)
    meta = fr.WireMeta(hashes[0], SPEC.dtype, SPEC.block_shape, SPEC.block_size)
    put = fr.encode_put(2, SPEC.fingerprint(), [fr.PutItem(h, meta) for h in hashes])
    with beside(node, settle_s=5) as steady:
        for _ in range(rounds):
            socks = [connect(node.port, timeout=15) for _ in range(4)]
            for s in socks:
                hello(s, HOSTILE)
                s.sendall(put)
                s.sendall(b"\x07" * (MAX_FRAME_BYTES // 2))
            time.sleep(0.5)
            with Client(node.url, token=OPS, shm=False) as probe:
                server = probe.stats()["server"]
                assert server["inflight_bytes"] >= 4 * MAX_FRAME_BYTES  # held against the budget ...
            for s in socks:  # ... until the 3 s frame deadline drops each stalled PUT
                reply = read_frame(s)
                assert isinstance(reply, fr.Error) and reply.code == "timeout"
                assert closed_by_peer(s)
                s.close()
        time.sleep(0.3)
        with Client(node.url, token=OPS, shm=False) as probe:
            assert probe.stats()["server"]["inflight_bytes"] == 0
        assert steady.latencies
    with Client(node.url, token=HOSTILE, shm=False) as c:  # nothing of the half-sent puts was stored
        assert c.exists(SPEC, hashes[:4]) == [False] * 4
