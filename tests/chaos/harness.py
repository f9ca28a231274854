"""Chaos harness: a real ``kvfabric serve`` process, a well-behaved client running beside each attack, and the
checks every case makes (server alive, acknowledged blocks intact, the client's errors 0 and p99 under a bound,
the server's memory back under a bound afterwards).

Short by default (the CI part of ``tests/chaos`` stays around a minute); ``KVFABRIC_CHAOS_LONG=1`` scales every
attack up (more connections, larger requests, longer runs)."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvfabric.client import Client
from kvfabric.spec import DType, ModelSpec
from tests.serve_process import start_serve

LONG = os.environ.get("KVFABRIC_CHAOS_LONG") == "1"
STEADY = "chaos-steady-token-0123456789"  # tenant "steady", write
STEADY_READER = "chaos-steady-reader-0123456789"  # tenant "steady", read only
HOSTILE = "chaos-hostile-token-0123456789"  # tenant "hostile", write
OPS = "chaos-ops-token-0123456789"  # tenant "ops", read, every namespace: sees the node-wide STATS counters
SPEC = ModelSpec(model="chaos/tiny", num_layers=16, kv_heads=4, head_dim=32, dtype=DType.BFLOAT16, block_size=16)
"""128 KiB blocks: 16 layers x 2 x 16 tokens x 4 heads x 32 dims x 2 bytes, splittable into 16384 chunks."""
P99_BOUND_S = 3.0
"""A sanity bound on the well-behaved client's p99 under attack on a shared 2-core machine, not a timing test."""
RSS_SLACK_MIB = 256
"""The issue's target: memory back under the baseline plus this once an attack is over."""
MAX_FRAME_BYTES = 16 << 20
MAX_BATCH = 512


def scale(short: int, long: int) -> int:
    return long if LONG else short


def write_config(root: Path, extra_server: str = "") -> Path:
    cfg = root / "node.toml"
    cfg.write_text(f"""
[server]
server_secret = "chaos-secret-0123456789abcdef"
max_frame_bytes = {MAX_FRAME_BYTES}
max_batch = {MAX_BATCH}
handshake_timeout_s = 2.0
frame_timeout_s = 3.0
idle_timeout_s = 60.0
max_connections_per_peer = {scale(400, 1200)}
max_inflight_bytes = "256MiB"
max_models_per_tenant = 8
{extra_server}

[server.auth]
enabled = true

[[server.auth.tokens]]
token = "{STEADY}"
tenant = "steady"
scopes = ["write"]

[[server.auth.tokens]]
token = "{STEADY_READER}"
tenant = "steady"
scopes = ["read"]

[[server.auth.tokens]]
token = "{HOSTILE}"
tenant = "hostile"
scopes = ["write"]

[[server.auth.tokens]]
token = "{OPS}"
tenant = "ops"
scopes = ["read"]
namespaces = ["*"]

[store]
data_dir = "{root / "data"}"
ram_bytes = "128MiB"
disk_bytes = "1GiB"
fsync = "none"
""")
    return cfg


@dataclass
class Node:
    proc: subprocess.Popen[str]
    url: str
    admin: str
    root: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        with Client(self.url, token=STEADY, shm=False, retries=0) as c:
            return c.stats()["tenant"] == "steady"

    def anon_rss_mib(self) -> float:
        """The server's private memory (the RAM arena is shared memory and not counted)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no RssAnon in /proc/PID/status")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_node(root: Path, *, nofile: int | None = None, extra_server: str = "") -> Node:
    """``kvfabric serve`` on the chaos config (plus ``extra_server`` lines in ``[server]``), with at most
    ``nofile`` descriptors when given."""
    root.mkdir(parents=True, exist_ok=True)

    def lower_limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc, url, admin = start_serve(write_config(root, extra_server), root, preexec_fn=lower_limit)
    return Node(proc, url, admin, root)


def raise_own_descriptor_limit() -> None:
    """This process opens many sockets at once; lift its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Steady:
    """A well-behaved client in a thread: puts a block, reads it back and checks it, over and over."""

    node: Node
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    acked: dict[int, np.ndarray] = field(default_factory=dict)  # token seed -> the block's bytes
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @staticmethod
    def tokens(seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 32000, size=SPEC.block_size)

    def _run(self) -> None:
        rng = np.random.default_rng(12345)
        with Client(self.node.url, token=STEADY, shm=False, pool_size=2, timeout=30) as c:
            seed = 0
            while not self._stop.is_set():
                seed += 1
                data = rng.integers(0, 256, size=(1, SPEC.block_nbytes), dtype=np.uint8)
                started = time.perf_counter()
                try:
                    assert c.put(SPEC, self.tokens(seed), data) == 1
                    self.latencies.append(time.perf_counter() - started)
                    self.acked[seed] = data[0]
                    started = time.perf_counter()
                    got = c.get_blocks(SPEC, c.block_hashes(SPEC, self.tokens(seed)))[0]
                    self.latencies.append(time.perf_counter() - started)
                    if got is None or not np.array_equal(got, data[0]):
                        self.errors.append(f"block {seed} came back wrong")
                except Exception as exc:  # any failure the engine would see is an error here
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.01)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos-steady", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99)) if self.latencies else 0.0

    def verify_all(self) -> None:
        """Every acknowledged block is still there with its bytes."""
        with Client(self.node.url, token=STEADY, shm=False) as c:
            seeds = list(self.acked)
            got = c.get_blocks(SPEC, [c.block_hashes(SPEC, self.tokens(s))[0] for s in seeds])
            for seed, block in zip(seeds, got, strict=True):
                assert block is not None, f"acknowledged block {seed} is gone"
                assert np.array_equal(block, self.acked[seed]), f"block {seed} changed"


@contextmanager
def beside(node: Node, settle_s: float = 3.0) -> Iterator[Steady]:
    """Run a well-behaved client while the body attacks ``node``; then make every chaos check."""
    baseline = node.anon_rss_mib()
    steady = Steady(node)
    steady.start()
    time.sleep(0.3)
    try:
        yield steady
    finally:
        steady.stop()
    assert node.alive(), "the server died"
    assert not steady.errors, f"the well-behaved client saw {len(steady.errors)} errors: {steady.errors[:3]}"
    assert len(steady.latencies) >= 10, "the well-behaved client made almost no progress"
    assert steady.p99() < P99_BOUND_S, f"the well-behaved client's p99 was {steady.p99():.2f} s"
    steady.verify_all()
    deadline = time.monotonic() + settle_s
    while node.anon_rss_mib() > baseline + RSS_SLACK_MIB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.anon_rss_mib() <= baseline + RSS_SLACK_MIB, (
        f"server memory {node.anon_rss_mib():.0f} MiB stayed above {baseline:.0f} + {RSS_SLACK_MIB} MiB"
    )
