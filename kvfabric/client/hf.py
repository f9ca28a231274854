"""Hugging Face transformers adapter: publish a prompt's KV to the fabric, continue generation from fetched KV.

A prefill process runs the prompt once and publishes every full block; any other process holding the same weights
fetches the longest cached prefix, turns it into a ``DynamicCache`` and computes only the tokens after it. Batch
size 1, decoder-only models whose attention layers all keep full (non-sliding) KV, e.g. Llama, Mistral, Qwen2.

Layouts: transformers keeps per layer ``keys``/``values`` of ``[batch, kv_heads, seq, head_dim]``; a fabric block is
``[layers, 2, block_size, kv_heads, head_dim]`` (:attr:`ModelSpec.block_shape`), and runs of blocks are stacked on a
leading axis.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvfabric.client.buffers import torch_dtype
from kvfabric.errors import KVFabricError
from kvfabric.spec import DType, ModelSpec

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

    from kvfabric.client import Client

log = logging.getLogger(__name__)


def spec_for_hf(
    config: PretrainedConfig,
    *,
    block_size: int = 16,
    model: str | None = None,
    revision: str = "main",
    dtype: str | torch.dtype | None = None,
) -> ModelSpec:
    """The ModelSpec of a transformers model's KV: layers, KV heads and head dim from ``config``.

    ``model`` defaults to the config's ``name_or_path``; pass a stable name when weights were loaded from a local
    path that differs between processes. ``dtype`` defaults to the config's dtype (float32 when it has none).
    """
    name = model or getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    if not name:
        raise ValueError("config has no name_or_path; pass model=<name> to spec_for_hf")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return ModelSpec(
        model=str(name),
        revision=revision,
        dtype=DType.parse(str(dtype)),
        num_layers=config.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
    )


def cache_to_blocks(cache: DynamicCache, spec: ModelSpec, first_block: int, end_block: int) -> torch.Tensor:
    """Blocks ``[first_block, end_block)`` of ``cache`` (batch 1) as ``[n, layers, 2, block_size, kv_heads, dim]``."""
    n = end_block - first_block
    bs, heads, dim = spec.block_size, spec.kv_heads, spec.head_dim
    if len(cache.layers) != spec.num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, spec {spec.model} has {spec.num_layers}")
    if cache.get_seq_length() < end_block * bs:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens, block {end_block - 1} needs {end_block * bs}")
    out = torch.empty((n, *spec.block_shape), dtype=torch_dtype(spec.dtype))
    lo, hi = first_block * bs, end_block * bs
    for i, layer in enumerate(cache.layers):
        for j, states in enumerate((layer.keys, layer.values)):
            # [1, H, T, D] -> [H, n, bs, D] -> [n, bs, H, D]
            out[:, i, j] = states[0, :, lo:hi].reshape(heads, n, bs, dim).permute(1, 2, 0, 3)
    return out


def blocks_to_cache(kv: torch.Tensor, config: PretrainedConfig, device: torch.device | str = "cpu") -> DynamicCache:
    """A ``DynamicCache`` (batch 1) holding the stacked blocks ``kv`` = ``[n, layers, 2, block_size, heads, dim]``."""
    from transformers import DynamicCache

    n, layers, two, bs, heads, dim = kv.shape
    if two != 2 or layers != config.num_hidden_layers:
        raise ValueError(f"blocks of shape {tuple(kv.shape)} do not fit a {config.num_hidden_layers}-layer model")
    cache = DynamicCache(config=config)
    for i in range(layers):
        # [n, bs, H, D] -> [1, H, n*bs, D]
        keys = kv[:, i, 0].permute(2, 0, 1, 3).reshape(1, heads, n * bs, dim).to(device).contiguous()
        values = kv[:, i, 1].permute(2, 0, 1, 3).reshape(1, heads, n * bs, dim).to(device).contiguous()
        cache.update(keys, values, i)
    return cache


@dataclass(frozen=True, slots=True)
class Prefill:
    """A prompt's KV and the logits after its last token; ``matched_tokens`` of it came from the fabric."""

    cache: DynamicCache
    last_logits: torch.Tensor
    matched_tokens: int
    published_blocks: int


