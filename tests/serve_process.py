"""``kvfabric serve`` as a real process for tests: started on a config with OS-chosen ports, its URLs read back."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def auth_node_config(tmp_path: Path, *, admin_token: str, engine_token: str, extra: str = "") -> Path:
    """A node config with auth on: ``admin_token`` is the operator (admin, every namespace), ``engine_token`` writes
    as ``tenant-a``; RAM + disk under ``tmp_path / "data"``; ``extra`` is appended (an ``[object]`` section, say)."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[server]
server_secret = "serve-test-secret"
stats_interval_s = 0.1

[server.auth]
enabled = true

[[server.auth.tokens]]
token = "{admin_token}"
tenant = "ops"
scopes = ["admin"]
namespaces = ["*"]

[[server.auth.tokens]]
token = "{engine_token}"
tenant = "tenant-a"
scopes = ["write"]

[store]
data_dir = "{tmp_path / "data"}"
ram_bytes = "64MiB"
disk_bytes = "256MiB"
{extra}
""")
    return cfg


def start_serve(
    config: Path,
    home: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[subprocess.Popen[str], str, str]:
    """``(process, data-plane URL, admin URL)`` once the node listens; the caller stops the process. ``extra``: more
    ``kvfabric serve`` flags; ``env``: more environment variables (KVFABRIC_* settings) for the node; ``preexec_fn``
    runs in the child before it starts (to lower a resource limit, say)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(home), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfabric", "serve", "--config", str(config), "--port", "0", "--admin-port", "0",
         "--no-nixl", "--log-level", "WARNING", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=preexec_fn,
    )  # fmt: skip
    assert proc.stdout is not None
    admin = data = None
    for line in proc.stdout:
        if m := re.search(r"admin API on (http://[\d.]+:\d+)", line):
            admin = m.group(1)
        if m := re.search(r"listening on ([\d.]+):(\d+)", line):
            data = f"kvfabric://{m.group(1)}:{m.group(2)}"
            break
    if admin is None or data is None:
        proc.kill()
        proc.wait(30)
        raise AssertionError("kvfabric serve exited before listening")
    return proc, data, admin
