"""bench/gpu/check.sh: its dry run on a machine without CUDA says so and exits 0; its correctness cases (every
GPU layout through a real ``kvfabric serve`` over TCP and shared memory, into a cache of another layout) run here on
CPU tensors, so the script a GPU host runs is exercised before it gets there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "bench" / "gpu"


def test_dry_run_without_cuda_says_so_and_exits_0() -> None:
    proc = subprocess.run(["bash", str(CHECK / "check.sh"), "--dry-run", "--json"], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [json.loads(line) for line in proc.stdout.splitlines()]
    assert notes and all(n["metric"] == "note" for n in notes)
    if not torch.cuda.is_available():
        assert "CUDA not available" in notes[0]["text"] and notes[-1]["text"] == "no CUDA: nothing moved"
        plain = subprocess.run([sys.executable, str(CHECK / "check.py")], capture_output=True, text=True,
                               timeout=120, check=False, cwd=REPO)  # fmt: skip
        assert plain.returncode == 1 and "run with --dry-run to exit 0" in plain.stdout


def test_layout_cases_round_trip_through_a_real_server_on_cpu() -> None:
    proc = subprocess.run([sys.executable, str(CHECK / "check.py"), "--cpu-selftest", "--json"], capture_output=True,
                          text=True, timeout=300, check=False, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    checks = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(checks) == 10 and all(c["metric"] == "check" and c["ok"] for c in checks)
    assert {c["detail"] for c in checks} == {"transport used: tcp", "transport used: shm"}
