"""The admin CLI against a live admin server over real HTTP: each command mirrors an API call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvfabric.api.app import create_app
from kvfabric.cli import main
from kvfabric.config import Settings
from kvfabric.record import Block
from kvfabric.store.tiered import TieredStore
from tests.api.conftest import SPEC_B, TOKENS, LiveServer
from tests.blocks import SPEC
from tests.engines.fabric import serve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def url(store: TieredStore, settings: Settings, blocks: dict[str, list[Block]]) -> Iterator[str]:
    with LiveServer(create_app(store, settings)) as base:
        yield base


def run(capsys: pytest.CaptureFixture[str], url: str, who: str | None, *argv: str) -> tuple[int, str, str]:
    args = [*argv, "--url", url]
    if who is not None:
        args += ["--token", TOKENS[who]["token"]]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], url: str, who: str, *argv: str) -> Any:
    code, out, err = run(capsys, url, who, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_stats(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, _ = run(capsys, url, "admin", "stats")
    assert code == 0
    assert "node test-node" in out and "ram" in out and "tenant-a" in out and "tenant-b" in out
    s = run_json(capsys, url, "admin", "stats")
    assert s["totals"]["blocks"] == 10


def test_ls_and_models(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, _ = run(capsys, url, "a-read", "ls")
    assert code == 0 and "tenant-a" in out and "tenant-b" not in out
    code, out, _ = run(capsys, url, "a-read", "ls", "tenant-a")
    assert code == 0 and SPEC.model in out and SPEC_B.fingerprint().hex() in out
    models = run_json(capsys, url, "admin", "models")
    assert {m["fingerprint"] for m in models} == {SPEC.fingerprint().hex(), SPEC_B.fingerprint().hex()}


def test_block_pin_unpin_rm(
    capsys: pytest.CaptureFixture[str], url: str, store: TieredStore, blocks: dict[str, list[Block]]
) -> None:
    b = blocks["a"][0]
    ident = ["tenant-a", b.key.model.hex(), b.key.prefix.hex()]
    assert run_json(capsys, url, "a-read", "block", *ident)["tier"] == "ram"
    code, out, _ = run(capsys, url, "a-write", "pin", *ident)
    assert (code, out.strip()) == (0, "pinned") and b.key in store.pinned()
    code, out, _ = run(capsys, url, "a-write", "unpin", *ident)
    assert (code, out.strip()) == (0, "unpinned") and b.key not in store.pinned()
    code, out, _ = run(capsys, url, "a-write", "rm", "block", *ident)
    assert (code, out.strip()) == (0, "deleted 1 block(s)") and store.head(b.key) is None


def test_rm_model_and_namespace(capsys: pytest.CaptureFixture[str], url: str, store: TieredStore) -> None:
    code, out, _ = run(capsys, url, "a-write", "rm", "model", "tenant-a", SPEC_B.fingerprint().hex())
    assert (code, out.strip()) == (0, "deleted 2 block(s)")
    code, _, err = run(capsys, url, "b-write", "rm", "namespace", "tenant-b")
    assert code == 1 and "--yes" in err and "tenant-b" in store.namespace_stats()
    code, out, _ = run(capsys, url, "b-write", "rm", "namespace", "tenant-b", "--yes")
    assert (code, out.strip()) == (0, "deleted 3 block(s)") and "tenant-b" not in store.namespace_stats()


def test_policy_evict_compact_tiers_errors_health(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, _ = run(capsys, url, "admin", "policy", "tenant-a", "--ttl", "90", "--quota", "2GiB")
    assert (code, out.strip()) == (0, "tenant-a: ttl 90s, quota 2.00 GiB")
    assert run_json(capsys, url, "admin", "policy", "tenant-a", "--ttl", "none") == {
        "ttl_s": None, "quota_bytes": 2 << 30,
    }  # fmt: skip
    assert run_json(capsys, url, "admin", "evict", "--tier", "ram", "--bytes", "1MiB")["tier"] == "ram"
    assert "result" in run_json(capsys, url, "admin", "compact")
    assert run(capsys, url, "a-read", "tiers")[0] == 1  # a tenant token may not see the node's tiers
    code, out, _ = run(capsys, url, "ops-read", "tiers")  # node-wide: a token for all namespaces
    assert code == 0 and "ram" in out and "persistent" in out
    assert "0 re-indexed, 0 dropped" in out  # the disk tier's recovery at open (a fresh data dir)
    code, out, _ = run(capsys, url, "ops-read", "errors")
    assert (code, out.strip()) == (0, "no recent errors")
    code, out, _ = run(capsys, url, None, "health")
    assert code == 0 and out.startswith("ok")


def test_errors_are_reported_with_the_apis_reason(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, _, err = run(capsys, url, None, "stats")
    assert code == 1 and "401" in err and "bearer token" in err
    code, _, err = run(capsys, url, "a-write", "policy", "tenant-a", "--ttl", "5")
    assert code == 1 and "403" in err and "admin" in err
    code, _, err = run(capsys, url, "admin", "policy", "tenant-a", "--quota", "lots")
    assert code == 1 and "422" in err and "quota_bytes" in err and "invalid size" in err
    code, _, err = run(capsys, url, "a-read", "block", "tenant-a", "00" * 32, "zz")
    assert code == 1 and "422" in err and "prefix" in err


def test_unreachable_server_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "http://127.0.0.1:9", "admin", "stats")
    assert code == 2 and "cannot reach the admin API" in err


def test_config_show_local_and_remote(capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("server:\n  server_secret: hush-hush-secret\nstore:\n  ram_bytes: 3GiB\n")
    assert main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ram_bytes = 3221225472" in out and "hush-hush-secret" not in out and '"**********"' in out
    assert main(["config", "show", "--config", str(cfg), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["store"]["ram_bytes"] == 3 << 30
    cfg.write_text("store:\n  fsync: sometimes\n")
    assert main(["config", "show", "--config", str(cfg)]) == 1
    assert "store.fsync" in capsys.readouterr().err
    code = main(["config", "show", "--remote", "--format", "json", "--url", url, "--token", TOKENS["admin"]["token"]])
    assert code == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["store"]["node_id"] == "test-node" and remote["server"]["server_secret"] == "**********"


def test_entry_point_runs_as_a_process(url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVFABRIC_ADMIN_URL": url, "KVFABRIC_TOKEN": TOKENS["admin"]["token"]}
    proc = subprocess.run(
        [sys.executable, "-m", "kvfabric", "stats", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["node_id"] == "test-node"


def test_ls_blocks_pins_and_rm_prefix(
    capsys: pytest.CaptureFixture[str], url: str, store: TieredStore, blocks: dict[str, list[Block]]
) -> None:
    chain = blocks["a"]
    fp = SPEC.fingerprint().hex()
    page = run_json(capsys, url, "a-read", "ls", "tenant-a", fp, "--limit", "3")
    assert len(page["blocks"]) == 3 and page["next"] is not None
    rest = run_json(capsys, url, "a-read", "ls", "tenant-a", fp, "--after", page["next"])
    assert len(rest["blocks"]) == 2 and rest["next"] is None
    code, out, _ = run(capsys, url, "a-read", "ls", "tenant-a", fp, "--limit", "3")
    assert code == 0 and "more: --after" in out and out.count(" ram ") + out.count("ram\n") >= 1

    code, out, _ = run(capsys, url, "a-write", "pin", "tenant-a", fp, chain[0].key.prefix.hex())
    assert code == 0
    code, out, _ = run(capsys, url, "a-read", "pins")
    assert code == 0 and chain[0].key.prefix.hex() in out

    code, out, _ = run(capsys, url, "a-write", "rm", "prefix", "tenant-a", fp, chain[3].key.prefix.hex())
    assert (code, out.strip()) == (0, "deleted 2 block(s)")
    assert [store.head(b.key) is not None for b in chain] == [True, True, True, False, False]


def test_config_show_remote_prints_toml(capsys: pytest.CaptureFixture[str], url: str) -> None:
    token = TOKENS["admin"]["token"]
    assert main(["config", "show", "--remote", "--format", "json", "--url", url, "--token", token]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert main(["config", "show", "--remote", "--format", "toml", "--url", url, "--token", token]) == 0
    as_toml = tomllib.loads(capsys.readouterr().out)
    assert as_toml == as_json
    assert as_toml["store"]["disk_bytes"] == 256 << 20 and as_toml["server"]["server_secret"] == "**********"


def test_stats_into_a_closed_pipe_exits_quietly(url: str) -> None:
    """``kvfabric stats | head``: the reader went away before the output was written."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVFABRIC_ADMIN_URL": url, "KVFABRIC_TOKEN": TOKENS["admin"]["token"]}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kvfabric", "stats"], env=env, stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 128 + signal.SIGPIPE


def test_stats_piped_to_head_prints_the_first_lines(url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVFABRIC_ADMIN_URL": url, "KVFABRIC_TOKEN": TOKENS["admin"]["token"]}
    proc = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m kvfabric stats | head -n 1"], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    assert proc.stdout.startswith("node test-node") and proc.stderr == ""


def test_a_url_with_the_api_path_gets_a_hint(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, _, err = run(capsys, url + "/v1/", "admin", "stats")
    assert code == 1 and "404" in err
    assert f"without /v1: --url {url}" in err


def test_a_url_of_the_data_plane_gets_a_hint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "kvfabric://127.0.0.1:9500", "admin", "stats")
    assert code == 2 and "not an http(s) URL" in err and "try --url http://127.0.0.1:9501" in err
    with serve(tmp_path / "fabric") as fabric:  # a real data plane, asked in HTTP
        port = fabric.url.rsplit(":", 1)[1]
        code, _, err = run(capsys, f"http://127.0.0.1:{port}", "admin", "stats")
    assert code == 2 and "does not answer in HTTP" in err
    assert "binary protocol" in err and "--admin-port" in err and "try --url http://127.0.0.1:9501" in err
