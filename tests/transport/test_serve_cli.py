"""``kvfabric serve`` end to end: the real TieredStore (RAM + disk), a client in this process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvfabric.cli import build_parser
from kvfabric.client import Client
from tests.blocks import SPEC
from tests.transport.servers import ROOT, child_env


def test_serve_is_registered() -> None:
    args = build_parser().parse_args(["serve", "--data-dir", "/tmp/x", "--port", "0"])
    assert args.command == "serve" and args.port == 0 and callable(args.func)


def test_serve_round_trip_and_restart(tmp_path: Path) -> None:
    tokens = np.arange(3 * SPEC.block_size)
    kv = np.random.default_rng(0).integers(0, 256, (3, SPEC.block_nbytes), dtype=np.uint8)
    for round_ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvfabric", "serve", "--data-dir", str(tmp_path), "--port", "0",
             "--ram-bytes", str(64 << 20), "--token", "t=tenant-a", "--no-nixl"],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if m := re.search(r"listening on [\d.]+:(\d+)", line):
                    break
            else:
                raise AssertionError("kvfabric serve exited before listening")
            with Client(f"kvfabric://127.0.0.1:{m.group(1)}", token="t") as c:
                if round_ == 0:
                    assert c.put(SPEC, tokens, kv) == 3
                c.stats()
                # after a restart the disk tier and the persisted secret give the same hashes the same blocks
                got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
                assert all(g is not None for g in got), f"round {round_}: {got}"
                assert np.array_equal(np.stack(got), kv)
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
