"""``bench/transport.py`` runs end to end on small blocks and prints the agreed JSON rows (figures are not checked:
speed is the benchmark's business, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.transport.servers import ROOT, child_env

KEYS = {"metric", "size", "against", "value", "baseline", "ratio", "blocks_per_call"}


def test_transport_bench_prints_rows_for_every_path() -> None:
    out = subprocess.run(
        [sys.executable, "bench/transport.py", "--json", "--sizes", "256KiB", "--batch-sizes", "64KiB", "--batch", "4",
         "--seconds", "0.2", "--slices", "2", "--peers", "none"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(set(r) == KEYS and r["value"] > 0 and r["baseline"] > 0 for r in rows)
    single = {(r["metric"], r["against"]) for r in rows if r["size"] == 256 << 10}
    assert {("get", "socket"), ("put", "socket"), ("get_shm", "memcpy")} <= single
    batched = {(r["metric"], r["blocks_per_call"]) for r in rows if r["size"] == 64 << 10}
    assert batched == {("get", 4), ("put", 4)}  # --batch blocks per request
    assert "load average at start" in out.stderr


def test_transport_bench_refuses_unknown_peers() -> None:
    out = subprocess.run([sys.executable, "bench/transport.py", "--peers", "memcached"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "unknown peers ['memcached']" in out.stderr
