"""GPU check: canonical KV blocks through ``kvfabric serve`` into CUDA tensors, in each vLLM GPU layout.

    python bench/gpu/check.py [--dry-run] [--json] [--blocks N] [--block-mib M]

On a CUDA host (H100/H200, CUDA PyTorch, no network) it starts ``kvfabric serve`` and:

1. correctness: for each layout vLLM hands a GPU connector (FlashAttention NHD/HND, the cross-layer BLHNC, MLA
   latent) it fills a CUDA cache, gathers canonical blocks, puts them, reads them back over TCP, shared memory and
   (when its wheel is present) NIXL, scatters them into a cache of *another* layout on the GPU through the
   connector's staging path (pinned buffers, side stream, per-layer events), and compares every byte on the GPU;
2. speed: GiB/s of each path into CUDA memory against a pinned host-to-device copy of the same bytes measured in
   the same run (and TCP against a raw local socket; kvikio reads of the fabric's disk segments against a raw
   kvikio read of a file of the same size).

Prints JSON lines (``--json``: metric, size, against, value, baseline, ratio) or a table. Without CUDA it says so
and exits 0 with ``--dry-run`` (1 without). Bounded: every wait has a timeout; ``check.sh`` caps the run at 470 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# KVCacheLayout stride orders (physical order of the logical axes L, B, H, N, C), as vLLM 0.32 defines them.
LAYOUT_ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4),
}  # fmt: skip
# (name, split, source layout, destination layout): each case loads into a layout other than the one that saved.
CASES = (
    ("flash-nhd->hnd", "kv_concat", "LBNHC", "LBHNC"),
    ("flash-hnd->nhd", "kv_concat", "LBHNC", "LBNHC"),
    ("flash-nhd->cross-layer", "kv_concat", "LBNHC", "BLHNC"),
    ("cross-layer->flash-nhd", "kv_concat", "BLNHC", "LBNHC"),
    ("mla-latent", "latent", "LBHNC", "BLHNC"),
)
READY = re.compile(r"listening on ([^\s:]+):(\d+)")
TOKEN = "gpu-check"
GIB = float(1 << 30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check the environment and plan, move nothing")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--blocks", type=int, default=32, help="blocks per speed measurement")
    parser.add_argument("--block-mib", type=int, default=16, help="MiB per block for the speed measurements")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (best kept)")
    parser.add_argument("--cpu-selftest", action="store_true", help="run the correctness cases on CPU tensors (tests)")
    args = parser.parse_args(argv)
    report = Report(args.json)

    try:
        import torch
    except ImportError:
        report.note("torch is not installed: nothing to check")
        return 0 if args.dry_run else 1

    if args.cpu_selftest:
        with tempfile.TemporaryDirectory(prefix="kvfabric-gpu-") as tmp, serve(Path(tmp) / "fabric", nixl=False) as url:
            for case in CASES:
                for transport in ("tcp", "shm"):
                    check_case(report, url, torch.device("cpu"), case, transport)
        return 1 if report.failures else 0
    cuda = torch.cuda.is_available()
    extras = {name: _importable(name) for name in ("nixl", "kvikio", "vllm")}
    if args.dry_run or not cuda:
        device = torch.cuda.get_device_name(0) if cuda else "none"
        report.note(
            f"{'dry run' if args.dry_run else 'environment'}: CUDA {'available on ' + device if cuda else 'not available (no CUDA device or CPU torch)'}; "
            f"torch {torch.__version__}; optional: {', '.join(f'{k}={v}' for k, v in extras.items())}; "
            f"would check {', '.join(c[0] for c in CASES)} over tcp, shm{', nixl' if extras['nixl'] else ''} and "
            f"time {args.blocks} x {args.block_mib} MiB blocks"
        )
        if not cuda:
            report.note("no CUDA: nothing moved" + ("" if args.dry_run else " (run with --dry-run to exit 0)"))
            return 0 if args.dry_run else 1
        return 0

    device = torch.device("cuda", 0)
    report.device = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="kvfabric-gpu-") as tmp, serve(Path(tmp) / "fabric",
                                                                          nixl=extras["nixl"]) as url:  # fmt: skip
        transports = ["tcp", "shm"] + (["nixl"] if extras["nixl"] else [])
        for case in CASES:
            for transport in transports:
                check_case(report, url, device, case, transport)
        speed(report, url, device, transports, args.blocks, args.block_mib << 20, args.repeat)
        if extras["kvikio"]:
            kvikio_reads(report, Path(tmp), device, args.block_mib << 20, args.repeat)
        else:
            report.note("kvikio not installed: GPUDirect Storage reads skipped")
    return 1 if report.failures else 0


# --- the server ---------------------------------------------------------------------------------------------------
@contextmanager
def serve(data_dir: Path, *, nixl: bool, ram_bytes: int = 3 << 30) -> Iterator[str]:
    """``kvfabric serve`` on a free port, stopped (SIGTERM, then SIGKILL) when the block exits."""
    data_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [
        sys.executable, "-m", "kvfabric", "serve", "--data-dir", str(data_dir), "--port", "0",
        "--ram-bytes", str(ram_bytes), "--token", f"{TOKEN}=gpu", "--log-level", "WARNING",
        *([] if nixl else ["--no-nixl"]),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    port: list[int] = []
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not port and (m := READY.search(line)):
                port.append(int(m.group(2)))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not port and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        if not port:
            raise RuntimeError(f"kvfabric serve did not come up: {''.join(lines)[-2000:]}")
        yield f"kvfabric://127.0.0.1:{port[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(url: str, transport: str) -> Any:
    from kvfabric.client import Client

    return Client(url, token=TOKEN, timeout=60.0, shm=transport == "shm", nixl=transport == "nixl")


# --- correctness --------------------------------------------------------------------------------------------------
def make_caches(physical: str, layers: int, blocks: int, cell: tuple[int, int, int], dtype: Any, device: Any) -> list:
    """Per-layer logical ``[B, H, N, C]`` views of one allocation in ``physical`` order, as vLLM allocates them."""
    import torch

    order = LAYOUT_ORDERS[physical]
    logical = (layers, blocks, *cell)
    raw = torch.empty([logical[d] for d in order], dtype=dtype, device=device)
    view = raw.permute(*[order.index(d) for d in range(5)])
    return [view[i] for i in range(layers)]


def check_case(report: Report, url: str, device: Any, case: tuple[str, str, str, str], transport: str) -> None:
    import torch

    from kvfabric.client.vllm.layouts import ContentSplit, PagedLayout, stack_layers
    from kvfabric.client.vllm.staging import DeviceStaging
    from kvfabric.spec import LATENT_LAYOUT, LAYOUTS, DType, ModelSpec

    name, split_name, src_layout, dst_layout = case
    latent = split_name == "latent"
    layers, blocks, heads, bs, dim = 4, 64, 1 if latent else 8, 16, 576 if latent else 128
    spec = ModelSpec(f"gpu-check-{name}", layers, heads, dim, DType.BFLOAT16, bs,
                     layout=LATENT_LAYOUT if latent else LAYOUTS[0])  # fmt: skip
    split = ContentSplit(split_name)

    def layout(physical: str) -> PagedLayout:
        return PagedLayout("check", split, physical, heads, bs, dim, LAYOUT_ORDERS[physical][0] == 1)

    src_l, dst_l = layout(src_layout), layout(dst_layout)
    cell = src_l.expected_cell()
    src = make_caches(src_layout, layers, blocks, cell, torch.bfloat16, device)
    for c in src:
        c.copy_(torch.randn(c.shape, device=device, dtype=torch.bfloat16))
    ids = [7, 3, 40, 12]
    staging = DeviceStaging(device)
    host = staging.host("save", (len(ids), *spec.block_shape), torch.bfloat16)
    for layer, cache in enumerate(src):
        tmp = torch.empty((len(ids), *src_l.layer_shape), dtype=torch.bfloat16, device=device)
        src_l.gather(cache, ids, tmp)
        event = staging.gather_to_host(lambda t=tmp: t, host[:, layer])
        if event is not None:
            event.synchronize()
    tokens = list(range(1000 * (CASES.index(case) + 1), 1000 * (CASES.index(case) + 1) + len(ids) * bs))
    started = time.perf_counter()
    with client(url, transport) as c:
        c.register_model(spec)
        hashes = c.block_hashes(spec, tokens)
        c.put_blocks(spec, hashes, [host[i] for i in range(len(ids))])
        got_host = staging.host("load", (len(ids), *spec.block_shape), torch.bfloat16)
        got_host.zero_()
        got = c.get_blocks(spec, hashes, [got_host[i] for i in range(len(ids))])
        direct = torch.zeros((len(ids), *spec.block_shape), dtype=torch.bfloat16, device=device)
        c.get_blocks(spec, hashes, [direct[i] for i in range(len(ids))])  # the client's own CUDA destination path
        used = c.transport
    dst = make_caches(dst_layout, layers, blocks, cell, torch.bfloat16, device)
    for d in dst:
        d.zero_()
    stacked = stack_layers(dst) if dst_l.cross_layer else None
    dst_ids = [1, 2, 50, 63]
    if stacked is not None:
        staging.scatter_async(-1, lambda s: dst_l.scatter_all(stacked, dst_ids, s), got_host)
        staging.wait_layer(-1)
    else:
        for layer, cache in enumerate(dst):
            staging.scatter_async(layer, lambda s, cache=cache: dst_l.scatter(cache, dst_ids, s), got_host[:, layer])
            staging.wait_layer(layer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ok = all(g is not None for g in got) and used == transport
    for layer in range(layers):
        a = torch.empty((len(ids), *src_l.layer_shape), dtype=torch.bfloat16, device=device)
        b = torch.empty_like(a)
        src_l.gather(src[layer], ids, a)
        dst_l.gather(dst[layer], dst_ids, b)
        ok = ok and torch.equal(a, b) and torch.equal(direct[:, layer], a)
    report.check(f"{name} over {transport}", ok, time.perf_counter() - started, f"transport used: {used}")


# --- speed --------------------------------------------------------------------------------------------------------
def best_gibs(nbytes: int, repeat: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return nbytes / GIB / best


def speed(report: Report, url: str, device: Any, transports: list[str], n: int, block_bytes: int, repeat: int) -> None:
    import torch

    from kvfabric.spec import DType, ModelSpec

    # [layers, 2, block_size, kv_heads, head_dim] bf16 = 32 * 2 * 256 * 8 * head_dim * 2 bytes
    head_dim = block_bytes // (32 * 2 * 256 * 8 * 2)
    spec = ModelSpec("gpu-check-speed", 32, 8, head_dim, DType.BFLOAT16, 256)
    total = n * spec.block_nbytes
    size = f"{n}x{spec.block_nbytes >> 20}MiB"
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    pinned.random_(0, 256)
    dev = torch.empty(total, dtype=torch.uint8, device=device)

    def h2d() -> None:
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize(device)

    base = best_gibs(total, repeat, h2d)
    report.row("pinned_h2d", size, "-", base, None)
    tokens = list(range(n * spec.block_size))
    blocks = [pinned[i * spec.block_nbytes : (i + 1) * spec.block_nbytes] for i in range(n)]
    with client(url, "tcp") as c:
        c.register_model(spec)
        hashes = c.block_hashes(spec, tokens)
        c.put_blocks(spec, hashes, blocks)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    outs_host = [host[i * spec.block_nbytes : (i + 1) * spec.block_nbytes] for i in range(n)]
    outs_dev = [dev[i * spec.block_nbytes : (i + 1) * spec.block_nbytes] for i in range(n)]
    stream = torch.cuda.Stream(device)
    for transport in transports:
        with client(url, transport) as c:
            c.get_blocks(spec, hashes[:1], outs_host[:1])  # connect, map the arena

            def staged(step: int = 4) -> None:
                """The connector's path, pipelined: ``step`` blocks into reused pinned memory, then their async
                H2D on a side stream while the next ``step`` blocks arrive."""
                for lo in range(0, n, step):
                    got = c.get_blocks(spec, hashes[lo : lo + step], outs_host[lo : lo + step])
                    assert all(g is not None for g in got)
                    span = slice(lo * spec.block_nbytes, min(n, lo + step) * spec.block_nbytes)
                    with torch.cuda.stream(stream):
                        dev[span].copy_(host[span], non_blocking=True)
                stream.synchronize()

            def direct() -> None:  # the client's CUDA destination path
                got = c.get_blocks(spec, hashes, outs_dev)
                assert all(g is not None for g in got)
                torch.cuda.synchronize(device)

            report.row(f"fabric_{transport}_to_gpu_staged", size, "pinned_h2d", best_gibs(total, repeat, staged), base)
            report.row(f"fabric_{transport}_to_gpu_direct", size, "pinned_h2d", best_gibs(total, repeat, direct), base)
            report.check(f"speed run bytes over {transport}", torch.equal(dev, pinned.to(device)), 0.0, "")
    raw = raw_socket_gibs(total, repeat)
    with client(url, "tcp") as c:
        tcp = best_gibs(total, repeat, lambda: c.get_blocks(spec, hashes, outs_host))
    report.row("fabric_tcp_to_host", size, "raw_socket", tcp, raw)


def raw_socket_gibs(total: int, repeat: int) -> float:
    """A loopback TCP socket moving ``total`` bytes into a preallocated buffer (the TCP ceiling on this host)."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (total >> 20))
    sink = bytearray(total)

    def once() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        sender = threading.Thread(target=lambda: _send_all(port, payload), daemon=True)
        sender.start()
        conn, _ = server.accept()
        view, got = memoryview(sink), 0
        while got < total:
            n = conn.recv_into(view[got:], min(total - got, 16 << 20))
            if n == 0:
                raise RuntimeError("raw socket closed early")
            got += n
        conn.close()
        server.close()
        sender.join(60)

    return best_gibs(total, repeat, once)


