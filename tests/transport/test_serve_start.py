"""``kvfabric serve`` at start: the keying secret of a shared S3 tier, and start-up errors as one line and exit 2.

Real processes: SeaweedFS for S3, ``kvfabric serve`` as a child, the client in this process."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from kvfabric.client import Client
from tests.blocks import SPEC
from tests.s3server import SeaweedFS
from tests.transport.servers import ROOT, child_env

SECRET = "cluster-keying-secret-0123456789"


def _config(tmp: Path, name: str, s3: SeaweedFS, bucket: str, *, secret: str | None, extra: str = "") -> Path:
    """A node on its own data dir with the shared S3 tier; write-through uploads so an acknowledged put is in S3."""
    secret_line = f'server_secret = "{secret}"' if secret is not None else ""
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[server]
admin_port = 0
{secret_line}
[store]
data_dir = "{tmp / name}"
ram_bytes = "64MiB"
[object]
endpoint_url = "{s3.endpoint.endpoint_url}"
bucket = "{bucket}"
prefix = "nodes/a"
upload = "write-through"
startup_wait_s = 2
{extra}
""")
    return path


def _env(s3: SeaweedFS) -> dict[str, str]:
    env = child_env()
    env.update({k: v for k, v in s3.endpoint.env().items() if k != "AWS_ENDPOINT_URL_S3"})
    return env


