"""Redis as a peer: a Debian ``redis-server`` on 127.0.0.1 holding each block as one string value.

This is the remote backend most LMCache deployments use. The client is redis-py (one connection from its pool, one
SET/GET per block, no pipelining: with multi-MiB values a pipeline only adds buffering), with hiredis installed as
redis-py recommends.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.peers.processes import INSTALL_HINT, ServerProcess, free_port, run_client
from bench.peers.result import (
    PeerMeasurement,
    PeerUnavailableError,
    check_request,
    measurement_from_dict,
    measurement_from_times,
)

PEER = "redis"
KEY_PREFIX = "kvfabric-bench:"
BUFFER_CUTOFF = 6000  # redis-py's default: values larger than this are sent as their own buffer, not copied


def measure(size: int, count: int, rounds: int = 3) -> PeerMeasurement:
    """Start redis-server, move ``count`` blocks of ``size`` bytes through it from another process, stop it."""
    check_request(size, count, rounds)
    binary = shutil.which("redis-server")
    if binary is None:
        raise PeerUnavailableError(PEER, f"redis-server is not on PATH: {INSTALL_HINT} (it apt-installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kvfabric-peer-redis-") as tmp, ExitStack() as stack:
        argv = [
            binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", tmp, "--daemonize", "no",
            # a cache, like LMCache's use of it: no snapshots, no append-only file
            "--save", "", "--appendonly", "no",
        ]
        server = ServerProcess(PEER, "redis-server", argv, Path(tmp))
        stack.callback(server.stop)
        server.wait_for_port(port, timeout_s=30)
        data = run_client(PEER, ["--port", str(port), "--size", str(size), "--count", str(count),
                                 "--rounds", str(rounds)])
    return measurement_from_dict(data)


def run_client_half(port: int, size: int, count: int, rounds: int) -> PeerMeasurement:
    """The client half, run in the bench virtualenv by ``bench.peers.peer_client``."""
    import numpy as np
    import redis
    from redis._parsers.encoders import Encoder
    from redis.connection import PythonRespSerializer

    from bench.peers.rounds import PeerOps, run_rounds, source_blocks

    source = source_blocks(size, count)
    blocks = [memoryview(source)[i * size:(i + 1) * size] for i in range(count)]
    keys = [f"{KEY_PREFIX}{i}" for i in range(count)]
    # hiredis parses replies (its documented speed-up), but commands are packed by redis-py's Python packer: hiredis'
    # packer copies each multi-MiB value twice (memoryview -> bytes -> command), which cut put throughput ~4x here
    packer = PythonRespSerializer(BUFFER_CUTOFF, Encoder("utf-8", "strict", False).encode)
    client = redis.Redis(connection_pool=redis.ConnectionPool(host="127.0.0.1", port=port, command_packer=packer))
    fetched: list[bytes | None] = []

    def put_all() -> None:
        for key, block in zip(keys, blocks, strict=True):
            client.set(key, block)

    def get_all() -> None:
        fetched[:] = [client.get(key) for key in keys]

    def verify() -> bool:
        return len(fetched) == count and all(
            value is not None and np.array_equal(np.frombuffer(value, dtype=np.uint8), source[i * size:(i + 1) * size])
            for i, value in enumerate(fetched))

    def clear() -> None:
        fetched.clear()
        client.delete(*keys)

    try:
        times = run_rounds(PeerOps(put_all, get_all, verify, clear), rounds)
        server_version = client.info("server")["redis_version"]
    finally:
        client.close()
    parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "Python"
    return measurement_from_times(
        PEER, size, count, times.put_seconds, times.get_seconds, times.verified,
        api=f"redis-py {redis.__version__} SET/GET, one per block, no pipeline; {parser} reply parser, Python packer",
        server=f"redis-server {server_version}",
    )

