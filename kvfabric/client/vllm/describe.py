"""Read a vLLM engine's KV layout from vLLM itself (backend, ``KVCacheLayout``, KV cache specs) at
``register_kv_caches``, as a :class:`~kvfabric.client.vllm.layouts.PagedLayout`; refuse what kvfabric cannot read.

Everything vLLM-specific about layouts lives here; ``layouts`` stays pure tensor code. What is refused, and why:

- hybrid KV caches (several KV cache groups: vLLM's hybrid manager with sliding-window or Mamba layers): a fabric
  block holds every layer of a block, which those groups do not share. The connector does not claim vLLM's
  ``SupportsHMA``, so vLLM runs sliding-window models (Gemma 3, gpt-oss) with one full-attention group instead,
  whose pages hold every token's KV; those are read like any other;
- layers sharing another layer's KV (``kv_sharing_target_layer_name``), kernel-block splitting, padded pages;
- vLLM's CPU attention with ISA ``neon``, ``vsx``, ``vxe``, ``rvv`` and CPU fp8 caches: their kernels' K/V
  placement is not read here (``vec``/``vec16`` and ``amx`` are, from vLLM's kernels, and checked against the
  shipped kernel in ``tests/engines/test_vllm_layouts.py``);
- backends whose content split is not one of :class:`ContentSplit` (NVFP4, per-token-head quantisation,
  TurboQuant, sparse MLA indexers, ...).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from kvfabric.client.vllm.layouts import ContentSplit, LayoutError, PagedLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)

KV_CONCAT_BACKENDS = frozenset({"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"})
"""Backends that read ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``: K then V in the content axis."""
MLA_BACKENDS = frozenset({"FLASHMLA", "FLASHINFER_MLA", "CUTLASS_MLA", "TRITON_MLA", "FLASH_ATTN_MLA", "CPU_MLA"})
"""MLA backends whose cache is the plain latent ``[B, 1, N, kv_lora_rank + rope_dim]`` (``concat_and_cache_mla``)."""
CPU_BACKEND = "CPU_ATTN"
CPU_ISAS = {"vec": ContentSplit.CPU_KT_V, "vec16": ContentSplit.CPU_KT_V, "amx": ContentSplit.CPU_AMX}
"""CPU ISAs whose ``reshape_and_cache`` placement kvfabric reads: ``vec`` writes K as ``[head_dim, block_size]``
and V as ``[block_size, head_dim]`` per (block, head) (``AttentionImpl<ISA::VEC>``; ``VEC16`` inherits it), ``amx``
tiles both (``AttentionImpl<ISA::AMX>``; see ``layouts``)."""
PLAIN_CACHE_DTYPES = frozenset({"auto", "float16", "bfloat16", "float32", "half", "float"})
FP8_CACHE_DTYPES = {"fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def kv_quant_name(cache_dtype: str) -> str:
    """The ModelSpec ``kv_quant`` of a vLLM ``cache_dtype``; refuses the quantisations kvfabric cannot carry.

    fp8 caches use vLLM's per-tensor ``k_scale``/``v_scale``, which come with the checkpoint (1.0 without one), so
    the model name and revision fix them; the name says so.
    """
    if cache_dtype in PLAIN_CACHE_DTYPES:
        return "none"
    if cache_dtype in FP8_CACHE_DTYPES:
        return f"{FP8_CACHE_DTYPES[cache_dtype]};scales=checkpoint"
    raise LayoutError(
        f"kv_cache_dtype {cache_dtype!r} is not supported by kvfabric (supported: auto, float16, bfloat16, "
        f"{', '.join(FP8_CACHE_DTYPES)}); its pages pack scales or codes kvfabric does not read"
    )


def describe(
    vllm_config: VllmConfig,
    kv_cache_config: KVCacheConfig | None,
    kv_caches: dict[str, torch.Tensor],
    layer_names: list[str],
) -> PagedLayout:
    """The layout of ``kv_caches`` (ordered ``layer_names``), or a :class:`LayoutError` naming what is refused."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
            raise LayoutError(
                f"hybrid KV cache ({len(groups)} KV cache groups: {', '.join(kinds)}) is not supported by kvfabric: "
                "a fabric block holds every layer of a block; run with --disable-hybrid-kv-cache-manager only if "
                "all layers keep full attention"
            )
        spec = groups[0].kv_cache_spec
        # One group of FullAttentionSpec also covers sliding-window layers when vLLM's hybrid manager is off (as
        # vLLM does for connectors without HMA support): their blocks then hold every token's KV, like full ones.
        if not isinstance(spec, FullAttentionSpec):
            raise LayoutError(
                f"KV cache spec {type(spec).__name__} is not supported (kvfabric stores full-attention pages)"
            )
        if getattr(spec, "page_size_padded", None) is not None:
            raise LayoutError(f"padded KV pages ({spec.page_size_padded} bytes) are not supported")
        if getattr(spec, "num_head_slots", None) is not None or getattr(spec, "state_content_bytes", None) is not None:
            raise LayoutError(f"packed KV pages (backend-defined head slots/content) are not supported: {spec}")
    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    missing = [n for n in layer_names if n not in layers]
    if missing:
        raise LayoutError(f"KV layers {missing[:4]} are not attention layers vLLM knows (hybrid model?)")
    shared = [n for n in layer_names if getattr(layers[n], "kv_sharing_target_layer_name", None)]
    if shared:
        raise LayoutError(f"layers {shared[:4]} reuse another layer's KV cache (KV sharing), not supported")
    backends = {layers[n].get_attn_backend().get_name() for n in layer_names}
    if len(backends) != 1:
        raise LayoutError(f"layers use several attention backends {sorted(backends)}; kvfabric needs one")
    backend = backends.pop()
    physical = vllm_config.cache_config.get_resolved_kv_cache_layout()
    cache = vllm_config.cache_config
    model = vllm_config.model_config
    first = kv_caches[layer_names[0]]
    if first.dim() != 4:
        raise LayoutError(f"{backend}: KV layer tensors of shape {tuple(first.shape)}; kvfabric reads [B, H, N, C]")
    if kv_cache_config is not None and first.shape[0] != kv_cache_config.num_blocks:
        raise LayoutError(
            f"{backend}: {first.shape[0]} kernel blocks for {kv_cache_config.num_blocks} vLLM blocks (kernel block "
            "splitting) is not supported; choose a --block-size the backend takes whole"
        )
    block_size = int(cache.block_size)
    kv_quant_name(str(cache.cache_dtype))  # refuses unsupported quantisations with a clear message
    use_mla = bool(model.use_mla)
    if use_mla:
        if kv_cache_config is not None and not isinstance(groups[0].kv_cache_spec, MLAAttentionSpec):
            raise LayoutError(f"{backend}: MLA model without an MLA KV cache spec")
        if backend not in MLA_BACKENDS:
            raise LayoutError(f"MLA backend {backend} is not supported (supported: {', '.join(sorted(MLA_BACKENDS))})")
        split = ContentSplit.LATENT
        heads, head_dim = 1, int(model.get_head_size())
    else:
        heads = int(model.get_num_kv_heads(vllm_config.parallel_config))
        head_dim = int(model.get_head_size())
        if backend in KV_CONCAT_BACKENDS:
            split = ContentSplit.KV_CONCAT
        elif backend == CPU_BACKEND:
            isa = cpu_isa(layers[layer_names[0]], first.dtype, block_size, head_dim, str(cache.cache_dtype))
            if isa not in CPU_ISAS:
                raise LayoutError(
                    f"vLLM CPU attention with ISA {isa!r} (dtype {first.dtype}, block size {block_size}) places K/V "
                    f"by a rule kvfabric does not read; supported ISAs: {sorted(CPU_ISAS)}"
                )
            split = CPU_ISAS[isa]
            if cache.cache_dtype not in PLAIN_CACHE_DTYPES:
                raise LayoutError(f"vLLM CPU attention with kv_cache_dtype {cache.cache_dtype!r} is not supported")
        else:
            raise LayoutError(
                f"attention backend {backend} is not supported by kvfabric: its content split is not known "
                f"(supported: {', '.join(sorted(KV_CONCAT_BACKENDS | MLA_BACKENDS | {CPU_BACKEND}))})"
            )
    layout = PagedLayout(
        backend=backend, split=split, physical=physical.name, kv_heads=heads, block_size=block_size,
        head_dim=head_dim, cross_layer=bool(physical.is_block_outermost),
    )  # fmt: skip
    for name in layer_names:
        layout.check(name, kv_caches[name])
    return layout


def cpu_isa(layer: object, dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str) -> str:
    """The ISA vLLM's CPU backend chose for ``layer`` (set by its metadata builder), else vLLM's own rule."""
    isa = getattr(layer, "isa", None)
    if isinstance(isa, str):
        return isa
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return str(_get_attn_isa(dtype, block_size, head_dim, cache_dtype))


def layer_scales(vllm_config: VllmConfig, layer_names: list[str]) -> list[tuple[float, float]]:
    """Per-layer fp8 ``(k_scale, v_scale)`` as vLLM holds them, for the registration log line."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    return [
        (float(getattr(layers[n], "_k_scale_float", 1.0)), float(getattr(layers[n], "_v_scale_float", 1.0)))
        for n in layer_names
    ]
