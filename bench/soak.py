"""Soak: a well-behaved client's latency under each hostile load, next to its quiet latency, and the server's memory.

One real ``kvfabric serve`` on the chaos configuration (``tests/chaos/harness.py``: 128 MiB RAM tier, 16 MiB frames,
256 MiB in-flight budget, handshake deadline 2 s, frame deadline 3 s). A well-behaved client (put one 128 KiB block,
read it back, check it, 10 ms pause) runs through every phase; each phase runs one load beside it for ``--seconds``:

| phase | load |
|---|---|
| quiet | nothing: the baseline |
| clients64 | 64 more clients doing the same put / get loop (their own p50/p99 are reported too) |
| preauth_4mib | connections whose first header declares a 4 MiB body before HELLO, 50 at a time, over and over |
| slowloris | 200 connections holding a partial HELLO until the deadline drops them, reopened |
| giant_gets | 2 connections sending the largest GETs within the limits (65,536 reply views each) |
| partial_puts | 4 connections sending half of a 16 MiB PUT and stalling, over and over |
| admin_bodies | admin API POSTs declaring 200 MB bodies with a forged token, over and over |

Every acknowledged block of the well-behaved client is read back and compared at the end. RSS is the server's
private memory (``RssAnon``: the RAM arena is shared memory), sampled every 100 ms.

    python bench/soak.py --json           # JSON lines (metric, size = phase, against, value, baseline, ratio)
    python bench/soak.py --seconds 20     # a readable table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvfabric.client import Client
from kvfabric.transport import frames as fr
from tests.chaos.harness import (
    HOSTILE,
    MAX_BATCH,
    MAX_FRAME_BYTES,
    SPEC,
    STEADY,
    Node,
    Steady,
    raise_own_descriptor_limit,
    start_node,
)
from tests.transport.wire import connect, hello, read_frame

Load = Callable[[Node, threading.Event, dict[str, object]], None]


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def _until(stop: threading.Event, body: Callable[[], None]) -> None:
    while not stop.is_set():
        body()


def quiet(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    stop.wait()


def clients64(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    puts: list[float] = []
    gets: list[float] = []
    errors: list[str] = []

    def one(worker: int) -> None:
        rng = np.random.default_rng(worker)
        with Client(node.url, token=STEADY, shm=False, pool_size=1, timeout=60) as c:
            seed = 0
            while not stop.is_set():
                seed += 1
                tokens = np.random.default_rng((worker, seed)).integers(0, 32000, size=SPEC.block_size)
                data = rng.integers(0, 256, size=(1, SPEC.block_nbytes), dtype=np.uint8)
                try:
                    t0 = time.perf_counter()
                    c.put(SPEC, tokens, data)
                    t1 = time.perf_counter()
                    got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))[0]
                    t2 = time.perf_counter()
                    puts.append(t1 - t0)
                    gets.append(t2 - t1)
                    if got is None or not np.array_equal(got, data[0]):
                        errors.append(f"worker {worker} block {seed} came back wrong")
                except Exception as exc:  # noqa: BLE001  # any failure an engine would see counts
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(w,), daemon=True) for w in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.update(put_ms=(_ms(puts, 50), _ms(puts, 99)), get_ms=(_ms(gets, 50), _ms(gets, 99)),
               ops=len(puts) + len(gets), errors=len(errors))  # fmt: skip


def _waves(node: Node, stop: threading.Event, n: int, opening: Callable[[socket.socket], None]) -> None:
    """Until ``stop``: open ``n`` connections, send each its ``opening``, wait for the server's answer (an ERROR at
    once or at a deadline; a closed connection counts too), close them all, and again."""
    while not stop.is_set():
        socks = [connect(node.port, timeout=15) for _ in range(n)]
        for s in socks:
            opening(s)
        for s in socks:
            with contextlib.suppress(OSError):
                read_frame(s)
            s.close()


def preauth_4mib(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    header = fr.HEADER.pack(fr.MAGIC, 1, fr.OP_HELLO, 4 << 20, 1, 0) + b"\x00" * 1000
    _waves(node, stop, 50, lambda s: s.sendall(header))


def slowloris(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    partial = fr.HEADER.pack(fr.MAGIC, 1, fr.OP_HELLO, 8 << 10, 1, 0) + b"\x94" * 64
    _waves(node, stop, 200, lambda s: s.sendall(partial))  # each held until the handshake deadline


def _hostile_hash(node: Node) -> bytes:
    with Client(node.url, token=HOSTILE, shm=False) as c:
        words = np.arange(SPEC.block_size)
        c.put(SPEC, words, np.zeros((1, SPEC.block_nbytes), np.uint8))
        return c.block_hashes(SPEC, words)[0]


def giant_gets(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    h = _hostile_hash(node)
    views = fr.MAX_REPLY_VIEWS
    shapes = [([h] * (views // 16384), 16384), ([h] * MAX_BATCH, views // MAX_BATCH)]

    def hammer(hashes: list[bytes], chunks: int) -> None:
        with connect(node.port, timeout=60) as s:
            hello(s, HOSTILE)
            i = 0
            while not stop.is_set():
                i += 1
                s.sendall(fr.encode_get(i, SPEC.fingerprint(), hashes, chunks))
                read_frame(s)

    threads = [threading.Thread(target=hammer, args=shape, daemon=True) for shape in shapes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def partial_puts(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    n_blocks = MAX_FRAME_BYTES // SPEC.block_nbytes
    with Client(node.url, token=HOSTILE, shm=False) as c:
        c.register_model(SPEC)
        hashes = c.block_hashes(SPEC, np.arange(n_blocks * SPEC.block_size))
    meta = fr.WireMeta(hashes[0], SPEC.dtype, SPEC.block_shape, SPEC.block_size)
    put = fr.encode_put(2, SPEC.fingerprint(), [fr.PutItem(h, meta) for h in hashes])

    def stall(s: socket.socket) -> None:  # half a PUT, then nothing until the frame deadline
        hello(s, HOSTILE)
        s.sendall(put)
        s.sendall(b"\x07" * (MAX_FRAME_BYTES // 2))

    _waves(node, stop, 4, stall)


def admin_bodies(node: Node, stop: threading.Event, out: dict[str, object]) -> None:
    host, port = node.admin.removeprefix("http://").split(":")
    head = (b"POST /v1/evict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer forged\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n\r\n{")  # fmt: skip

    def one() -> None:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head)
            while s.recv(65536):
                pass

    _until(stop, one)


PHASES: dict[str, Load] = {f.__name__: f for f in
                           (quiet, clients64, preauth_4mib, slowloris, giant_gets, partial_puts, admin_bodies)}  # fmt: skip


def run_phase(node: Node, name: str, seconds: float) -> dict[str, object]:
    out: dict[str, object] = {}
    stop = threading.Event()
    rss: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            rss.append(node.anon_rss_mib())
            sampling.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    start_rss = node.anon_rss_mib()
    sampler.start()
    steady = Steady(node)
    steady.start()
    load = threading.Thread(target=PHASES[name], args=(node, stop, out), daemon=True)
    load.start()
    time.sleep(seconds)
    stop.set()
    load.join(60)
    steady.stop()
    time.sleep(1.0)  # let memory settle before the end sample
    sampling.set()
    sampler.join()
    steady.verify_all()
    out.update(steady_p50_ms=_ms(steady.latencies, 50), steady_p99_ms=_ms(steady.latencies, 99),
               steady_ops=len(steady.latencies), steady_errors=len(steady.errors), alive=node.alive(),
               rss_start_mib=start_rss, rss_peak_mib=max(rss), rss_end_mib=node.anon_rss_mib())  # fmt: skip
    return out


def _row(metric: str, phase: str, against: str, value: float, baseline: float, ratio: bool = True) -> dict[str, object]:
    return {"metric": metric, "size": phase, "against": against, "value": round(value, 2),
            "baseline": round(baseline, 2), "ratio": round(value / baseline, 2) if ratio and baseline else None}  # fmt: skip


def rows(results: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    quiet = results["quiet"]
    out: list[dict[str, object]] = []
    for phase, r in results.items():
        num = {k: float(v) for k, v in r.items() if isinstance(v, int | float)}  # type: ignore[arg-type]
        q = {k: float(v) for k, v in quiet.items() if isinstance(v, int | float)}  # type: ignore[arg-type]
        out.append(_row("steady_p99_ms", phase, "quiet", num["steady_p99_ms"], q["steady_p99_ms"]))
        out.append(_row("steady_p50_ms", phase, "quiet", num["steady_p50_ms"], q["steady_p50_ms"]))
        out.append(_row("steady_errors", phase, "none", num["steady_errors"], 0, ratio=False))
        out.append(_row("rss_peak_mib", phase, "start", num["rss_peak_mib"], num["rss_start_mib"]))
        out.append(_row("rss_end_mib", phase, "start", num["rss_end_mib"], num["rss_start_mib"]))
        for op in ("put", "get"):
            if f"{op}_ms" in r:
                p50, p99 = r[f"{op}_ms"]  # type: ignore[misc]
                out.append(_row(f"clients64_{op}_p99_ms", phase, "p50", p99, p50))
        if "errors" in r:
            out.append(_row("clients64_errors", phase, "none", num["errors"], 0, ratio=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--seconds", type=float, default=8.0, help="how long each phase's load runs (default 8)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {', '.join(PHASES)}")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    if "quiet" not in phases:
        phases.insert(0, "quiet")
    unknown = set(phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    raise_own_descriptor_limit()
    print(f"load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kvf-soak-") as tmp:
        node = start_node(Path(tmp))
        try:
            results = {name: run_phase(node, name, args.seconds) for name in phases}
        finally:
            node.stop()
    print(f"load average at end: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    table = rows(results)
    if args.json:
        for row in table:
            print(json.dumps(row))
    else:
        print(f"{'metric':<24} {'phase':<14} {'against':<8} {'value':>10} {'baseline':>10} {'ratio':>7}")
        for r in table:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
            print(f"{r['metric']:<24} {r['size']:<14} {r['against']:<8} {r['value']!s:>10} {r['baseline']!s:>10} "
                  f"{ratio:>7}")  # fmt: skip
    bad = [n for n, r in results.items() if r["steady_errors"] or not r["alive"]]
    if bad:
        print(f"the well-behaved client saw errors or the server died in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
