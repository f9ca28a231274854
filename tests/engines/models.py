"""Small random-weight Llama checkpoints: real models whose greedy tokens are meaningful, with nothing to download.

``load_format="dummy"`` in vLLM gives uniform logits, useless for checking tokens; a random checkpoint saved with
``save_pretrained`` and loaded by both vLLM and transformers yields identical greedy tokens, so KV fetched from the
fabric can be checked token for token against a recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The dimensions of a random Llama."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000
    max_positions: int = 16384


TINY = LlamaShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512)
"""The configuration the issue names: 4 layers, 64-dim heads, 4 KiB of fp32 KV per token."""

MEDIUM = LlamaShape(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816)
"""A model with ~100x the per-token prefill FLOPs of ``TINY`` and 8x its KV per token."""

SHAPES = {"tiny": TINY, "medium": MEDIUM}


def save_random_llama(path: str | Path, shape: LlamaShape = TINY, *, seed: int = 0) -> Path:
    """Write a float32 random-weight Llama checkpoint (config + safetensors) to ``path`` and return it.

    ``initializer_range=0.15`` makes the logits peaked enough that greedy decoding is stable under the tiny
    floating-point differences between engines.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.max_positions,
        initializer_range=0.15,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    out = Path(path)
    model.save_pretrained(out)
    return out


def random_prompt(n: int, *, seed: int, vocab: int = 32000) -> list[int]:
    """``n`` reproducible random token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()
