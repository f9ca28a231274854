"""A transformers worker that shares KV with other workers only through ``kvfabric serve``.

    python examples/hf_worker.py prefill --url URL --token TOKEN --model DIR --prompts IN.json --out OUT.json
    python examples/hf_worker.py decode  --url URL --token TOKEN --model DIR --prompts IN.json --out OUT.json

``prefill`` runs each prompt once and publishes its KV; ``decode`` fetches the longest cached prefix of each prompt,
computes only the rest and generates greedily. ``--no-fabric`` generates without the fabric (the reference).
Output: ``{"results": [{"tokens", "logprobs", "matched_tokens", "published_blocks", "seconds"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["prefill", "decode"])
    parser.add_argument("--url", default="kvfabric://127.0.0.1:9500")
    parser.add_argument("--token")
    parser.add_argument("--model", required=True, help="a transformers checkpoint directory")
    parser.add_argument("--model-name", default=None, help="name the KV is stored under (default: --model)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompts", required=True, type=Path, help="JSON list of token-id lists")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-fabric", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")

    import torch
    from transformers import AutoModelForCausalLM

    from kvfabric.client import Client
    from kvfabric.client.hf import HFAdapter, spec_for_hf

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    spec = spec_for_hf(model.config, block_size=args.block_size, model=args.model_name or args.model)
    prompts = json.loads(args.prompts.read_text())
    results = []
    with Client(args.url, token=args.token) as client:
        adapter = HFAdapter(model, client, spec, publish=args.role == "prefill")
        for prompt in prompts:
            started = time.perf_counter()
            if args.role == "prefill":
                pre = adapter.prefill(prompt, use_fabric=False)
                out = {"tokens": [], "logprobs": [], "matched_tokens": 0, "published_blocks": pre.published_blocks}
            else:
                gen = adapter.generate(prompt, args.max_new_tokens, use_fabric=not args.no_fabric)
                out = {
                    "tokens": list(gen.tokens), "logprobs": list(gen.logprobs),
                    "matched_tokens": gen.matched_tokens, "published_blocks": gen.published_blocks,
                }  # fmt: skip
            out["seconds"] = time.perf_counter() - started
            logging.getLogger("hf_worker").info(
                "%s: %d-token prompt, %d matched, %d blocks published, %.2f s",
                args.role, len(prompt), out["matched_tokens"], out["published_blocks"], out["seconds"],
            )  # fmt: skip
            results.append(out)
    args.out.write_text(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
