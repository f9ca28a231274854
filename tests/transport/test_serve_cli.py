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


def test_limits_deadlines_and_scoped_tokens_come_from_the_config(tmp_path: Path) -> None:
    from kvfabric.config import load_settings
    from kvfabric.node import _keying_secret, _server_config
    from kvfabric.transport.auth import TokenGrant

    cfg = tmp_path / "node.toml"
    cfg.write_text("""
[server]
server_secret = "serve-cli-secret-0123456789"
max_batch = 100
max_frame_bytes = "8MiB"
handshake_timeout_s = 1.5
max_connections_per_peer = 7
fd_reserve = 100
max_inflight_bytes = "64MiB"
max_models_per_tenant = 5
[server.auth]
enabled = true
[[server.auth.tokens]]
token = "reader-token-0123456789"
tenant = "tenant-a"
[[server.auth.tokens]]
token = "writer-token-0123456789"
tenant = "tenant-a"
scopes = ["read", "write"]
namespaces = ["tenant-a", "tenant-b"]
""")
    args = build_parser().parse_args(["serve", "--port", "0", "--config", str(cfg)])
    settings = load_settings(str(cfg))
    config = _server_config(args, settings, _keying_secret(args, settings))
    assert config.limits.max_batch == 100 and config.limits.max_payload_bytes == 8 << 20
    assert config.limits.max_block_bytes == 8 << 20  # no block larger than a frame
    assert config.handshake_timeout_s == 1.5 and config.max_connections_per_peer == 7 and config.fd_reserve == 100
    assert config.max_inflight_bytes == 64 << 20 and config.max_models_per_tenant == 5
    assert config.tokens["reader-token-0123456789"] == TokenGrant("tenant-a", "read")
    assert config.tokens["writer-token-0123456789"] == TokenGrant("tenant-a", "write",
                                                                  frozenset({"tenant-a", "tenant-b"}))  # fmt: skip


def test_an_in_flight_budget_below_one_frame_is_a_config_error(tmp_path: Path) -> None:
    import pytest

    from kvfabric.config import load_settings
    from kvfabric.errors import ConfigError

    cfg = tmp_path / "node.toml"
    cfg.write_text('[server]\nmax_frame_bytes = "64MiB"\nmax_inflight_bytes = "32MiB"\n')
    with pytest.raises(ConfigError, match="max_inflight_bytes must be at least max_frame_bytes"):
        load_settings(str(cfg))
