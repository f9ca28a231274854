"""The versioned block record: one header format on disk, in objects and on the wire.

Layout (little-endian; full spec with offsets in ``docs/record-format.md``)::

    magic "KVFB" | u16 version | u16 header_len | u8 codec | u8 dtype | u8 ndim | u8 flags
    u32 token_count | u64 raw_len | u64 payload_len | u64 payload_xxh3_64 | u64 created_ms
    u32 shape[6] | model[32] | prefix[32] | parent[32] | u8 ns_len | namespace | u32 header_xxh3_low32
    payload (payload_len bytes, encoded by codec)

The header carries its own checksum, so a flipped bit anywhere is caught before any field is trusted; the payload
checksum covers the *stored* bytes, so verification needs no decompression. Every decode verifies both.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

import xxhash

from kvfabric.codec import Codec, decode_payload, encode_payload
from kvfabric.errors import ChecksumMismatchError, MalformedRecordError, TruncatedRecordError
from kvfabric.ids import NULL_HASH, BlockKey, ModelFingerprint, Namespace, PrefixHash
from kvfabric.spec import DType

MAGIC = b"KVFB"
FORMAT_VERSION = 1
MAX_NDIM = 6
MAX_PAYLOAD_BYTES = 1 << 32  # format limit; stores configure a much smaller one

_FIXED = struct.Struct("<4sHHBBBBIQQQQ6I32s32s32sB")
_CRC = struct.Struct("<I")
MIN_HEADER_LEN = _FIXED.size + 1 + _CRC.size
MAX_HEADER_LEN = _FIXED.size + 255 + _CRC.size
_CODECS = {int(c): c for c in Codec}
_DTYPES = {int(d): d for d in DType}
"""Code -> member: a dict lookup costs a fraction of ``Codec(code)`` on every header decode."""


def checksum(data: bytes | memoryview) -> int:
    """Checksum of stored payload bytes (XXH3-64: ~20 GiB/s, so verification never limits bandwidth)."""
    return xxhash.xxh3_64_intdigest(data)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a block *is*: its key, tensor dtype/shape, token count, parent in the chain, creation time."""

    key: BlockKey
    dtype: DType
    shape: tuple[int, ...]
    token_count: int
    parent: PrefixHash = NULL_HASH
    created_ms: int = 0

    @property
    def nbytes(self) -> int:
        """Raw (decoded) payload length in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Block:
    """A block with its raw payload (any buffer: bytes, memoryview, numpy array)."""

    meta: BlockMeta
    payload: bytes | memoryview

    @property
    def key(self) -> BlockKey:
        return self.meta.key


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A decoded header: the block's meta plus how its payload is stored."""

    meta: BlockMeta
    codec: Codec
    raw_len: int
    payload_len: int
    payload_checksum: int
    header_len: int

    @property
    def record_len(self) -> int:
        return self.header_len + self.payload_len


def encode_header(meta: BlockMeta, codec: Codec, payload_len: int, payload_checksum: int) -> bytes:
    """Header bytes for a payload already encoded with ``codec``."""
    if not 0 < len(meta.shape) <= MAX_NDIM:
        raise ValueError(f"shape must have 1..{MAX_NDIM} dims, got {meta.shape}")
    if min(meta.shape) < 0 or max(meta.shape) > 0xFFFFFFFF:
        raise ValueError(f"shape dims must fit u32, got {meta.shape}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {payload_len} bytes exceeds the format limit")
    ns = meta.key.namespace.encode()
    shape = tuple(meta.shape) + (0,) * (MAX_NDIM - len(meta.shape))
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, _FIXED.size + len(ns) + _CRC.size, int(codec), int(meta.dtype), len(meta.shape), 0,
        meta.token_count, meta.nbytes, payload_len, payload_checksum, meta.created_ms, *shape,
        meta.key.model, meta.key.prefix, meta.parent, len(ns),
    )  # fmt: skip
    body = fixed + ns
    return body + _CRC.pack(xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF)


