"""Every kind of hash and id in kvfabric, each its own type, so passing the wrong one fails the type check.

All hashes are raw ``bytes`` of fixed length; ``.hex()`` is for humans and JSON only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

HASH_BYTES = 32
"""Length of every hash kvfabric computes (BLAKE2b-256)."""

PrefixHash = NewType("PrefixHash", bytes)
"""Chained hash of a block *and everything before it*: ``h_i = H(h_{i-1} || tokens_i || extra_i)``."""

ChunkHash = NewType("ChunkHash", bytes)
"""Hash of one block's tokens alone, without its parent (used to re-key foreign events)."""

ModelFingerprint = NewType("ModelFingerprint", bytes)
"""Hash of a ModelSpec's canonical serialisation; blocks of different fingerprints never mix."""

Namespace = NewType("Namespace", str)
"""A tenant's namespace: quotas, TTLs and isolation apply per namespace."""

TierId = NewType("TierId", str)
"""Name of a tier: ``"ram"``, ``"disk"``, ``"object"``, or an engine medium such as ``"gpu"``."""

NULL_HASH = PrefixHash(bytes(HASH_BYTES))
"""Stands for "no parent" in records and events."""

MAX_NAMESPACE_BYTES = 255


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Where a block lives in the fabric's key space: namespace, model fingerprint, chained prefix hash."""

    namespace: Namespace
    model: ModelFingerprint
    prefix: PrefixHash

    def __post_init__(self) -> None:
        ns = self.namespace.encode()
        if not ns or len(ns) > MAX_NAMESPACE_BYTES:
            raise ValueError(f"namespace must be 1..{MAX_NAMESPACE_BYTES} UTF-8 bytes, got {len(ns)}")
        if len(self.model) != HASH_BYTES:
            raise ValueError(f"model fingerprint must be {HASH_BYTES} bytes, got {len(self.model)}")
        if len(self.prefix) != HASH_BYTES:
            raise ValueError(f"prefix hash must be {HASH_BYTES} bytes, got {len(self.prefix)}")

    def to_bytes(self) -> bytes:
        """Compact binary form, sortable by (namespace, model, prefix): ``len(ns) || ns || model || prefix``."""
        ns = self.namespace.encode()
        return bytes([len(ns)]) + ns + self.model + self.prefix

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockKey:
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` on malformed input."""
        if not data:
            raise ValueError("empty block key")
        n = data[0]
        if len(data) != 1 + n + 2 * HASH_BYTES:
            raise ValueError(f"block key of {len(data)} bytes does not match namespace length {n}")
        ns = data[1 : 1 + n].decode()
        model = data[1 + n : 1 + n + HASH_BYTES]
        prefix = data[1 + n + HASH_BYTES :]
        return cls(Namespace(ns), ModelFingerprint(model), PrefixHash(prefix))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model.hex()[:16]}/{self.prefix.hex()}"
