"""Payload codecs: raw, zstd, and byte-shuffle + zstd (for bf16/fp16 KV, where the exponent bytes compress).

The codec number is part of the record format and never changes meaning.
"""

from __future__ import annotations

import enum

import numpy as np
import zstandard

from kvfabric.errors import MalformedRecordError


class Codec(enum.IntEnum):
    RAW = 0
    ZSTD = 1
    SHUFFLE_ZSTD = 2

    @classmethod
    def parse(cls, name: str | Codec) -> Codec:
        if isinstance(name, Codec):
            return name
        try:
            return cls[str(name).upper().replace("-", "_").replace("+", "_")]
        except KeyError:
            raise ValueError(f"unknown codec {name!r}; known: {[c.name.lower() for c in cls]}") from None


ZSTD_LEVEL = 1  # bandwidth, not ratio, is the point: level 1 keeps compression near memory speed


def _shuffle(data: bytes | memoryview, itemsize: int) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    if itemsize <= 1 or len(arr) % itemsize:
        return arr.tobytes()
    return arr.reshape(-1, itemsize).T.tobytes()


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    if itemsize <= 1 or len(arr) % itemsize:
        return arr.tobytes()
    return arr.reshape(itemsize, -1).T.tobytes()


def encode_payload(codec: Codec, raw: bytes | memoryview, itemsize: int) -> bytes | memoryview:
    """Stored bytes for ``raw`` under ``codec``; RAW returns its input unchanged (no copy)."""
    if codec == Codec.RAW:
        return raw
    if codec == Codec.ZSTD:
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    if codec == Codec.SHUFFLE_ZSTD:
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_shuffle(raw, itemsize))
    raise MalformedRecordError(f"unknown codec {codec}")


def decode_payload(codec: Codec, stored: bytes | memoryview, raw_len: int, itemsize: int) -> bytes | memoryview:
    """Inverse of :func:`encode_payload`; raises MalformedRecordError when the bytes do not decode to ``raw_len``."""
    if codec == Codec.RAW:
        if len(stored) != raw_len:
            raise MalformedRecordError(f"raw payload of {len(stored)} bytes, header says {raw_len}")
        return stored
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise MalformedRecordError(f"zstd payload does not decode: {exc}") from exc
    if len(raw) != raw_len:
        raise MalformedRecordError(f"payload decoded to {len(raw)} bytes, header says {raw_len}")
    return _unshuffle(raw, itemsize) if codec == Codec.SHUFFLE_ZSTD else raw
