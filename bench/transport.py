"""Data-plane bandwidth: ``kvfabric serve`` (RAM tier, its own process) against baselines measured in the same run.

Rows (GiB/s; ratio = value / baseline; every kvfabric figure is a client in this process, the server in another):

  get, put   vs socket    one block per request over TCP, against a raw asyncio (uvloop) server process moving the
                          same number of bytes per request into / out of preallocated buffers: the TCP limit
                          (batched rows, ``--batch-sizes``: ``--batch`` small blocks per request, as engines fetch
                          them, against the raw server moving their bytes in one request)
  get, put   vs redis / mooncake / lmcache
                          the peers' own put-all/get-all rounds (``bench/peers``: servers here, client half in
                          ``.bench-venv/``), against kvfabric doing the same rounds with the same block count, right
                          before and after each peer (one put_blocks / get_blocks call per round)
  get_shm    vs memcpy    same-host shared memory (one LEASE for all blocks, one-way RELEASE) against an
                          in-process copy of the same bytes between already-faulted buffers, into the same arrays
  get_nixl   vs tcp       NIXL one-sided reads against the TCP get, one block per request (measured last: the
                          server starts its NIXL agent, whose UCX progress thread polls, only when a NIXL client asks)

The socket, memcpy and tcp baselines are measured interleaved with the value they divide (alternating slices,
median slice each), so a change of machine load hits both sides alike. Every block fetched by every path is
compared with what was put (outside the timed loops).

    python bench/transport.py [--json] [--sizes 16MiB,1MiB] [--batch-sizes 256KiB,64KiB] [--batch 64]
                              [--seconds 2] [--count N] [--rounds 3] [--peers redis,mooncake,lmcache | none]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvfabric.client import Client
from kvfabric.spec import DType, ModelSpec

GIB = 1 << 30
BLOCKS = 4
"""Distinct blocks the timed loops cycle through (and that one get_shm call fetches)."""
PEER_ROUND_BYTES = 128 << 20
"""Default bytes per peer round: ``--count`` is this divided by the block size (at least BLOCKS)."""
PEERS = ("redis", "mooncake", "lmcache")
Log = Callable[[str], None]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB|)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 16MiB, 1MiB, 65536)")
    return int(m.group(1)) * {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


def spec_for(nbytes: int) -> ModelSpec:
    """A Llama-3-8B-like shard (32 layers, 8 KV heads x 128, bf16) whose block_size makes a block ``nbytes``; a block
    smaller than one token of every layer is 16 tokens of fewer layers (a pipeline stage's share)."""
    per_layer_token = 2 * 8 * 128 * 2
    layers, block_size = 32, nbytes // (32 * per_layer_token)
    if nbytes < 32 * per_layer_token * 16:
        layers, block_size = nbytes // (16 * per_layer_token), 16
    if not layers or not block_size or layers * block_size * per_layer_token != nbytes:
        raise ValueError(f"no block layout of {nbytes} bytes (a multiple of {16 * per_layer_token} is needed)")
    return ModelSpec(model="bench/llama-like" if layers == 32 else f"bench/llama-like-{layers}", num_layers=layers, kv_heads=8, head_dim=128,
                     dtype=DType.BFLOAT16, block_size=block_size)  # fmt: skip


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@contextmanager
def child(args: list[str]) -> Iterator[int]:
    """A child process that prints ``listening on HOST:PORT``; yields the port. Its later output is drained (a
    native library that logs to stdout must never block on a full pipe)."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"listening on [\d.]+:(\d+)", line):
                break
        else:
            raise RuntimeError(f"{args[:4]} exited before listening (code {proc.wait()})")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield int(m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def interleaved(fns: Sequence[Callable[[], int]], seconds: float, slices: int) -> list[float]:
    """GiB/s of each ``fn`` (which returns the bytes it moved): after one warm-up call each, ``slices`` rounds in
    which every fn runs for ``seconds / slices`` (order reversed every other round); the median slice of each."""
    for fn in fns:
        fn()
    rates: list[list[float]] = [[] for _ in fns]
    per_slice = seconds / slices
    for s in range(slices):
        order = range(len(fns)) if s % 2 == 0 else range(len(fns) - 1, -1, -1)
        for k in order:
            moved, start = 0, time.perf_counter()
            while True:
                moved += fns[k]()
                elapsed = time.perf_counter() - start
                if elapsed >= per_slice:
                    break
            rates[k].append(moved / elapsed / GIB)
    return [statistics.median(r) for r in rates]


# --- the socket baseline ---------------------------------------------------------------------------------------------
class _RawServer(asyncio.BufferedProtocol):
    """Request: u8 op ('g' get / 'p' put) + u64 n. get: write n bytes from one buffer; put: read n bytes, ack 1 byte."""

    source = memoryview(b"")

    def __init__(self) -> None:
        self.head = bytearray(9)
        self.sink = memoryview(bytearray(1 << 20))
        self.have = 0
        self.put_left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.put_left:
            return self.sink[: min(self.put_left, len(self.sink))]
        return memoryview(self.head)[self.have :]

    def buffer_updated(self, n: int) -> None:
        if self.put_left:
            self.put_left -= n
            if not self.put_left:
                self.transport.write(b"k")  # type: ignore[attr-defined]
            return
        self.have += n
        if self.have < 9:
            return
        self.have = 0
        op, size = struct.unpack("<cQ", self.head)
        if op == b"g":
            self.transport.write(self.source[:size])  # type: ignore[attr-defined]
        else:
            self.put_left = size


async def _raw_server_main(max_bytes: int) -> None:
    _RawServer.source = memoryview(np.random.default_rng(0).integers(0, 256, max_bytes, dtype=np.uint8))
    server = await asyncio.get_running_loop().create_server(_RawServer, "127.0.0.1", 0)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


class RawClient:
    """Blocking socket, ``recv_into`` the destination: the fastest receive loop Python has."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, dst: memoryview) -> int:
        self.sock.sendall(struct.pack("<cQ", b"g", len(dst)))
        pos = 0
        while pos < len(dst):
            pos += self.sock.recv_into(dst[pos:])
        return len(dst)

    def put(self, src: memoryview) -> int:
        self.sock.sendmsg([struct.pack("<cQ", b"p", len(src)), src])
        self.sock.recv(1)
        return len(src)

    def close(self) -> None:
        self.sock.close()


# --- rows ------------------------------------------------------------------------------------------------------------
def row(metric: str, size: int, against: str, value: float, baseline: float, per_call: int) -> dict[str, Any]:
    return {"metric": metric, "size": size, "against": against, "value": round(value, 3),
            "baseline": round(baseline, 3), "ratio": round(value / baseline, 3) if baseline else None,
            "blocks_per_call": per_call}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Blocks:
    """Stored blocks of one size (BLOCKS, or a batch): the spec, their hashes, the bytes put, destination arrays."""

    size: int
    spec: ModelSpec
    hashes: list[bytes]
    data: np.ndarray  # [n, size] uint8
    outs: list[np.ndarray]

    def verify(self, client: Client, what: str) -> None:
        got = client.get_blocks(self.spec, self.hashes)
        for k, g in enumerate(got):
            assert g is not None and np.array_equal(g, self.data[k]), f"{what} get of block {k} differs from its put"


def store_blocks(url: str, size: int, n: int = BLOCKS) -> Blocks:
    spec = spec_for(size)
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    with Client(url, shm=False, pool_size=1, timeout=60) as c:
        hashes = c.block_hashes(spec, rng.integers(0, 32000, n * spec.block_size))
        assert c.put_blocks(spec, hashes, list(data)) == n
    return Blocks(size, spec, hashes, data, [np.zeros(size, dtype=np.uint8) for _ in range(n)])


def socket_rows(url: str, raw_port: int, b: Blocks, seconds: float, slices: int) -> list[dict[str, Any]]:
    cycle = iter(range(1 << 62))
    raw = RawClient(raw_port)
    with Client(url, shm=False, pool_size=1, timeout=60) as tcp:
        def get() -> int:
            k = next(cycle) % BLOCKS
            tcp.get_blocks(b.spec, [b.hashes[k]], [b.outs[k]])
            return b.size

        def put() -> int:
            k = next(cycle) % BLOCKS
            tcp.put_blocks(b.spec, [b.hashes[k]], [b.data[k]], parent=b.hashes[k - 1] if k else None)
            return b.size

        def raw_get() -> int:
            return raw.get(memoryview(b.outs[next(cycle) % BLOCKS]))

        def raw_put() -> int:
            return raw.put(memoryview(b.data[next(cycle) % BLOCKS]))

        get_v, get_b = interleaved([get, raw_get], seconds, slices)
        put_v, put_b = interleaved([put, raw_put], seconds, slices)
        b.verify(tcp, "tcp")
    raw.close()
    return [row("get", b.size, "socket", get_v, get_b, 1), row("put", b.size, "socket", put_v, put_b, 1)]


def batch_rows(url: str, raw_port: int, b: Blocks, seconds: float, slices: int) -> list[dict[str, Any]]:
    """Every block of ``b`` in one GET / one PUT, against the raw server moving their bytes in one request."""
    n = len(b.hashes)
    raw = RawClient(raw_port)
    flat_out = np.zeros(n * b.size, dtype=np.uint8)
    flat_in = b.data.reshape(-1)
    with Client(url, shm=False, pool_size=1, timeout=60) as tcp:
        def get() -> int:
            tcp.get_blocks(b.spec, b.hashes, b.outs)
            return n * b.size

        def put() -> int:
            tcp.put_blocks(b.spec, b.hashes, list(b.data))
            return n * b.size

        get_v, get_b = interleaved([get, lambda: raw.get(memoryview(flat_out))], seconds, slices)
        put_v, put_b = interleaved([put, lambda: raw.put(memoryview(flat_in))], seconds, slices)
        b.verify(tcp, "batched tcp")
    raw.close()
    return [row("get", b.size, "socket", get_v, get_b, n), row("put", b.size, "socket", put_v, put_b, n)]


def shm_rows(url: str, b: Blocks, seconds: float, slices: int, log: Log) -> list[dict[str, Any]]:
    with Client(url, shm=True, pool_size=1, timeout=60) as local:
        if local.transport != "shm":
            log(f"get_shm {b.size}: skipped, the server did not offer shared memory")
            return []
        sources = [blk.copy() for blk in b.data]  # in-process copies of the same bytes, faulted in

        def get_shm() -> int:
            local.get_blocks(b.spec, b.hashes, b.outs)
            return BLOCKS * b.size

        def memcpy() -> int:
            for out, src in zip(b.outs, sources, strict=True):
                np.copyto(out, src)
            return BLOCKS * b.size

        value, baseline = interleaved([get_shm, memcpy], seconds, slices)
        b.verify(local, "shm")
    return [row("get_shm", b.size, "memcpy", value, baseline, BLOCKS)]


def nixl_rows(url: str, b: Blocks, seconds: float, slices: int, log: Log) -> list[dict[str, Any]]:
    cycle = iter(range(1 << 62))
    with Client(url, nixl=True, shm=False, pool_size=1, timeout=60) as nx:
        if nx.transport != "nixl":
            log(f"get_nixl {b.size}: skipped, NIXL is unavailable on the server or here (see the log line above)")
            return []
        with Client(url, shm=False, pool_size=1, timeout=60) as tcp:
            def get(client: Client) -> Callable[[], int]:
                def one() -> int:
                    k = next(cycle) % BLOCKS
                    client.get_blocks(b.spec, [b.hashes[k]], [b.outs[k]])
                    return b.size

                return one

            value, baseline = interleaved([get(nx), get(tcp)], seconds, slices)
        b.verify(nx, "nixl")
    return [row("get_nixl", b.size, "tcp", value, baseline, 1)]


# --- peers -----------------------------------------------------------------------------------------------------------
def kvfabric_rounds(url: str, size: int, count: int, rounds: int) -> tuple[list[float], list[float]]:
    """The peers' round (``bench/peers/rounds.py``) done by kvfabric over TCP: put all ``count`` blocks (timed), get
    them all back (timed), check every byte, delete them; one warm-up round. Per-round put and get GiB/s."""
    spec = spec_for(size)
    rng = np.random.default_rng(size + count)
    data = rng.integers(0, 256, (count, size), dtype=np.uint8)
    outs = [np.zeros(size, dtype=np.uint8) for _ in range(count)]
    puts, gets = [], []
    with Client(url, shm=False, pool_size=1, timeout=120) as c:
        hashes = c.block_hashes(spec, rng.integers(0, 32000, count * spec.block_size))
        for index in range(rounds + 1):
            t0 = time.perf_counter()
            assert c.put_blocks(spec, hashes, list(data)) == count
            t1 = time.perf_counter()
            got = c.get_blocks(spec, hashes, outs)
            t2 = time.perf_counter()
            assert all(g is not None and np.array_equal(g, d) for g, d in zip(got, data, strict=True)), \
                "kvfabric round: a fetched block differs from its put"
            c.delete(spec, hashes)
            if index:
                puts.append(size * count / (t1 - t0) / GIB)
                gets.append(size * count / (t2 - t1) / GIB)
    return puts, gets


def peer_rows(url: str, size: int, count: int, rounds: int, peers: Sequence[str], log: Log) -> list[dict[str, Any]]:
    """kvfabric get/put against each peer, with kvfabric's rounds run right before and after the peer's."""
    if not peers:
        return []
    from bench.peers import lmcache_peer, mooncake_peer, redis_peer
    from bench.peers.processes import BENCH_VENV, INSTALL_HINT
    from bench.peers.result import PeerUnavailableError

    if not (BENCH_VENV / "bin" / "python").exists():
        log(f"{'/'.join(peers)} rows skipped: {BENCH_VENV} is missing ({INSTALL_HINT})")
        return []
    measures = {"redis": redis_peer.measure, "mooncake": mooncake_peer.measure, "lmcache": lmcache_peer.measure}
    rows = []
    for name in peers:
        before = kvfabric_rounds(url, size, count, rounds)
        try:
            peer = measures[name](size, count, rounds)
        except (PeerUnavailableError, ValueError) as exc:
            log(f"{name} {size}: skipped: {exc}")
            continue
        after = kvfabric_rounds(url, size, count, rounds)
        if not peer.verified:
            log(f"{name} {size}: skipped: its fetched bytes did not match what it stored")
            continue
        put_v = statistics.median(before[0] + after[0])
        get_v = statistics.median(before[1] + after[1])
        rows.append(row("get", size, name, get_v, peer.get_gibps, count))
        rows.append(row("put", size, name, put_v, peer.put_gibps, count))
    return rows


# --- main ------------------------------------------------------------------------------------------------------------
def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'metric':<9} {'size':>7} {'against':<9} {'GiB/s':>7} {'baseline':>9} {'ratio':>6} {'blocks/call':>12}")
    for r in rows:
        size = f"{r['size'] >> 20}MiB" if r["size"] >= 1 << 20 else f"{r['size'] >> 10}KiB"
        print(f"{r['metric']:<9} {size:>7} {r['against']:<9} {r['value']:>7.2f} {r['baseline']:>9.2f} "
              f"{r['ratio']:>6.2f} {r['blocks_per_call']:>12}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--sizes", default="16MiB,1MiB", help="comma-separated block sizes (default 16MiB,1MiB)")
    parser.add_argument("--batch-sizes", default="256KiB,64KiB",
                        help="block sizes of the batched rows, '' for none (default 256KiB,64KiB)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=64, help="blocks per request in the batched rows (default 64)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time per figure in the socket / memcpy / tcp comparisons (default 2)")  # fmt: skip
    parser.add_argument("--slices", type=int, default=10, help="alternating slices per comparison (default 10)")
    parser.add_argument("--count", type=int, default=0,
                        help=f"blocks per peer round (default {PEER_ROUND_BYTES >> 20} MiB worth, at least {BLOCKS})")
    parser.add_argument("--rounds", type=int, default=3, help="timed peer rounds after a warm-up (default 3)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"peers to compare with: {','.join(PEERS)} or none")
    parser.add_argument("--raw-server", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        import uvloop

        uvloop.run(_raw_server_main(args.raw_server))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    batch_sizes = [parse_size(s) for s in args.batch_sizes.split(",") if s.strip()]
    peers = [] if args.peers.strip() in ("", "none") else [p.strip() for p in args.peers.split(",")]
    if unknown := set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def count_for(size: int) -> int:
        return args.count or max(BLOCKS, PEER_ROUND_BYTES // size)

    ram = (sum(BLOCKS * s for s in sizes) + sum(args.batch * s for s in batch_sizes)
           + (max(count_for(s) * s for s in sizes) if peers else 0) + (256 << 20))  # fmt: skip
    serve = [sys.executable, "-m", "kvfabric", "serve", "--port", "0", "--ram-bytes", str(ram), "--log-level",
             "WARNING"]  # fmt: skip
    raw_bytes = max([*sizes, *(args.batch * s for s in batch_sizes)])
    raw = [sys.executable, str(Path(__file__).resolve()), "--raw-server", str(raw_bytes)]
    log(f"load average at start: {load()}")
    rows: list[dict[str, Any]] = []
    with child(serve) as port, child(raw) as raw_port:
        url = f"kvfabric://127.0.0.1:{port}"
        stored = {}
        for size in sizes:
            stored[size] = b = store_blocks(url, size)
            rows += socket_rows(url, raw_port, b, args.seconds, args.slices)
            rows += shm_rows(url, b, args.seconds, args.slices, log)
            rows += peer_rows(url, size, count_for(size), args.rounds, peers, log)
        for size in batch_sizes:
            rows += batch_rows(url, raw_port, store_blocks(url, size, args.batch), args.seconds, args.slices)
        for size in sizes:
            rows += nixl_rows(url, stored[size], args.seconds, args.slices, log)
    log(f"load average at end: {load()}")
    order = ["get", "put", "get_shm", "get_nixl"]
    batched = lambda r: r["metric"] in ("get", "put") and r["blocks_per_call"] > 1  # noqa: E731
    rows.sort(key=lambda r: (batched(r), -r["size"], order.index(r["metric"])))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