@dataclass(frozen=True, slots=True)
class Generation:
    """Greedy continuation of a prompt: each new token with its log-probability."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    matched_tokens: int
    published_blocks: int


class HFAdapter:
    """A transformers causal LM whose prefill reads from and writes to the fabric through a :class:`Client`.

    ``publish`` stores the prompt's newly computed full blocks after each prefill. Any fabric failure (server down,
    corrupt or evicted block) is logged and the prompt is recomputed: the fabric can only make a request faster.
    ``client=None`` runs the model without a fabric (a reference to compare against).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        client: Client | None,
        spec: ModelSpec | None = None,
        *,
        block_size: int = 16,
        publish: bool = True,
    ) -> None:
        self.model = model
        self.client = client
        self.spec = spec or spec_for_hf(model.config, block_size=block_size)
        self.publish_blocks = publish
        self._device = next(model.parameters()).device
        self._registered = False

    def _ensure_registered(self) -> None:
        assert self.client is not None
        if not self._registered:
            self.client.register_model(self.spec)
            self._registered = True

    def fetch(self, tokens: Sequence[int]) -> tuple[DynamicCache | None, int]:
        """The KV of the longest cached prefix of ``tokens`` that leaves at least one token to compute.

        Returns ``(cache, matched_tokens)``; ``(None, 0)`` on a miss or any fabric failure (logged).
        """
        bs = self.spec.block_size
        usable = (len(tokens) - 1) // bs * bs  # the last token must run through the model to give logits
        if usable <= 0 or self.client is None:
            return None, 0
        prefix = list(tokens[:usable])
        try:
            self._ensure_registered()
            found = self.client.lookup(self.spec, prefix).blocks
            if found == 0:
                return None, 0
            hashes = self.client.block_hashes(self.spec, prefix)[:found]
            kv = torch.empty((found, *self.spec.block_shape), dtype=torch_dtype(self.spec.dtype))
            got = self.client.get_blocks(self.spec, hashes, [kv[i] for i in range(found)])
        except KVFabricError as exc:
            log.warning("kvfabric fetch failed for a %d-token prompt, recomputing it: %s", len(tokens), exc)
            return None, 0
        n = next((i for i, g in enumerate(got) if g is None), found)
        if n < found:
            log.warning(
                "kvfabric: block %d of %d was missing or corrupt when fetched; recomputing from token %d",
                n, found, n * bs,
            )  # fmt: skip
        if n == 0:
            return None, 0
        return blocks_to_cache(kv[:n], self.model.config, self._device), n * bs

    def publish(self, tokens: Sequence[int], cache: DynamicCache, first_block: int = 0) -> int:
        """Store the full blocks of ``tokens`` from ``first_block`` on, taken from ``cache``; returns blocks stored.

        Failures are logged and return 0: publishing is an optimisation for later requests, never a requirement.
        """
        end_block = min(len(tokens), cache.get_seq_length()) // self.spec.block_size
        if end_block <= first_block or self.client is None:
            return 0
        try:
            self._ensure_registered()
            hashes = self.client.block_hashes(self.spec, list(tokens[: end_block * self.spec.block_size]))
            kv = cache_to_blocks(cache, self.spec, first_block, end_block)
            parent = hashes[first_block - 1] if first_block > 0 else None
            blocks = [kv[i] for i in range(end_block - first_block)]
            return int(self.client.put_blocks(self.spec, hashes[first_block:], blocks, parent))
        except KVFabricError as exc:
            log.warning("kvfabric publish of %d blocks failed: %s", end_block - first_block, exc)
            return 0

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], *, use_fabric: bool = True) -> Prefill:
        """Run ``tokens`` through the model, starting from the fabric's longest cached prefix when ``use_fabric``."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        cache, matched = self.fetch(tokens) if use_fabric else (None, 0)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([list(tokens[matched:])], dtype=torch.long, device=self._device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        published = 0
        if self.publish_blocks:
            published = self.publish(tokens, out.past_key_values, matched // self.spec.block_size)
        return Prefill(out.past_key_values, out.logits[0, -1].float(), matched, published)

    @torch.inference_mode()
    def generate(self, tokens: Sequence[int], max_new_tokens: int, *, use_fabric: bool = True) -> Generation:
        """Greedy decoding of ``max_new_tokens`` after ``tokens``, with each chosen token's log-probability."""
        pre = self.prefill(tokens, use_fabric=use_fabric)
        cache, logits = pre.cache, pre.last_logits
        out_tokens: list[int] = []
        logprobs: list[float] = []
        for step in range(max_new_tokens):
            lp = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(lp))
            out_tokens.append(token)
            logprobs.append(float(lp[token]))
            if step + 1 == max_new_tokens:
                break
            ids = torch.tensor([[token]], dtype=torch.long, device=self._device)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1].float()
        return Generation(tuple(out_tokens), tuple(logprobs), pre.matched_tokens, pre.published_blocks)
