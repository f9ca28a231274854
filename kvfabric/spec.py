"""ModelSpec: everything that makes two KV blocks interchangeable, and its fingerprint."""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import asdict, dataclass

from kvfabric.ids import HASH_BYTES, ModelFingerprint

FINGERPRINT_VERSION = 1


class DType(enum.IntEnum):
    """Element types a block may hold; the number is the on-wire/on-disk code and never changes."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    FLOAT8_E4M3 = 4
    FLOAT8_E5M2 = 5
    INT8 = 6
    UINT8 = 7

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @classmethod
    def parse(cls, name: str | DType) -> DType:
        """``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"`` or a DType -> DType."""
        if isinstance(name, DType):
            return name
        key = str(name).lower().removeprefix("torch.")
        try:
            return _ALIASES[key]
        except KeyError:
            raise ValueError(f"unknown dtype {name!r}; known: {sorted(_ALIASES)}") from None


_ITEMSIZE = {
    DType.FLOAT32: 4,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT8_E4M3: 1,
    DType.FLOAT8_E5M2: 1,
    DType.INT8: 1,
    DType.UINT8: 1,
}
_ALIASES = {
    "float32": DType.FLOAT32, "fp32": DType.FLOAT32, "float": DType.FLOAT32,
    "float16": DType.FLOAT16, "fp16": DType.FLOAT16, "half": DType.FLOAT16,
    "bfloat16": DType.BFLOAT16, "bf16": DType.BFLOAT16,
    "float8_e4m3fn": DType.FLOAT8_E4M3, "fp8_e4m3": DType.FLOAT8_E4M3,
    "float8_e5m2": DType.FLOAT8_E5M2, "fp8_e5m2": DType.FLOAT8_E5M2,
    "int8": DType.INT8, "uint8": DType.UINT8,
}  # fmt: skip

MAX_SPEC_STRING_BYTES = 256
"""Longest model name, revision, layout or quantisation name accepted from a client (UTF-8 bytes)."""
MAX_SPEC_INT = 1 << 24
"""Largest layer count, head count, head dim, block size or TP size accepted from a client."""
_SPEC_STRINGS = ("model", "revision", "layout", "kv_quant", "dtype")
_SPEC_INTS = ("num_layers", "kv_heads", "head_dim", "block_size", "tp_size", "tp_rank")

LAYOUTS = ("layers_kv_tokens_heads_dim", "layers_tokens_latent")
"""Known block layouts (the canonical forms every engine adapter converts to and from). The default,
``[layers, 2, block_size, kv_heads, head_dim]``, is the design card's; ``layers_tokens_latent`` is
``[layers, block_size, head_dim]`` for MLA caches (one latent vector per token, ``kv_heads`` 1, ``head_dim`` the
latent width)."""
LATENT_LAYOUT = LAYOUTS[1]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Identity of a KV cache shard. Two blocks are interchangeable exactly when their specs' fingerprints match.

    ``model`` and ``revision`` name the weights; the rest fixes the bytes: a change of dtype, block size, TP shard or
    KV quantisation yields different KV for the same tokens, hence a different fingerprint.
    """

    model: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: DType = DType.BFLOAT16
    block_size: int = 16
    revision: str = "main"
    tp_size: int = 1
    tp_rank: int = 0
    layout: str = LAYOUTS[0]
    kv_quant: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType.parse(self.dtype))
        if not self.model:
            raise ValueError("ModelSpec.model must be non-empty")
        for name in ("num_layers", "kv_heads", "head_dim", "block_size", "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSpec.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"ModelSpec.tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {LAYOUTS}")
        if self.layout == LATENT_LAYOUT and self.kv_heads != 1:
            raise ValueError(f"layout {LATENT_LAYOUT} has one latent vector per token: kv_heads must be 1")

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block's tensor: ``[layers, 2, block_size, kv_heads, head_dim]`` (latent:
        ``[layers, block_size, head_dim]``)."""
        if self.layout == LATENT_LAYOUT:
            return (self.num_layers, self.block_size, self.head_dim)
        return (self.num_layers, 2, self.block_size, self.kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        return math.prod(self.block_shape) * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.block_nbytes // self.block_size

    def canonical_json(self) -> bytes:
        """Sorted-key, whitespace-free JSON of every field, dtype by name: the bytes the fingerprint hashes."""
        fields = asdict(self)
        fields["dtype"] = self.dtype.name.lower()
        fields["fingerprint_version"] = FINGERPRINT_VERSION
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def fingerprint(self) -> ModelFingerprint:
        """BLAKE2b-256 of :meth:`canonical_json`."""
        return ModelFingerprint(hashlib.blake2b(self.canonical_json(), digest_size=HASH_BYTES).digest())

    def to_dict(self) -> dict[str, object]:
        fields = asdict(self)
        fields["dtype"] = self.dtype.name.lower()
        return fields

    @classmethod
    def from_wire(cls, data: object) -> ModelSpec:
        """:meth:`from_dict` for a spec from a client: a map of known fields with exact types (strings for names and
        the dtype, integers for sizes) and bounded values, so nothing odd is fingerprinted and kept."""
        if not isinstance(data, dict):
            raise ValueError(f"a model spec must be a map, got {type(data).__name__}")
        for name in _SPEC_STRINGS:
            value = data.get(name)
            if name in data and not isinstance(value, str):
                raise ValueError(f"ModelSpec.{name} must be a string, got {type(value).__name__}")
            if isinstance(value, str) and len(value.encode()) > MAX_SPEC_STRING_BYTES:
                raise ValueError(f"ModelSpec.{name} is longer than {MAX_SPEC_STRING_BYTES} bytes")
        for name in _SPEC_INTS:
            value = data.get(name)
            if name in data and (type(value) is not int or not 0 <= value <= MAX_SPEC_INT):  # bool is no size
                raise ValueError(f"ModelSpec.{name} must be an integer in [0, {MAX_SPEC_INT}], got {value!r}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]
