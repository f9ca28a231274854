"""vLLM's paged KV layouts <-> kvfabric's one canonical block, as pure tensor views (no vLLM import).

vLLM 0.32 hands a connector one tensor per attention layer, always with the *logical* shape ``[B, H, N, C]``
(blocks, head slots, tokens per block, content), and places those axes in memory by a ``KVCacheLayout`` stride
permutation of ``[L, B, H, N, C]`` (``LBHNC`` = "HND", ``LBNHC`` = "NHD", block-outermost ``BLHNC``/``BLNHC``/...
for the cross-layer form, where one block's bytes for all layers are contiguous). Torch strides carry the
permutation, so indexing the logical axes is right for every permutation; what differs between backends is how the
content axis ``C`` holds a token's key and value (:class:`ContentSplit`):

- ``KV_CONCAT`` (FlashAttention, FlashInfer, Triton, FlexAttention): ``C = 2 * head_dim``, key then value of one
  (token, head): the backends read ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``.
- ``CPU_KT_V`` (vLLM's CPU attention, ISA ``vec``/``vec16``): the backend views ``[B, H, N, 2D]`` as
  ``[B, H, 2N, D]`` and takes the halves of dim 2 as key and value caches, and its kernel
  (``cpu_attn_reshape_and_cache``) writes keys column-major: within one (block, head) page the first
  ``N * D`` elements are the keys as ``[D, N]``, the next ``N * D`` the values as ``[N, D]``.
- ``CPU_AMX`` (vLLM's CPU attention, ISA ``amx``: bf16 with a block size that is a multiple of 32 on an AMX host):
  the same halves, tiled for AMX by ``AttentionImpl<ISA::AMX>::reshape_and_cache``: keys in groups of 16 tokens,
  each group ``[D / 2, 16, 2]`` (pairs of dims, token-minor); values as ``[D / 16, N / 2, 16, 2]`` (16 dims by
  pairs of tokens).
- ``LATENT`` (MLA): one head slot, ``C`` = the latent vector (``kv_lora_rank + rope_dim``), no K/V split.

The canonical block (``ModelSpec.block_shape``) is ``[layers, 2, block_size, kv_heads, head_dim]``, or
``[layers, block_size, latent_dim]`` for MLA; a layer's share of it is ``[2, N, H, D]`` (``[N, D]``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvfabric.errors import ConfigError


class LayoutError(ConfigError):
    """An engine's KV cache is in a layout kvfabric does not read (refused at registration, never guessed)."""


class ContentSplit(enum.Enum):
    """How one (token, head) cell's content holds K and V; see the module docstring."""

    KV_CONCAT = "kv_concat"
    CPU_KT_V = "cpu_kt_v"
    CPU_AMX = "cpu_amx"
    LATENT = "latent"

    @property
    def cpu(self) -> bool:
        """Splits of vLLM's CPU backend: K and V in the two halves of each (block, head) page."""
        return self in (ContentSplit.CPU_KT_V, ContentSplit.CPU_AMX)


