"""Child process of the live vLLM test: a vLLM engine on the CPU with a small random-weight Llama, publishing its KV
events to the endpoint given. It reads one JSON list of token ids per stdin line, prefills it (two output tokens)
and answers one JSON line ``{"cached_tokens": n}``; it exits at end of input.

    python tests/index/vllm_child.py MODEL_DIR ENDPOINT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 4, 4, 2, 32000
HEAD_DIM = HIDDEN // HEADS
BLOCK_SIZE = 128  # vLLM's block size on the CPU backend


def save_random_llama(path: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=2048, initializer_range=0.15,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)


def serve(model_dir: Path, endpoint: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if not (model_dir / "config.json").exists():
        save_random_llama(model_dir)
    llm = LLM(
        model=str(model_dir), dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=True,
        block_size=BLOCK_SIZE, max_model_len=1024, max_num_seqs=4, seed=0, enforce_eager=True,
        kv_events_config={"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": ""},
    )  # fmt: skip
    params = SamplingParams(max_tokens=2, temperature=0.0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        prompt = json.loads(line)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        print(json.dumps({"cached_tokens": out.num_cached_tokens or 0}), flush=True)
    time.sleep(1.0)  # let the publisher thread send its last batches before the engine shuts down


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2])
