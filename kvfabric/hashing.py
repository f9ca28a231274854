"""Chained, cryptographic prefix hashes.

    h_{-1} = H("kvfabric/prefix/v1" || u16 len(salt) || salt || model_fingerprint)
    h_i    = H(h_{i-1} || u32 n || tokens_i as n x u32 || u32 len(extra_i) || extra_i)

H is BLAKE2b-256, integers are little-endian, so hashes are identical across processes, machines and Python
versions (no builtin ``hash``, no pickle). Only full blocks are hashed: a trailing partial block has no key.

The tenant salt comes from the server's secret and the *authenticated* tenant name (:func:`tenant_salt`), so a
client cannot compute, probe or poison another tenant's chain. Golden vectors: ``docs/hashing.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvfabric.ids import HASH_BYTES, ChunkHash, ModelFingerprint, PrefixHash

HASH_VERSION = b"kvfabric/prefix/v1"
MAX_TOKEN_ID = 2**32 - 1


def tenant_salt(server_secret: bytes, tenant: str) -> bytes:
    """The salt for ``tenant``: keyed BLAKE2b of the tenant name under the server's secret."""
    if not server_secret:
        raise ValueError("server secret must be non-empty")
    return hashlib.blake2b(tenant.encode(), key=server_secret[:64], digest_size=HASH_BYTES).digest()


def root_hash(model: ModelFingerprint, salt: bytes = b"") -> PrefixHash:
    """``h_{-1}``: the parent of a chain's first block."""
    if len(salt) > 0xFFFF:
        raise ValueError("salt longer than 65535 bytes")
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(HASH_VERSION)
    h.update(len(salt).to_bytes(2, "little"))
    h.update(salt)
    h.update(model)
    return PrefixHash(h.digest())


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise ValueError("token ids must be integers in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


def block_hash(parent: PrefixHash, tokens: Sequence[int] | np.ndarray, extra: bytes = b"") -> PrefixHash:
    """``h_i`` for one block given its parent's hash."""
    if len(parent) != HASH_BYTES:
        raise ValueError(f"parent hash must be {HASH_BYTES} bytes")
    data = _token_bytes(tokens)
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(parent)
    h.update((len(data) // 4).to_bytes(4, "little"))
    h.update(data)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    return PrefixHash(h.digest())


def chunk_hash(tokens: Sequence[int] | np.ndarray, extra: bytes = b"") -> ChunkHash:
    """Hash of one block's tokens alone (parent = all zeros); not a key, only a content id."""
    return ChunkHash(block_hash(PrefixHash(bytes(HASH_BYTES)), tokens, extra))


def prefix_hashes(
    root: PrefixHash,
    tokens: Sequence[int] | np.ndarray,
    block_size: int,
    extras: Sequence[bytes] | None = None,
) -> list[PrefixHash]:
    """Hashes of every *full* block of ``tokens``: ``len(tokens) // block_size`` of them.

    ``extras[i]`` (LoRA id, multimodal content hashes; see :func:`encode_extra`) enters block i's hash.
    Same bytes as chaining :func:`block_hash`, but the tokens are checked and converted once, not per block.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if len(root) != HASH_BYTES:
        raise ValueError(f"parent hash must be {HASH_BYTES} bytes")
    n_blocks = len(tokens) // block_size
    if extras is not None and len(extras) < n_blocks:
        raise ValueError(f"{len(extras)} extras given for {n_blocks} blocks")
    data = memoryview(_token_bytes(tokens[: n_blocks * block_size]))
    step = 4 * block_size
    count = block_size.to_bytes(4, "little")
    no_extra = (0).to_bytes(4, "little")
    blake2b = hashlib.blake2b
    out: list[PrefixHash] = []
    parent = root
    for i in range(n_blocks):
        h = blake2b(parent, digest_size=HASH_BYTES)
        h.update(count)
        h.update(data[i * step : (i + 1) * step])
        if extras and extras[i]:
            h.update(len(extras[i]).to_bytes(4, "little"))
            h.update(extras[i])
        else:
            h.update(no_extra)
        parent = PrefixHash(h.digest())
        out.append(parent)
    return out


def encode_extra(lora_id: str | None = None, mm_hashes: Sequence[bytes] = ()) -> bytes:
    """Canonical bytes for a block's extra keys: ``u16 len || lora_id`` then ``u16 count`` and each mm hash
    length-prefixed. Empty when there is nothing extra, so plain text blocks hash the same everywhere."""
    if lora_id is None and not mm_hashes:
        return b""
    lora = (lora_id or "").encode()
    parts = [len(lora).to_bytes(2, "little"), lora, len(mm_hashes).to_bytes(2, "little")]
    for mm in mm_hashes:
        parts += [len(mm).to_bytes(2, "little"), mm]
    return b"".join(parts)