def _send_all(port: int, payload: memoryview) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(payload)


def kvikio_reads(report: Report, tmp: Path, device: Any, block_bytes: int, repeat: int) -> None:
    """GPUDirect Storage reads of the fabric's disk segments against a raw kvikio read of a plain file."""
    import kvikio
    import torch

    data = tmp / "fabric"
    segments = sorted((p for p in data.rglob("*") if p.is_file() and p.stat().st_size >= block_bytes),
                      key=lambda p: p.stat().st_size)  # fmt: skip
    if not segments:
        report.note("kvikio: no disk segment of a block's size or more under the data dir; skipped")
        return
    seg = segments[-1]
    size = seg.stat().st_size
    plain = tmp / "plain.bin"
    plain.write_bytes(os.urandom(1 << 20) * max(1, size >> 20))
    buf = torch.empty(max(size, plain.stat().st_size), dtype=torch.uint8, device=device)

    def read(path: Path) -> Callable[[], None]:
        def run() -> None:
            with kvikio.CuFile(str(path), "r") as f:
                f.read(buf[: path.stat().st_size])
            torch.cuda.synchronize(device)

        return run

    raw = best_gibs(plain.stat().st_size, repeat, read(plain))
    seg_rate = best_gibs(size, repeat, read(seg))
    read(seg)()
    ok = torch.equal(buf[:size].cpu(), torch.frombuffer(bytearray(seg.read_bytes()), dtype=torch.uint8))
    report.check("kvikio segment bytes", ok, 0.0, str(seg.relative_to(tmp)))
    report.row("kvikio_segment_read", f"{size >> 20}MiB", "kvikio_raw_file", seg_rate, raw)


# --- output -------------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.device = "none"
        self.failures = 0

    def emit(self, record: dict[str, Any], text: str) -> None:
        print(json.dumps({**record, "device": self.device}) if self.as_json else text, flush=True)

    def note(self, text: str) -> None:
        self.emit({"metric": "note", "text": text}, text)

    def check(self, what: str, ok: bool, seconds: float, detail: str) -> None:
        self.failures += not ok
        self.emit({"metric": "check", "what": what, "ok": ok, "seconds": round(seconds, 3), "detail": detail},
                  f"{'ok  ' if ok else 'FAIL'} {what} ({seconds:.2f} s) {detail}")  # fmt: skip

    def row(self, metric: str, size: str, against: str, value: float, baseline: float | None) -> None:
        ratio = value / baseline if baseline else None
        record = {"metric": metric, "size": size, "against": against, "value": round(value, 3), "unit": "GiB/s",
                  "baseline": None if baseline is None else round(baseline, 3),
                  "ratio": None if ratio is None else round(ratio, 3)}  # fmt: skip
        text = f"{metric:34} {size:>12} {value:8.2f} GiB/s" + (f"  {ratio:5.2f}x {against}" if ratio else "")
        self.emit(record, text)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
