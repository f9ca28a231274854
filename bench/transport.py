"""Data-plane bandwidth: ``kvfabric serve`` (RAM tier, separate process) against baselines measured in the same run.

Rows (GiB/s; ratio = value / baseline):
  get, put          TCP client in this process  vs  socket: a raw asyncio (uvloop) server process moving the same
                    bytes per request into the same preallocated buffers (the TCP limit)
  get               vs redis / mooncake / lmcache, through bench/peers when that package is present
  get_nixl          NIXL one-sided reads        vs  tcp (the get row)
  get_shm           same-host shared memory     vs  memcpy: an in-process copy of the same bytes

Every block fetched is compared with what was put (outside the timed loop).

    python bench/transport.py [--json] [--sizes 16MiB,1MiB] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvfabric.client import Client
from kvfabric.spec import DType, ModelSpec

GIB = 1 << 30
BLOCKS_PER_SIZE = 4


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB|)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


def spec_for(nbytes: int) -> ModelSpec:
    """A Llama-3-8B-like shard (32 layers, 8 KV heads x 128, bf16) whose block_size makes a block ``nbytes``."""
    per_token = 32 * 2 * 8 * 128 * 2
    if nbytes % per_token:
        raise ValueError(f"block size must be a multiple of {per_token} bytes")
    return ModelSpec(model="bench/llama-like", num_layers=32, kv_heads=8, head_dim=128, dtype=DType.BFLOAT16,
                     block_size=nbytes // per_token)  # fmt: skip


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@contextmanager
def child(args: list[str]) -> Iterator[int]:
    """A child process that prints ``listening on HOST:PORT``; yields the port."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"listening on [\d.]+:(\d+)", line):
                break
        else:
            raise RuntimeError(f"{args[:4]} exited before listening (code {proc.wait()})")
        yield int(m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def rate(fn: Callable[[], int], seconds: float) -> float:
    """GiB/s of ``fn`` (which returns bytes moved) repeated for about ``seconds`` after one warm-up call."""
    fn()
    moved, start = 0, time.perf_counter()
    while True:
        moved += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return moved / elapsed / GIB


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


# --- rows ------------------------------------------------------------------------------------------------------------
def row(metric: str, size: int, against: str, value: float, baseline: float) -> dict[str, object]:
    return {"metric": metric, "size": size, "against": against, "value": round(value, 3),
            "baseline": round(baseline, 3), "ratio": round(value / baseline, 3) if baseline else None}  # fmt: skip


def bench_size(url: str, raw_port: int, size: int, seconds: float, log: Callable[[str], None]) -> list[dict]:
    spec = spec_for(size)
    rng = np.random.default_rng(size)
    tokens = rng.integers(0, 32000, BLOCKS_PER_SIZE * spec.block_size)
    blocks = rng.integers(0, 256, (BLOCKS_PER_SIZE, size), dtype=np.uint8)
    out = np.zeros(size, dtype=np.uint8)
    rows = []
    with Client(url, shm=False, pool_size=1, timeout=60) as tcp:
        hashes = tcp.block_hashes(spec, tokens)
        tcp.put_blocks(spec, hashes, list(blocks))
        i = iter(range(1 << 62))

        def get_tcp() -> int:
            k = next(i) % BLOCKS_PER_SIZE
            tcp.get_blocks(spec, [hashes[k]], [out])
            return size

        def put_tcp() -> int:
            k = next(i) % BLOCKS_PER_SIZE
            tcp.put_blocks(spec, [hashes[k]], [blocks[k]], parent=hashes[k - 1] if k else None)
            return size

        raw = RawClient(raw_port)
        dst = memoryview(out)
        get_v, get_b = rate(get_tcp, seconds), rate(lambda: raw.get(dst), seconds)
        rows.append(row("get", size, "socket", get_v, get_b))
        put_v, put_b = rate(put_tcp, seconds), rate(lambda: raw.put(memoryview(blocks[0])), seconds)
        rows.append(row("put", size, "socket", put_v, put_b))
        for k, h in enumerate(hashes):  # bytes verified
            got = tcp.get_blocks(spec, [h])[0]
            assert got is not None and np.array_equal(got, blocks[k]), f"tcp get of block {k} differs from its put"
        rows += peer_rows(spec, blocks, get_v, size, seconds, log)

        with Client(url, shm=True, pool_size=1, timeout=60) as shm:
            if shm.transport != "shm":
                log("get_shm skipped: the server did not offer shared memory")
            else:
                def get_shm() -> int:
                    shm.get_blocks(spec, [hashes[next(i) % BLOCKS_PER_SIZE]], [out])
                    return size

                src = blocks[0].copy()

                def memcpy() -> int:
                    np.copyto(out, src)
                    return size

                rows.append(row("get_shm", size, "memcpy", rate(get_shm, seconds), rate(memcpy, seconds)))
                for k, h in enumerate(hashes):
                    got = shm.get_blocks(spec, [h])[0]
                    assert got is not None and np.array_equal(got, blocks[k]), f"shm get of block {k} differs"

        with Client(url, nixl=True, shm=False, pool_size=1, timeout=60) as nx:
            if nx.transport != "nixl":
                log("get_nixl skipped: NIXL unavailable on the server or here (see the log line above)")
            else:
                def get_nixl() -> int:
                    nx.get_blocks(spec, [hashes[next(i) % BLOCKS_PER_SIZE]], [out])
                    return size

                rows.append(row("get_nixl", size, "tcp", rate(get_nixl, seconds), rate(get_tcp, seconds)))
                for k, h in enumerate(hashes):
                    got = nx.get_blocks(spec, [h])[0]
                    assert got is not None and np.array_equal(got, blocks[k]), f"nixl get of block {k} differs"
    return rows


def peer_rows(spec: ModelSpec, blocks: np.ndarray, get_tcp: float, size: int, seconds: float,
              log: Callable[[str], None]) -> list[dict]:  # fmt: skip
    """TCP get against each peer system, through the peers helper's runners (``bench/peers``)."""
    if importlib.util.find_spec("bench.peers") is None:
        log("redis / mooncake / lmcache rows skipped: bench/peers is not in this checkout")
        return []
    from bench import peers

    rows = []
    for name in ("redis", "mooncake", "lmcache"):
        runner = getattr(peers, "get_rate", None)
        if runner is None:
            log(f"{name} row skipped: bench.peers has no get_rate(name, blocks, seconds)")
            continue
        try:
            peer = runner(name, blocks, seconds)
        except Exception as exc:  # a peer that is not installed or cannot start is reported and skipped
            log(f"{name} row skipped: {exc}")
            continue
        rows.append(row("get", size, name, get_tcp, peer))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--sizes", default="16MiB,1MiB", help="comma-separated block sizes")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--raw-server", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        import uvloop

        uvloop.run(_raw_server_main(args.raw_server))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    ram = max(sizes) * BLOCKS_PER_SIZE * 4 + (256 << 20)
    serve = [sys.executable, "-m", "kvfabric", "serve", "--port", "0", "--ram-bytes", str(ram), "--log-level",
             "WARNING"]  # fmt: skip
    raw = [sys.executable, str(Path(__file__).resolve()), "--raw-server", str(max(sizes))]
    rows = []
    with child(serve) as port, child(raw) as raw_port:
        for size in sizes:
            rows += bench_size(f"kvfabric://127.0.0.1:{port}", raw_port, size, args.seconds, log)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'metric':<10} {'size':>9} {'against':<9} {'GiB/s':>8} {'base GiB/s':>11} {'ratio':>6}")
        for r in rows:
            print(f"{r['metric']:<10} {r['size'] >> 20:>6}MiB {r['against']:<9} {r['value']:>8.2f} "
                  f"{r['baseline']:>11.2f} {r['ratio']:>6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
