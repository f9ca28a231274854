"""A vLLM engine (CPU or GPU) whose KV goes to and comes from ``kvfabric serve`` through the KV connector.

    python examples/vllm_worker.py MODEL_DIR PROMPTS.json --url URL [--token T] [--kv-role kv_producer|...]

Greedy generation for each prompt of a JSON list of token-id lists, one ``generate`` call per prompt, in order
(``--batch``: one call for all of them, so the engine schedules them together).
``--kv-role kv_producer`` makes a prefill worker (saves only), ``kv_consumer`` a decode worker (loads only),
``kv_both`` (default) does both. Without ``--url`` the engine runs with no connector (the reference).
Output: one line ``RESULT {"results": [{"tokens": [...], "logprobs": [...], "num_cached_tokens": N}, ...]}``
on stdout; progress lines (engine start, every ``TICK_S`` while it starts, generation) on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TICK_S = 15.0

LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(process)d %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {
        "vllm": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "kvfabric": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


def progress(label: str, message: str) -> None:
    print(f"{label}: {message}", file=sys.stderr, flush=True)


@contextmanager
def ticking(label: str, what: str) -> Iterator[None]:
    """Say that ``what`` started, every ``TICK_S`` that it is still going, and how long it took."""
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(TICK_S):
            progress(label, f"{what}: still going, {time.monotonic() - started:.0f} s")

    progress(label, f"{what} ...")
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    progress(label, f"{what}: done in {time.monotonic() - started:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--tenant")
    parser.add_argument("--kv-role", default="kv_both", choices=["kv_both", "kv_producer", "kv_consumer"])
    parser.add_argument("--model-name", default="random-llama", help="name the KV is stored under")
    parser.add_argument("--tcp", action="store_true", help="read blocks over TCP even on the server's host")
    parser.add_argument("--no-prefix-cache", action="store_true", help="disable vLLM's own prefix cache")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--label", default="vllm_worker", help="prefix of the progress lines on stderr")
    parser.add_argument("--batch", action="store_true", help="one generate call for all prompts (scheduled together)")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.batch:  # an in-process engine core sees every request before its first step
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # The connector's INFO lines (matched / fetched / stored) are part of what the tests check. vLLM configures
    # logging in each of its processes from VLLM_LOGGING_CONFIG_PATH, so the kvfabric logger is declared there.
    log_config = Path(tempfile.mkdtemp(prefix="kvfabric-vllm-log-")) / "logging.json"
    log_config.write_text(json.dumps(LOGGING_CONFIG))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(log_config)

    with ticking(args.label, "importing vLLM"):
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

    transfer = None
    if args.url:
        extra = {"url": args.url, "model": args.model_name}
        if args.token:
            extra["token"] = args.token
        if args.tenant:
            extra["tenant"] = args.tenant
        if args.tcp:
            extra["shm"] = False
        transfer = KVTransferConfig(
            kv_connector="KVFabricConnector",
            kv_connector_module_path="kvfabric.client.vllm",
            kv_role=args.kv_role,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=extra,
        )
    with open(args.prompts) as f:
        prompts = json.load(f)
    connector = f"KV connector to {args.url} ({args.kv_role})" if args.url else "no KV connector"
    with ticking(args.label, f"starting the engine, {connector}"):
        llm = LLM(
            model=args.model,
            dtype="float32",
            skip_tokenizer_init=True,
            max_model_len=max(len(p) for p in prompts) + args.max_tokens + 16,
            # --batch: room for every prompt in one step, so requests sharing a prefix are scheduled together
            max_num_batched_tokens=(sum if args.batch else max)(len(p) for p in prompts) + args.max_tokens + 16,
            enable_prefix_caching=not args.no_prefix_cache,
            enforce_eager=True,  # no torch.compile: engine start in seconds, not minutes
            kv_transfer_config=transfer,
            seed=0,
        )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    results = []
    if args.batch:
        progress(args.label, f"{len(prompts)} prompts in one batch, generating {args.max_tokens} each")
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    else:
        outs = []
        for i, prompt in enumerate(prompts, 1):
            progress(args.label, f"prompt {i} of {len(prompts)}: {len(prompt)} tokens, generating {args.max_tokens}")
            outs.append(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0])
    for i, out in enumerate(outs, 1):
        completion = out.outputs[0]
        logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids, strict=True)]
        results.append(
            {"tokens": list(completion.token_ids), "logprobs": logprobs, "num_cached_tokens": out.num_cached_tokens}
        )
        progress(args.label, f"prompt {i}: done, {out.num_cached_tokens} prompt tokens were not recomputed")
    with ticking(args.label, "shutting the engine down"):
        del llm  # the connector drains its pending saves
    print("RESULT " + json.dumps({"results": results}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
