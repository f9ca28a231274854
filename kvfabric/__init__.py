"""kvfabric: a persistent KV-cache data fabric for LLM inference."""

from kvfabric.errors import KVFabricError
from kvfabric.hashing import block_hash, prefix_hashes, root_hash
from kvfabric.ids import BlockKey, ModelFingerprint, Namespace, PrefixHash
from kvfabric.record import Block, BlockMeta
from kvfabric.spec import DType, ModelSpec

__version__ = "0.1.0"
__all__ = [
    "Block", "BlockKey", "BlockMeta", "DType", "KVFabricError", "ModelFingerprint", "ModelSpec",
    "Namespace", "PrefixHash", "__version__", "block_hash", "prefix_hashes", "root_hash",
]  # fmt: skip
