"""bench/store.py runs and prints well-formed rows (the figures themselves are measured by the lead, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_store_bench_json_rows(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/store.py", "--json", "--sizes", "64KiB", "--count", "8", "--repeat", "1",
         "--dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(r["metric"], r["against"]) for r in rows} >= {
        ("disk_put_durable", "pwrite_fsync"),
        ("disk_get", "preadv"),
    }
    for r in rows:
        assert set(r) >= {"metric", "size", "against", "value", "baseline", "ratio"}
        assert r["size"] == 64 << 10
        assert r["value"] > 0 and r["baseline"] > 0
        assert abs(r["ratio"] - r["value"] / r["baseline"]) < 1e-4 * r["ratio"]
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself


def test_store_bench_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/store.py", "--sizes", "16KiB", "--count", "8", "--repeat", "1", "--dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["metric", "size", "value"]
    assert any(line.startswith("disk_put_durable") for line in lines[1:])
