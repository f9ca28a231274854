"""``bench/soak.py`` runs end to end on two short phases and prints the agreed JSON rows (figures are not checked:
speed is the benchmark's business, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.transport.servers import ROOT, child_env

KEYS = {"metric", "size", "against", "value", "baseline", "ratio"}


def test_soak_bench_prints_rows_for_each_phase() -> None:
    out = subprocess.run(
        [sys.executable, "bench/soak.py", "--json", "--seconds", "1", "--phases", "admin_bodies,partial_puts"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(set(r) == KEYS for r in rows)
    by = {(r["metric"], r["size"]): r for r in rows}
    for phase in ("quiet", "admin_bodies", "partial_puts"):  # quiet is always run first: the baseline
        assert by[("steady_errors", phase)]["value"] == 0
        assert by[("steady_p99_ms", phase)]["value"] > 0
        assert by[("rss_peak_mib", phase)]["value"] >= by[("rss_peak_mib", phase)]["baseline"] * 0.5
    assert "load average at start" in out.stderr


def test_soak_bench_refuses_unknown_phases() -> None:
    out = subprocess.run([sys.executable, "bench/soak.py", "--phases", "quiet,meteor"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "unknown phases: meteor" in out.stderr