@contextmanager
def _serve(config: Path, env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfabric", "serve", "--config", str(config), "--port", "0", "--no-nixl",
         "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"listening on ([\d.]+):(\d+)", line):
                break
        else:
            raise AssertionError(f"kvfabric serve exited before listening: {proc.stderr.read() if proc.stderr else ''}")
        yield f"kvfabric://{m.group(1)}:{m.group(2)}"
    finally:
        proc.terminate()
        code = proc.wait(30)
        assert code == 0, (code, proc.stderr.read() if proc.stderr else "")


def _fails(config: Path | None, env: dict[str, str], *args: str) -> str:
    """Run ``kvfabric serve`` expecting a start-up failure: exit 2 and one line on stderr (returned)."""
    cmd = [sys.executable, "-m", "kvfabric", "serve", "--port", "0", "--no-nixl", "--log-level", "ERROR", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "admin API" not in ln and "retrying" not in ln]
    assert len(lines) == 1, out.stderr  # one line, no traceback
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.fixture
def stored(tmp_path: Path, s3_server: SeaweedFS) -> tuple[str, np.ndarray, np.ndarray]:
    """A bucket holding 6 blocks a first node put under SECRET; that node's data dir is then lost."""
    bucket = s3_server.create_bucket()
    tokens = np.arange(6 * SPEC.block_size)
    kv = np.random.default_rng(7).integers(0, 256, (6, SPEC.block_nbytes), dtype=np.uint8)
    with _serve(_config(tmp_path, "first", s3_server, bucket, secret=SECRET), _env(s3_server)) as url:
        with Client(url) as c:
            assert c.put(SPEC, tokens, kv) == 6
    return bucket, tokens, kv


def test_a_fresh_node_with_the_same_secret_serves_every_block_from_s3(
    tmp_path: Path, s3_server: SeaweedFS, stored: tuple[str, np.ndarray, np.ndarray]
) -> None:
    bucket, tokens, kv = stored
    with _serve(_config(tmp_path, "replacement", s3_server, bucket, secret=SECRET), _env(s3_server)) as url:
        with Client(url) as c:
            c.register_model(SPEC)
            got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
    assert all(g is not None for g in got), got
    assert np.array_equal(np.stack(got), kv)


def test_a_node_with_another_secret_refuses_to_start(
    tmp_path: Path, s3_server: SeaweedFS, stored: tuple[str, np.ndarray, np.ndarray]
) -> None:
    bucket, _, _ = stored
    line = _fails(_config(tmp_path, "wrong", s3_server, bucket, secret="another-secret-0123456789"), _env(s3_server))
    assert f"s3://{bucket}/nodes/a" in line and "another secret" in line and "server.server_secret" in line


def test_a_node_without_a_configured_secret_refuses_to_start(
    tmp_path: Path, s3_server: SeaweedFS, stored: tuple[str, np.ndarray, np.ndarray]
) -> None:
    bucket, _, _ = stored
    line = _fails(_config(tmp_path, "unset", s3_server, bucket, secret=None), _env(s3_server))
    assert "shared" in line and "server.server_secret" in line and "KVFABRIC_SERVER__SERVER_SECRET" in line


def test_a_data_dir_keyed_with_another_secret_refuses(tmp_path: Path) -> None:
    env = child_env()
    data = tmp_path / "node"
    # First start: no secret configured, so one is generated in the data dir and a block is stored under it.
    config = tmp_path / "n.toml"
    config.write_text(f'[server]\nadmin_port = 0\n[store]\ndata_dir = "{data}"\nram_bytes = "64MiB"\n')
    with _serve(config, env) as url, Client(url) as c:
        assert c.put(SPEC, np.arange(SPEC.block_size), np.zeros((1, SPEC.block_nbytes), np.uint8)) == 1
    config.write_text(f'[server]\nadmin_port = 0\nserver_secret = "{SECRET}"\n[store]\ndata_dir = "{data}"\nram_bytes = "64MiB"\n')
    line = _fails(config, env)
    assert f"data dir {data}" in line and "another secret" in line and "server_secret" in line


def test_missing_bucket_names_create_bucket(tmp_path: Path, s3_server: SeaweedFS) -> None:
    line = _fails(_config(tmp_path, "nobucket", s3_server, "no-such-bucket-kvf", secret=SECRET), _env(s3_server))
    assert "no-such-bucket-kvf" in line and "create_bucket" in line


def test_missing_credentials_are_one_line(tmp_path: Path, s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    line = _fails(_config(tmp_path, "nocreds", s3_server, bucket, secret=SECRET), env)
    assert "credentials" in line


def test_unreachable_endpoint_is_retried_with_a_countdown_then_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "down.toml"
    config.write_text(f"""
[server]
admin_port = 0
server_secret = "{SECRET}"
[object]
endpoint_url = "http://127.0.0.1:{port}"
bucket = "b"
startup_wait_s = 2
access_key_id = "k"
secret_access_key = "s"
""")
    cmd = [sys.executable, "-m", "kvfabric", "serve", "--config", str(config), "--port", "0", "--no-nixl",
           "--log-level", "ERROR"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert re.search(r"unreachable; retrying in \d+ s \(attempt 1, giving up in \d+ s\)", out.stderr), out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"kvfabric serve: object store http://127.0.0.1:{port} unreachable")


def test_port_in_use_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "kvfabric", "serve", "--port", str(port), "--no-nixl", "--log-level", "ERROR"]
        out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port} for the data plane: the address is in use" in out.stderr
        assert "--port" in out.stderr and "Traceback" not in out.stderr
        debug = subprocess.run([*cmd, "--debug"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
        assert debug.returncode == 2 and "Traceback" in debug.stderr


def _stderr_once_listening(*args: str) -> str:
    """What ``kvfabric serve ARGS`` wrote on stderr up to listening, then being stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfabric", "serve", "--port", "0", "--no-nixl", *args],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert any("listening on" in line for line in proc.stdout)
    finally:
        proc.terminate()
        proc.wait(30)
    return proc.stderr.read()


def test_serve_without_admin_port_says_the_admin_api_is_off(tmp_path: Path) -> None:
    assert "the admin API, /metrics and the dashboard are off" in _stderr_once_listening("--log-level", "ERROR")


def test_start_warns_about_placeholders_and_oversized_tiers(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text(f"""
[server]
admin_port = 0
server_secret = "change-me-to-a-long-random-string"
[store]
data_dir = "{tmp_path / 'd'}"
ram_bytes = "64MiB"
disk_bytes = "1000TiB"
""")
    err = _stderr_once_listening("--config", str(config), "--ram-bytes", str(64 << 20))
    assert "keying secret is a placeholder" in err
    assert "store.disk_bytes (1000TiB) is more than the free space" in err


def test_ram_larger_than_memory_is_a_warning() -> None:
    from kvfabric.startup import capacity_warnings

    warnings = capacity_warnings(1 << 60, None, None)
    assert len(warnings) == 1 and "larger than this machine's memory" in warnings[0]
    assert capacity_warnings(1 << 20, None, None) == []
