"""The transformers adapter against a real ``kvfabric serve``: KV published by one process is fetched by another,
whose greedy tokens and log-probabilities equal a run that recomputes everything."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engines.fabric import REPO, child_env, corrupt_on_disk, serve, stop
from tests.engines.models import random_prompt

transformers = pytest.importorskip("transformers", reason="the transformers adapter needs transformers")

from kvfabric.client import Client
from kvfabric.client.hf import HFAdapter, blocks_to_cache, cache_to_blocks, spec_for_hf
from kvfabric.spec import DType

BLOCK = 16
WORKER = REPO / "examples" / "hf_worker.py"


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_worker(role: str, fabric, model: Path, prompts: list[list[int]], tmp: Path, *extra: str) -> list[dict]:
    prompt_file, out_file = tmp / f"{role}-prompts.json", tmp / f"{role}-out.json"
    prompt_file.write_text(json.dumps(prompts))
    cmd = [
        sys.executable, str(WORKER), role, "--url", fabric.url, "--token", fabric.token, "--model", str(model),
        "--model-name", "tiny-random-llama", "--block-size", str(BLOCK), "--prompts", str(prompt_file),
        "--out", str(out_file), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out_file.read_text())["results"]


def reference(model, prompt: list[int], n: int = 8):
    """Greedy generation recomputing the whole prompt, no fabric involved."""
    return HFAdapter(model, None, spec_for_hf(model.config, model="ref")).generate(prompt, n)


def test_spec_for_hf_reads_the_config(tiny_model: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_model)
    spec = spec_for_hf(config, block_size=32, model="tiny", revision="r1")
    assert (spec.num_layers, spec.kv_heads, spec.head_dim, spec.block_size) == (4, 2, 64, 32)
    assert spec.dtype == DType.FLOAT32 and spec.model == "tiny" and spec.revision == "r1"
    assert spec_for_hf(config, model="tiny", dtype="bfloat16").fingerprint() != spec.fingerprint()


def test_cache_blocks_round_trip(tiny_model: Path) -> None:
    model = load(tiny_model)
    spec = spec_for_hf(model.config, block_size=BLOCK, model="tiny")
    prompt = random_prompt(5 * BLOCK + 3, seed=1)
    with torch.inference_mode():
        cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
    kv = cache_to_blocks(cache, spec, 0, 5)
    assert kv.shape == (5, *spec.block_shape)
    rebuilt = blocks_to_cache(kv, model.config)
    assert rebuilt.get_seq_length() == 5 * BLOCK
    for a, b in zip(rebuilt.layers, cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys[:, :, : 5 * BLOCK]) and torch.equal(a.values, b.values[:, :, : 5 * BLOCK])
    assert torch.equal(cache_to_blocks(cache, spec, 2, 5), kv[2:])


@pytest.mark.slow
def test_prefill_in_one_process_decode_in_another(tiny_model: Path, tmp_path: Path) -> None:
    """512, 2,048 and 8,192-token prompts: the decode worker matches all but the last block and generates exactly
    what a full recompute generates; a prompt sharing only its first half matches that half."""
    model = load(tiny_model)
    prompts = [random_prompt(n, seed=n) for n in (512, 2048, 8192)]
    half = prompts[1][:1024] + random_prompt(1024, seed=99)
    with serve(tmp_path / "fabric") as fabric:
        published = run_worker("prefill", fabric, tiny_model, prompts, tmp_path)
        assert [r["published_blocks"] for r in published] == [len(p) // BLOCK for p in prompts]
        decoded = run_worker("decode", fabric, tiny_model, [*prompts, half], tmp_path)
    for prompt, got in zip([*prompts, half], decoded, strict=True):
        want = reference(model, prompt)
        assert got["tokens"] == list(want.tokens)
        assert got["logprobs"] == pytest.approx(list(want.logprobs), abs=1e-4)
    for prompt, got in zip(prompts, decoded[:3], strict=True):
        assert got["matched_tokens"] == len(prompt) - BLOCK  # the last block's last token must be computed
    assert decoded[3]["matched_tokens"] == 1024


@pytest.mark.slow
def test_corrupt_block_or_dead_fabric_recomputes(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load(tiny_model)
    spec = spec_for_hf(model.config, block_size=BLOCK, model="tiny-random-llama")
    prompt = random_prompt(512, seed=5)
    want = reference(model, prompt)
    with serve(tmp_path / "fabric") as fabric:
        with Client(fabric.url, token=fabric.token) as client:
            assert HFAdapter(model, client, spec).prefill(prompt, use_fabric=False).published_blocks == 32
            block_7 = client.block_hashes(spec, prompt)[7]
            payload = bytes(client.get_blocks(spec, [block_7])[0])
        stop(fabric.process)  # flushes the disk tier; the restarted server has an empty RAM tier
        corrupt_on_disk(fabric.data_dir, payload)
    caplog.set_level(logging.WARNING, logger="kvfabric")
    with serve(tmp_path / "fabric") as fabric, Client(fabric.url, token=fabric.token) as client:
        got = HFAdapter(model, client, spec, publish=False).generate(prompt, 8)
    assert got.matched_tokens == 7 * BLOCK  # blocks 0-6 come from disk; 7 fails its checksum and is recomputed
    assert got.tokens == want.tokens and got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert "block 7 of 31 was missing or corrupt" in caplog.text

    caplog.clear()
    with Client(fabric.url, token=fabric.token, timeout=2.0) as client:  # that server has exited: nothing listens
        down = HFAdapter(model, client, spec).generate(prompt, 8)
    assert down.matched_tokens == 0 and down.published_blocks == 0
    assert down.tokens == want.tokens and down.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert "fetch failed" in caplog.text and "publish of 32 blocks failed" in caplog.text
