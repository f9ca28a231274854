"""32 concurrent clients doing mixed get/put against a server in another process: no errors, and every byte a get
returns is the byte that was put. ``KVFABRIC_SOAK_S`` sets the duration (default 10 s; 60 for the full run)."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np

from kvfabric.client import Client
from kvfabric.ids import PrefixHash
from tests.blocks import SPEC
from tests.transport.servers import process_server

CLIENTS = 32
BLOCKS_PER_PUT = 4


def payload_for(h: bytes) -> np.ndarray:
    """The block content is a function of its hash, so any client can verify any block."""
    return np.random.default_rng(int.from_bytes(h[:8], "little")).integers(0, 256, SPEC.block_nbytes, dtype=np.uint8)


def test_concurrent_clients_mixed_get_put() -> None:
    duration = float(os.environ.get("KVFABRIC_SOAK_S", "10"))
    known: list[PrefixHash] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    counts = {"puts": 0, "gets": 0, "hits": 0, "bytes_verified": 0}

    def worker(url: str, index: int, deadline: float) -> None:
        rng = random.Random(index)
        try:
            with Client(url, shm=index % 2 == 0, pool_size=1) as c:
                while time.monotonic() < deadline:
                    if rng.random() < 0.4 or not known:
                        tokens = np.array([rng.randrange(50000) for _ in range(BLOCKS_PER_PUT * SPEC.block_size)])
                        hashes = c.block_hashes(SPEC, tokens)
                        assert c.put_blocks(SPEC, hashes, [payload_for(h) for h in hashes]) == BLOCKS_PER_PUT
                        with lock:
                            known.extend(hashes)
                            counts["puts"] += 1
                    else:
                        with lock:
                            pick = [known[rng.randrange(len(known))] for _ in range(rng.randint(1, 8))]
                        got = c.get_blocks(SPEC, pick)
                        hits = 0
                        for h, g in zip(pick, got, strict=True):
                            if g is not None:  # a miss is allowed (evicted); wrong bytes never are
                                assert np.array_equal(g, payload_for(h)), f"block {h.hex()} came back corrupted"
                                hits += 1
                        with lock:
                            counts["gets"] += 1
                            counts["hits"] += hits
                            counts["bytes_verified"] += hits * SPEC.block_nbytes
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with process_server("--ram-bytes", str(4096 * SPEC.block_nbytes)) as (_, port):
        url = f"kvfabric://127.0.0.1:{port}"
        deadline = time.monotonic() + duration
        threads = [threading.Thread(target=worker, args=(url, i, deadline)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 60)
        with Client(url, shm=False) as c:
            server_stats = c.stats()["server"]
    print(f"\nsoak {duration:.0f}s, {CLIENTS} clients: {counts}, server: {server_stats}")
    assert not errors, errors[:3]
    assert counts["puts"] > 0 and counts["hits"] > 0
    assert server_stats["errors"] == 0 and server_stats["protocol_errors"] == 0
    assert server_stats["leases_outstanding"] == 0
