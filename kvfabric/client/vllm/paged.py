"""vLLM's paged KV layout on CPU <-> kvfabric blocks, as pure tensor indexing (no vLLM import).

vLLM's CPU attention backend keeps one tensor per layer of ``[num_blocks, kv_heads, block_size, 2 * head_dim]``
that it reads as ``[num_blocks, kv_heads, 2 * block_size, head_dim]`` split in halves along dim 2: within one
(block, head), all of the block's keys, then all of its values. A kvfabric block holds one layer's share as
``[2, block_size, kv_heads, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def paged_view(kv_layer: torch.Tensor) -> torch.Tensor:
    """``kv_layer`` (``[num_blocks, heads, block_size, 2 * dim]``) as ``[num_blocks, heads, 2, block_size, dim]``."""
    if kv_layer.dim() != 4 or kv_layer.shape[3] % 2:
        raise ValueError(f"expected a CPU paged KV layer [blocks, heads, block_size, 2*dim], got {tuple(kv_layer.shape)}")
    blocks, heads, block_size, two_dim = kv_layer.shape
    return kv_layer.view(blocks, heads, 2, block_size, two_dim // 2)


def layer_geometry(kv_layer: torch.Tensor) -> tuple[int, int, int]:
    """``(kv_heads, block_size, head_dim)`` of one paged layer."""
    _, heads, _, block_size, dim = paged_view(kv_layer).shape
    return heads, block_size, dim


def gather_blocks(kv_layer: torch.Tensor, block_ids: Sequence[int], out: torch.Tensor) -> None:
    """Copy paged blocks ``block_ids`` of one layer into ``out`` = ``[n, 2, block_size, heads, dim]``."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long)
    out.copy_(paged_view(kv_layer).index_select(0, index).permute(0, 2, 3, 1, 4))


def scatter_blocks(kv_layer: torch.Tensor, block_ids: Sequence[int], src: torch.Tensor) -> None:
    """Write ``src`` = ``[n, 2, block_size, heads, dim]`` into paged blocks ``block_ids`` of one layer."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long)
    paged_view(kv_layer).index_copy_(0, index, src.permute(0, 3, 1, 2, 4).to(kv_layer.dtype))
