"""Time to first token: recompute the prompt vs fetch its KV from ``kvfabric serve`` (transformers, CPU).

    python bench/ttft.py [--json] [--models tiny,medium] [--tokens 512,2048,8192] [--tiers ram,disk] [--repeat 2]

recompute: one forward pass over the whole prompt (fresh ``DynamicCache``) to the first token.
fetch: lookup + get from a ``kvfabric serve`` in another process (client here) + building the ``DynamicCache`` +
one forward pass over the tokens after the cached prefix (the last block) to the first token; the first tokens must
agree. ``ram``: the blocks sit in the server's RAM tier. ``disk``: the server is stopped (flushing its tiers), every
file under its data directory is dropped from the page cache (``posix_fadvise(DONTNEED)``), and a fresh server
(empty RAM tier) is started before each fetch, so the blocks come off the disk tier's segment files.

One JSON line per case: ``model``, ``tier``, ``tokens``, ``recompute_s``, ``fetch_s``, ``ratio`` (recompute_s /
fetch_s), plus the common keys (``metric``, ``size``, ``against``, ``value`` = recompute_s, ``baseline`` = fetch_s)
and the fetch's parts (``fetch_io_s``: lookup + get + cache build; ``bytes``; ``fetch_gbps``). Times are the best of
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from kvfabric.client import Client
from kvfabric.client.hf import HFAdapter, spec_for_hf
from tests.engines.fabric import serve, stop
from tests.engines.models import SHAPES, random_prompt, save_random_llama

BLOCK = 16


def drop_page_cache(root: Path) -> int:
    """``posix_fadvise(DONTNEED)`` on every file under ``root`` (clean pages leave the cache); returns files."""
    n = 0
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


@torch.inference_mode()
def recompute(model, prompt: list[int]) -> tuple[float, int]:
    from transformers import DynamicCache

    started = time.perf_counter()
    out = model(
        input_ids=torch.tensor([prompt]), past_key_values=DynamicCache(config=model.config), use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    token = int(out.logits[0, -1].argmax())
    return time.perf_counter() - started, token


@torch.inference_mode()
def fetch(adapter: HFAdapter, prompt: list[int]) -> tuple[float, float, int, int]:
    started = time.perf_counter()
    cache, matched = adapter.fetch(prompt)
    io_s = time.perf_counter() - started
    if cache is None:
        raise RuntimeError(f"the fabric had nothing for a {len(prompt)}-token prompt")
    out = adapter.model(
        input_ids=torch.tensor([prompt[matched:]]), past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    token = int(out.logits[0, -1].argmax())
    return time.perf_counter() - started, io_s, matched, token


def run(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kvfabric-ttft-") as tmp:
        root = Path(tmp)
        data_dir = root / "fabric"
        for name in args.models:
            model_dir = save_random_llama(root / name, SHAPES[name], seed=0)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            spec = spec_for_hf(model.config, block_size=BLOCK, model=f"bench-{name}")
            prompts = {n: random_prompt(n, seed=n) for n in args.tokens}
            recompute(model, random_prompt(64, seed=1))  # warm-up: first-call allocations and kernel selection
            baseline: dict[int, tuple[float, int]] = {}
            for n, prompt in prompts.items():
                times, token = zip(*(recompute(model, prompt) for _ in range(args.repeat)), strict=True)
                baseline[n] = (min(times), token[0])
            with serve(data_dir, ram_bytes=args.ram_bytes) as fabric:
                with Client(fabric.url, token=fabric.token) as client:
                    adapter = HFAdapter(model, client, spec, publish=True)
                    for prompt in prompts.values():
                        adapter.prefill(prompt, use_fabric=False)  # publish every full block
                    adapter.publish_blocks = False
                    fetch(adapter, prompts[min(prompts)])  # warm-up: connection, shared-memory mapping
                    if "ram" in args.tiers:
                        for n, prompt in prompts.items():
                            rows.append(case(name, "ram", n, baseline[n], [fetch(adapter, prompt) for _ in range(
                                args.repeat)], spec.bytes_per_token))  # fmt: skip
                stop(fabric.process)
            if "disk" in args.tiers:
                for n, prompt in prompts.items():
                    runs = []
                    for _ in range(args.repeat):
                        drop_page_cache(data_dir)
                        with serve(data_dir, ram_bytes=args.ram_bytes) as fabric, Client(
                            fabric.url, token=fabric.token
                        ) as client:
                            adapter = HFAdapter(model, client, spec, publish=False)
                            tiers = set(client.lookup(spec, prompt).tiers)
                            if tiers != {"disk"}:
                                raise RuntimeError(f"expected the blocks on disk only, lookup says {tiers}")
                            runs.append(fetch(adapter, prompt))
                    rows.append(case(name, "disk", n, baseline[n], runs, spec.bytes_per_token))
            for row in rows:
                if row["model"] == name:
                    emit(row, args.json)
            shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def case(model: str, tier: str, tokens: int, base: tuple[float, int], runs: list, bytes_per_token: int) -> dict:
    best = min(runs, key=lambda r: r[0])
    fetch_s, io_s, matched, token = best
    if token != base[1]:
        raise RuntimeError(f"{model}/{tier}/{tokens}: first token {token} after fetch, {base[1]} recomputed")
    nbytes = matched * bytes_per_token
    return {
        "metric": "ttft", "model": model, "tier": tier, "tokens": tokens, "size": tokens, "against": "fetch",
        "recompute_s": round(base[0], 5), "fetch_s": round(fetch_s, 5), "value": round(base[0], 5),
        "baseline": round(fetch_s, 5), "ratio": round(base[0] / fetch_s, 2), "fetch_io_s": round(io_s, 5),
        "matched_tokens": matched, "bytes": nbytes, "fetch_gbps": round(nbytes / io_s / 1e9, 3),
    }  # fmt: skip


def emit(row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row), flush=True)
    else:
        print(
            f"{row['model']:>7} {row['tier']:>5} {row['tokens']:>6} tok  recompute {row['recompute_s']:8.3f} s  "
            f"fetch {row['fetch_s']:7.3f} s (io {row['fetch_io_s']:.3f} s, {row['bytes'] / 2**20:6.1f} MiB, "
            f"{row['fetch_gbps']:.2f} GB/s)  ratio {row['ratio']:6.1f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models", default="tiny,medium", type=lambda s: s.split(","))
    parser.add_argument("--tokens", default="512,2048,8192", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tiers", default="ram,disk", type=lambda s: s.split(","))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ram-bytes", type=int, default=1 << 30)
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(SHAPES)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {sorted(SHAPES)}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
