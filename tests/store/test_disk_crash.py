"""The crash harness, in short: SIGKILLed writers lose no acknowledged block and never get corrupt bytes served."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_crash_harness_three_rounds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/crash_store.py", "--rounds", "3", "--seed", "7", "--dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.fullmatch(r"rounds=3 acked=(\d+) lost=0 corrupt_served=0", last)
    assert m is not None, last
    assert int(m.group(1)) > 0
