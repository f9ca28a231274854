from __future__ import annotations

import pytest

from kvfabric.codec import Codec
from kvfabric.errors import ChecksumMismatchError, MalformedRecordError, RecordError, TruncatedRecordError
from kvfabric.record import MIN_HEADER_LEN, decode_header, decode_record, encode_record
from tests.blocks import make_block


@pytest.mark.parametrize("codec", list(Codec))
def test_roundtrip(codec: Codec) -> None:
    b = make_block()
    header, stored = encode_record(b, codec)
    out = decode_record(header + bytes(stored) + b"\0" * 100)  # trailing padding is allowed
    assert out.meta == b.meta
    assert bytes(out.payload) == b.payload


def test_every_bit_flip_in_header_and_payload_is_caught() -> None:
    b = make_block()
    header, stored = encode_record(b)
    rec = bytearray(header + stored)
    for pos in list(range(len(header))) + list(range(len(header), len(rec), 97)):
        for bit in (0, 7):
            bad = bytearray(rec)
            bad[pos] ^= 1 << bit
            with pytest.raises(RecordError):
                decode_record(bytes(bad))


def test_payload_flip_is_checksum_mismatch() -> None:
    header, stored = encode_record(make_block())
    bad = bytearray(header + stored)
    bad[-1] ^= 0x10
    with pytest.raises(ChecksumMismatchError):
        decode_record(bytes(bad))


def test_truncation() -> None:
    header, stored = encode_record(make_block())
    rec = header + stored
    for cut in (0, 10, MIN_HEADER_LEN - 1, len(header) - 1, len(header) + 5, len(rec) - 1):
        with pytest.raises((TruncatedRecordError, MalformedRecordError)):
            decode_record(rec[:cut])


def test_bad_magic_and_version() -> None:
    header, _ = encode_record(make_block())
    with pytest.raises(MalformedRecordError, match="magic"):
        decode_header(b"XXXX" + header[4:])
    with pytest.raises(MalformedRecordError):
        decode_header(header[:4] + b"\x09\x00" + header[6:])


def test_wrong_payload_size_rejected_on_encode() -> None:
    b = make_block()
    with pytest.raises(ValueError):
        encode_record(type(b)(b.meta, b.payload[:-1]))
