"""LMCache's own cache server as a peer (``python -m lmcache.v1.server HOST PORT cpu``, lmcache 0.5.x).

The client is LMCache's own remote connector for ``lm://`` URLs (``LMCServerConnector``), built the way LMCache's
remote backend builds it: over a ``LocalCPUBackend`` whose allocator provides the memory objects blocks are sent
from and received into, with the connector's coroutines run on an event loop in a background thread. Blocks are
uint8 KV chunks of LMCache's default 256 tokens, shaped so one chunk is exactly ``size`` bytes.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.peers.processes import ServerProcess, bench_executable, client_env, free_port, run_client
from bench.peers.result import PeerMeasurement, check_request, measurement_from_dict, measurement_from_times

PEER = "lmcache"
CHUNK_TOKENS = 256  # LMCache's default chunk_size
LMCACHE_ENV = {
    "LMCACHE_TRACK_USAGE": "false",  # otherwise it tries to report usage over the network and stalls for minutes
    "LMCACHE_LOG_LEVEL": "WARNING",
}


def chunk_shape(size: int) -> tuple[int, int, int, int, int]:
    """An LMCache ``kv_shape`` (layers, 2, chunk tokens, kv heads, head dim) whose uint8 chunk is ``size`` bytes."""
    per_head_dim = 2 * CHUNK_TOKENS
    if size <= 0 or size % per_head_dim:
        raise ValueError(f"lmcache peer needs a block size that is a positive multiple of {per_head_dim}, got {size}")
    return (1, 2, CHUNK_TOKENS, 1, size // per_head_dim)


def measure(size: int, count: int, rounds: int = 3) -> PeerMeasurement:
    """Start LMCache's server, move ``count`` blocks of ``size`` bytes through it from another process, stop it."""
    check_request(size, count, rounds)
    chunk_shape(size)  # refuse a size LMCache cannot shape before starting anything
    python = bench_executable(PEER, "python")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kvfabric-peer-lmcache-") as tmp, ExitStack() as stack:
        server = ServerProcess(PEER, "lmcache-server", [
            str(python), "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu",
        ], Path(tmp), env=client_env(LMCACHE_ENV))
        stack.callback(server.stop)
        server.wait_for_port(port, timeout_s=180)  # importing torch + lmcache takes seconds on a busy machine
        data = run_client(PEER, ["--port", str(port), "--size", str(size), "--count", str(count),
                                 "--rounds", str(rounds)], env=LMCACHE_ENV)
    return measurement_from_dict(data)


def run_client_half(port: int, size: int, count: int, rounds: int) -> PeerMeasurement:
    """The client half, run in the bench virtualenv by ``bench.peers.peer_client``."""
    import asyncio
    import threading

    import lmcache
    import numpy as np
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryObj
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

    from bench.peers.rounds import PeerOps, run_rounds, source_blocks

    # room for the source chunks and one round of fetched chunks, plus slack for the allocator's alignment
    allocator_gib = (2 * size * count + (64 << 20)) / (1 << 30)
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK_TOKENS, local_cpu=False, max_local_cpu_size=allocator_gib,
        remote_url=f"lm://127.0.0.1:{port}", remote_serde="naive",
    )
    metadata = LMCacheMetadata(
        model_name="kvfabric-bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.uint8, kv_shape=chunk_shape(size), chunk_size=CHUNK_TOKENS,
    )
    backend = LocalCPUBackend(config, metadata)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="lmcache-connector-loop", daemon=True)
    loop_thread.start()

    def run(coro):  # the connector's coroutines run on its loop thread, as in LMCache's RemoteBackend
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    connector = LMCServerConnector("127.0.0.1", port, loop, backend)
    shape = metadata.get_shapes()[0]
    source = source_blocks(size, count)
    chunks: list[MemoryObj] = []
    for i in range(count):
        chunk = backend.allocate(shape, torch.uint8)
        if chunk is None:
            raise RuntimeError(f"LocalCPUBackend could not allocate source chunk {i} of {size} bytes")
        chunk.tensor.view(-1).copy_(torch.from_numpy(source[i * size:(i + 1) * size]))
        chunks.append(chunk)
    keys = [CacheEngineKey("kvfabric-bench", 1, 0, i, torch.uint8) for i in range(count)]
    fetched: list[MemoryObj | None] = []

    def put_all() -> None:
        for key, chunk in zip(keys, chunks, strict=True):
            run(connector.put(key, chunk))
        # PUT has no reply; the server serves one connection's commands in order, so once EXIST answers, every
        # chunk sent before it is stored
        if not run(connector.exists(keys[-1])):
            raise RuntimeError("LMCache server does not hold the last chunk after the puts")

    def get_all() -> None:
        fetched[:] = [run(connector.get(key)) for key in keys]

    def verify() -> bool:
        return len(fetched) == count and all(
            chunk is not None and np.array_equal(
                np.frombuffer(chunk.byte_array, dtype=np.uint8), source[i * size:(i + 1) * size])
            for i, chunk in enumerate(fetched))

    def clear() -> None:
        # the server's protocol has no delete: the next round's puts replace these keys in place
        for chunk in fetched:
            if chunk is not None:
                chunk.ref_count_down()
        fetched.clear()

    try:
        times = run_rounds(PeerOps(put_all, get_all, verify, clear), rounds)
    finally:
        run(connector.close())
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=10)
    return measurement_from_times(
        PEER, size, count, times.put_seconds, times.get_seconds, times.verified,
        api="lmcache LMCServerConnector put/get (lm:// remote connector), one chunk at a time",
        server=f"lmcache.v1.server cpu backend (lmcache {lmcache.__version__})",
    )
