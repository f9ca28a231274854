"""Deterministic test blocks: real ModelSpecs, real chained hashes, random payloads."""

from __future__ import annotations

import numpy as np

from kvfabric.hashing import block_hash, root_hash
from kvfabric.ids import BlockKey, Namespace
from kvfabric.record import Block, BlockMeta, now_ms
from kvfabric.spec import DType, ModelSpec

SPEC = ModelSpec(model="test/tiny-llama", num_layers=2, kv_heads=2, head_dim=16, dtype=DType.BFLOAT16, block_size=16)
"""A small spec: 2 x 2 x 16 x 2 x 16 bf16 = 4 KiB per block."""


def make_chain(
    n: int,
    *,
    spec: ModelSpec = SPEC,
    namespace: str = "tenant-a",
    seed: int = 0,
    salt: bytes = b"",
) -> list[Block]:
    """``n`` consecutive blocks of one random token chain, each with a random payload."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32000, size=n * spec.block_size)
    parent = root_hash(spec.fingerprint(), salt)
    out = []
    for i in range(n):
        h = block_hash(parent, tokens[i * spec.block_size : (i + 1) * spec.block_size])
        meta = BlockMeta(
            BlockKey(Namespace(namespace), spec.fingerprint(), h), spec.dtype, spec.block_shape, spec.block_size,
            parent, now_ms(),
        )
        out.append(Block(meta, rng.integers(0, 256, size=spec.block_nbytes, dtype=np.uint8).tobytes()))
        parent = h
    return out


def make_block(*, spec: ModelSpec = SPEC, namespace: str = "tenant-a", seed: int = 0) -> Block:
    return make_chain(1, spec=spec, namespace=namespace, seed=seed)[0]
