"""Mooncake Store as a peer, over its TCP transport (PyPI ``mooncake-transfer-engine-non-cuda``).

Mooncake Store keeps objects in memory segments that store clients contribute; its master only allocates space and
keeps metadata. So "the server" here is three processes: the HTTP metadata server, ``mooncake_master``, and a
standalone ``mooncake_client`` that owns the memory segment (the ``standalone-store`` layout vLLM documents). The
bench client contributes no segment (``global_segment_size=0``), so every byte it puts or gets crosses a socket to
the ``mooncake_client`` process, through Mooncake's transfer engine with ``protocol="tcp"``. The client uses the
zero-copy API Mooncake recommends for throughput: registered buffers and ``batch_put_from``/``batch_get_into``.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.peers.processes import ServerProcess, bench_executable, free_port, run_client
from bench.peers.result import PeerMeasurement, check_request, measurement_from_dict, measurement_from_times

PEER = "mooncake"
MIB = 1 << 20
CLIENT_LOCAL_BUFFER = 16 * MIB  # staging for non-zero-copy calls; the registered-buffer calls do not use it
KEY_PREFIX = "kvfabric-bench-"


def segment_bytes(size: int, count: int) -> int:
    """Memory the store process mounts: one round's blocks twice over plus slack, well under the master's eviction
    watermark (90 % full), so no block is evicted between its put and its get."""
    return 2 * size * count + 64 * MIB


def measure(size: int, count: int, rounds: int = 3) -> PeerMeasurement:
    """Start the Mooncake metadata server, master and store process; drive them from another process; stop them."""
    check_request(size, count, rounds)
    metadata_server = bench_executable(PEER, "mooncake_http_metadata_server")
    master = bench_executable(PEER, "mooncake_master")
    store = bench_executable(PEER, "mooncake_client")
    metadata_port, master_port, metrics_port, store_port = (free_port() for _ in range(4))
    metadata_url = f"http://127.0.0.1:{metadata_port}/metadata"
    with tempfile.TemporaryDirectory(prefix="kvfabric-peer-mooncake-") as tmp, ExitStack() as stack:
        log_dir = Path(tmp)
        meta = ServerProcess(PEER, "mooncake_http_metadata_server", [
            str(metadata_server), "--host", "127.0.0.1", "--port", str(metadata_port), "--log-level", "WARNING",
        ], log_dir)
        stack.callback(meta.stop)
        master_proc = ServerProcess(PEER, "mooncake_master", [
            str(master), "--rpc_address=127.0.0.1", f"--rpc_port={master_port}",
            "--metrics_host=127.0.0.1", f"--metrics_port={metrics_port}", "--enable_metric_reporting=false",
        ], log_dir)
        stack.callback(master_proc.stop)
        meta.wait_for_port(metadata_port, timeout_s=60)
        master_proc.wait_for_port(master_port, timeout_s=60)
        store_proc = ServerProcess(PEER, "mooncake_client", [
            str(store), "--host=127.0.0.1", f"--port={store_port}", "--protocol=tcp",
            f"--global_segment_size={segment_bytes(size, count) // MIB} MB", "--local_buffer_size=0",
            f"--master_server_address=127.0.0.1:{master_port}", f"--metadata_server={metadata_url}",
        ], log_dir)
        stack.callback(store_proc.stop)
        store_proc.wait_for_port(store_port, timeout_s=60)  # it listens only once its segment is mounted
        data = run_client(PEER, ["--port", str(master_port), "--metadata-port", str(metadata_port),
                                 "--size", str(size), "--count", str(count), "--rounds", str(rounds)])
    return measurement_from_dict(data)


def run_client_half(port: int, metadata_port: int, size: int, count: int, rounds: int) -> PeerMeasurement:
    """The client half, run in the bench virtualenv by ``bench.peers.peer_client``; ``port`` is the master's."""
    from importlib.metadata import version

    import numpy as np
    from mooncake.store import MooncakeDistributedStore

    from bench.peers.rounds import PeerOps, run_rounds, source_blocks

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", f"http://127.0.0.1:{metadata_port}/metadata", 0, CLIENT_LOCAL_BUFFER, "tcp", "",
                     f"127.0.0.1:{port}")
    if rc != 0:
        raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
    source = source_blocks(size, count)
    fetched = np.zeros_like(source)
    for array in (source, fetched):
        rc = store.register_buffer(array.ctypes.data, array.nbytes)
        if rc != 0:
            raise RuntimeError(f"register_buffer of {array.nbytes} bytes returned {rc}")
    keys = [f"{KEY_PREFIX}{i}" for i in range(count)]
    sizes = [size] * count
    source_ptrs = [source.ctypes.data + i * size for i in range(count)]
    fetched_ptrs = [fetched.ctypes.data + i * size for i in range(count)]

    def put_all() -> None:
        codes = store.batch_put_from(keys, source_ptrs, sizes)
        if any(code != 0 for code in codes):
            raise RuntimeError(f"batch_put_from returned {codes}")

    def get_all() -> None:
        got = store.batch_get_into(keys, fetched_ptrs, sizes)
        if any(n != size for n in got):
            raise RuntimeError(f"batch_get_into returned {got}, expected {size} per block")

    def verify() -> bool:
        return bool(np.array_equal(fetched, source))

    def clear() -> None:
        fetched.fill(0)  # so the next round's check sees only what that round fetched
        for key in keys:
            # force: a get leaves a lease on the object for the master's default_kv_lease_ttl (10 s)
            rc = store.remove(key, True)
            if rc != 0:
                raise RuntimeError(f"remove({key!r}) returned {rc}")

    try:
        times = run_rounds(PeerOps(put_all, get_all, verify, clear), rounds)
    finally:
        store.close()
    package = version("mooncake-transfer-engine-non-cuda")
    return measurement_from_times(
        PEER, size, count, times.put_seconds, times.get_seconds, times.verified,
        api="MooncakeDistributedStore batch_put_from/batch_get_into, registered buffers, protocol=tcp",
        server=f"mooncake_master + mooncake_client store process ({package})",
    )