AMX_KEY_GROUP = 16  # tokens per key group: one 64-byte AMX tile row holds 16 pairs of bf16 dims
AMX_VALUE_DIMS = 16  # dims per value group (the AMX B tile's N)
AMX_BLOCK_ALIGN = 32  # vLLM's AMX kernel needs block_size % 32 == 0 (one tile row of bf16)


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """How one engine's paged KV cache maps onto canonical blocks. Plain data: built by ``describe`` from vLLM's
    own description, or directly in tests."""

    backend: str  # vLLM attention backend name (for messages)
    split: ContentSplit
    physical: str  # vLLM KVCacheLayout name, e.g. "LBHNC"
    kv_heads: int
    block_size: int
    head_dim: int  # per K (and per V); the latent width for MLA
    cross_layer: bool = False  # block-outermost (BLHNC, ...): a block's pages of all layers sit together

    @property
    def latent(self) -> bool:
        return self.split is ContentSplit.LATENT

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """One layer's share of a canonical block."""
        if self.latent:
            return (self.block_size, self.head_dim)
        return (2, self.block_size, self.kv_heads, self.head_dim)

    def describe(self) -> str:
        return f"{self.backend} ({self.split.value}, {self.physical}{', cross-layer' if self.cross_layer else ''})"

    # --- checks --------------------------------------------------------------------------------------------------
    def expected_cell(self) -> tuple[int, int, int]:
        """``(H, N, C)`` of one logical page."""
        if self.latent:
            return (1, self.block_size, self.head_dim)
        return (self.kv_heads, self.block_size, 2 * self.head_dim)

    def check(self, name: str, cache: torch.Tensor) -> None:
        """Refuse a layer tensor that does not have this layout's logical shape and content strides."""
        if cache.dim() != 4 or tuple(cache.shape[1:]) != self.expected_cell():
            raise LayoutError(
                f"KV layer {name}: {self.describe()} expects [blocks, {', '.join(map(str, self.expected_cell()))}], "
                f"got {tuple(cache.shape)}"
            )
        if cache.stride(-1) != 1:
            raise LayoutError(f"KV layer {name}: content axis is not contiguous (strides {cache.stride()})")
        if self.split.cpu and (cache.stride(-2) != cache.shape[-1] or cache.stride(-3) !=
                               cache.shape[-1] * cache.shape[-2]):  # fmt: skip
            raise LayoutError(
                f"KV layer {name}: the CPU backend's (block, head) pages must be contiguous (layout LBHNC), got "
                f"strides {cache.stride()}"
            )
        if self.split is ContentSplit.CPU_AMX and (
            cache.element_size() != 2 or self.block_size % AMX_BLOCK_ALIGN or self.head_dim % AMX_VALUE_DIMS
        ):
            raise LayoutError(
                f"KV layer {name}: vLLM's AMX tiling is defined for bf16, block_size % {AMX_BLOCK_ALIGN} == 0 and "
                f"head_dim % {AMX_VALUE_DIMS} == 0; got {cache.dtype}, block_size {self.block_size}, "
                f"head_dim {self.head_dim}"
            )

    # --- views ---------------------------------------------------------------------------------------------------
    def parts(self, cache: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """Views of ``cache`` = ``[B, ..., H, N, C]`` (optionally a layer axis after B) holding the canonical parts.

        Each item is ``(view, factors)``: ``view`` is ``[B, ..., *factors]`` and a canonical part (K or V
        ``[n, ..., N, H, D]``, or MLA's latent ``[n, ..., N, D]``) viewed as ``[n, ..., *factors]`` lines up with
        it element for element (``factors`` splits N and D where a tiled layout interleaves them). Views, never
        copies: writing into them writes the engine's cache.
        """
        n, h, d = self.block_size, self.kv_heads, self.head_dim
        plain = (n, h, d)
        if self.split is ContentSplit.KV_CONCAT:
            kv = cache.unflatten(-1, (2, d))  # [..., H, N, 2, D]
            return [(kv.select(-2, j).transpose(-3, -2), plain) for j in range(2)]
        if self.split is ContentSplit.LATENT:
            return [(cache.select(-3, 0), (n, d))]  # [..., 1, N, C] -> [..., N, C]
        page = cache.view(*cache.shape[:-2], 2 * n * d)  # [..., H, 2ND]; view(): fails rather than copies
        keys, values = page[..., : n * d], page[..., n * d :]
        if self.split is ContentSplit.CPU_KT_V:
            return [
                (keys.unflatten(-1, (d, n)).movedim(-1, -3), plain),  # [..., H, D, N] -> [..., N, H, D]
                (values.unflatten(-1, (n, d)).transpose(-3, -2), plain),  # [..., H, N, D] -> [..., N, H, D]
            ]
        # CPU_AMX: key element (token g*16 + t, dim 2j + e) sits at [g, j, t, e]; value element (token 2s + e,
        # dim 16i + j) at [i, s, j, e] (see the module docstring).
        g, t = n // AMX_KEY_GROUP, AMX_KEY_GROUP
        k_tiles = keys.unflatten(-1, (g, d // 2, t, 2))  # [..., H, G, J, T, E]
        i, jv = d // AMX_VALUE_DIMS, AMX_VALUE_DIMS
        v_tiles = values.unflatten(-1, (i, n // 2, jv, 2))  # [..., H, I, S, J, E]
        lead = list(range(k_tiles.dim() - 5))
        end = k_tiles.dim()
        return [
            (k_tiles.permute(*lead, end - 4, end - 2, end - 5, end - 3, end - 1), (g, t, h, d // 2, 2)),
            (v_tiles.permute(*lead, end - 3, end - 1, end - 5, end - 4, end - 2), (n // 2, 2, h, i, jv)),
        ]

    def _copy(self, cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, block: torch.Tensor, lead: int,
              *, into_cache: bool) -> None:  # fmt: skip
        """Move blocks between ``cache`` and canonical ``block`` (``[n, *lead_axes, ...]``, ``lead`` leading axes)."""
        index = _index(block_ids, cache.device)
        canonical = [block] if self.latent else [block.select(lead, j) for j in range(2)]  # K, V
        for (view, factors), part in zip(self.parts(cache), canonical, strict=True):
            shaped = part.view(*part.shape[:lead], *factors)
            if into_cache:
                view.index_copy_(0, index, shaped)
            else:
                shaped.copy_(view.index_select(0, index))

    # --- one layer -----------------------------------------------------------------------------------------------
    def gather(self, cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, out: torch.Tensor) -> None:
        """Copy engine blocks ``block_ids`` of one layer into ``out`` = ``[n, *layer_shape]`` (any device)."""
        self._copy(cache, block_ids, out, 1, into_cache=False)

    def scatter(self, cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src`` = ``[n, *layer_shape]`` into engine blocks ``block_ids`` of one layer."""
        self._copy(cache, block_ids, src.to(device=cache.device, dtype=cache.dtype), 1, into_cache=True)

    # --- all layers at once (cross-layer layouts) ----------------------------------------------------------------
    def gather_all(self, stacked: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, out: torch.Tensor) -> None:
        """Like :meth:`gather` for ``stacked`` = ``[B, L, H, N, C]`` (:func:`stack_layers`) into ``[n, L, ...]``."""
        self._copy(stacked, block_ids, out, 2, into_cache=False)

    def scatter_all(self, stacked: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, src: torch.Tensor) -> None:
        self._copy(stacked, block_ids, src.to(device=stacked.device, dtype=stacked.dtype), 2, into_cache=True)


def stack_layers(caches: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """All layers as one strided view ``[B, L, H, N, C]`` when they sit in one allocation a constant stride
    apart (every vLLM layout; cross-layer ones make a block's layers adjacent), else ``None``."""
    first = caches[0]
    if any(c.shape != first.shape or c.stride() != first.stride() or c.dtype != first.dtype for c in caches):
        return None
    if any(c.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for c in caches):
        return None
    offsets = [c.storage_offset() for c in caches]
    step = offsets[1] - offsets[0] if len(caches) > 1 else 1
    if step <= 0 or any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    size = (first.shape[0], len(caches), *first.shape[1:])
    stride = (first.stride(0), step, *first.stride()[1:])
    return first.as_strided(size, stride, first.storage_offset())


def _index(block_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device=device, dtype=torch.long)
    return torch.as_tensor(list(block_ids), dtype=torch.long, device=device)