def decode_header(buf: bytes | memoryview) -> RecordHeader:
    """Parse and verify a header at the start of ``buf`` (which may hold more bytes after it)."""
    view = memoryview(buf)
    if len(view) < MIN_HEADER_LEN:
        raise TruncatedRecordError(f"record header needs at least {MIN_HEADER_LEN} bytes, got {len(view)}")
    (
        magic, version, header_len, codec, dtype, ndim, flags, token_count, raw_len, payload_len, payload_crc,
        created_ms, s0, s1, s2, s3, s4, s5, model, prefix, parent, ns_len,
    ) = _FIXED.unpack_from(view)  # fmt: skip
    if magic != MAGIC:
        raise MalformedRecordError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MalformedRecordError(f"unsupported record format version {version}")
    if header_len != _FIXED.size + ns_len + _CRC.size:
        raise MalformedRecordError(f"header_len {header_len} inconsistent with namespace length {ns_len}")
    if len(view) < header_len:
        raise TruncatedRecordError(f"record header is {header_len} bytes, got {len(view)}")
    (crc,) = _CRC.unpack_from(view, header_len - _CRC.size)
    if crc != xxhash.xxh3_64_intdigest(view[: header_len - _CRC.size]) & 0xFFFFFFFF:
        raise MalformedRecordError("header checksum mismatch")
    # The checksum matched, so what follows validates a header a kvfabric writer produced (or a forged one).
    codec_e, dtype_e = _CODECS.get(codec), _DTYPES.get(dtype)
    if codec_e is None:
        raise MalformedRecordError(f"{codec} is not a valid Codec")
    if dtype_e is None:
        raise MalformedRecordError(f"{dtype} is not a valid DType")
    if not 0 < ndim <= MAX_NDIM or flags != 0:
        raise MalformedRecordError(f"bad ndim {ndim} or flags {flags}")
    shape = (s0, s1, s2, s3, s4, s5)[:ndim]
    try:
        ns = bytes(view[_FIXED.size : _FIXED.size + ns_len]).decode()
        key = BlockKey(Namespace(ns), ModelFingerprint(model), PrefixHash(prefix))
    except ValueError as exc:
        raise MalformedRecordError(f"bad key: {exc}") from exc
    meta = BlockMeta(key, dtype_e, shape, token_count, PrefixHash(parent), created_ms)
    if raw_len != meta.nbytes:
        raise MalformedRecordError(f"raw_len {raw_len} does not match shape {shape} x {dtype_e.name}")
    if codec_e == Codec.RAW and payload_len != raw_len:
        raise MalformedRecordError(f"raw payload_len {payload_len} != raw_len {raw_len}")
    return RecordHeader(meta, codec_e, raw_len, payload_len, payload_crc, header_len)


def verify_payload(header: RecordHeader, stored: bytes | memoryview) -> None:
    """Raise unless ``stored`` is exactly the payload the header describes."""
    if len(stored) < header.payload_len:
        raise TruncatedRecordError(f"payload is {len(stored)} bytes, header says {header.payload_len}")
    if len(stored) != header.payload_len:
        raise MalformedRecordError(f"payload is {len(stored)} bytes, header says {header.payload_len}")
    if checksum(stored) != header.payload_checksum:
        raise ChecksumMismatchError(f"payload checksum mismatch for block {header.meta.key}")


def encode_record(block: Block, codec: Codec = Codec.RAW) -> tuple[bytes, bytes | memoryview]:
    """``(header, stored_payload)``; write them back to back. RAW does not copy the payload."""
    header, stored, _ = encode_record_parts(block, codec)
    return header, stored


def encode_record_parts(block: Block, codec: Codec = Codec.RAW) -> tuple[bytes, bytes | memoryview, int]:
    """``(header, stored_payload, payload_checksum)``: :func:`encode_record` plus the checksum it computed, for
    stores that index it (so they need not parse the header they just built)."""
    raw = memoryview(block.payload).cast("B") if not isinstance(block.payload, bytes) else block.payload
    if len(raw) != block.meta.nbytes:
        raise ValueError(f"payload is {len(raw)} bytes, shape {block.meta.shape} needs {block.meta.nbytes}")
    stored = encode_payload(codec, raw, block.meta.dtype.itemsize)
    crc = checksum(stored)
    return encode_header(block.meta, codec, len(stored), crc), stored, crc


def decode_record(buf: bytes | memoryview) -> Block:
    """Verify and decode a whole record (header + payload, trailing padding allowed); never returns bad data."""
    view = memoryview(buf)
    header = decode_header(view)
    stored = view[header.header_len : header.record_len]
    verify_payload(header, stored)
    raw = decode_payload(header.codec, stored, header.raw_len, header.meta.dtype.itemsize)
    return Block(header.meta, raw)
