"""Acceptance #6: bad input gets a clear error, stores nothing, and leaves the store exactly as it was."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import xxhash

from kvfabric.codec import Codec
from kvfabric.errors import (
    BlockTooLargeError,
    ConfigError,
    InvalidBlockError,
    MalformedRecordError,
    QuotaExceededError,
    RecordError,
    TruncatedRecordError,
    UnknownModelError,
)
from kvfabric.ids import BlockKey, ModelFingerprint, Namespace
from kvfabric.record import Block, encode_record
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.config import NamespacePolicy, StoreConfig
from kvfabric.store.tier import Tier
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_block, make_chain
from tests.store.tiered_helpers import BLOCK, build, snapshot

BIG = ModelSpec(model="test/big", num_layers=4, kv_heads=4, head_dim=64, dtype=DType.FLOAT32, block_size=32)  # 256 KiB
CODEC_OFFSET = 8  # magic(4) + version(2) + header_len(2): the codec byte (docs/record-format.md)


@pytest.fixture
def store() -> Iterator[tuple[TieredStore, dict[str, Tier]]]:
    s, tiers = build(
        8, ["disk"], max_block_bytes=64 << 10, namespaces={"tenant-a": NamespacePolicy(quota_bytes=6 * BLOCK)}
    )
    s.put_many(make_chain(4, seed=1))  # something already stored, so "unchanged" means something
    s.pin(make_chain(4, seed=1)[0].key)
    yield s, tiers
    s.close()


def rejected(
    store: tuple[TieredStore, dict[str, Tier]], action: Callable[[], object], error: type[Exception], match: str
) -> None:
    """``action`` raises ``error`` with a message matching ``match``, and nothing observable changes."""
    s, tiers = store
    before = snapshot(s, tiers)
    with pytest.raises(error, match=match):
        action()
    assert snapshot(s, tiers) == before


def with_meta(block: Block, **changes: object) -> Block:
    return Block(dataclasses.replace(block.meta, **changes), block.payload)


def reseal(header: bytearray) -> bytes:
    """Recompute the header checksum, as a buggy or malicious writer would, so only the field under test is bad."""
    n = len(header) - 4
    header[n:] = (xxhash.xxh3_64_intdigest(bytes(header[:n])) & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(header)


def test_wrong_model_fingerprint(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    b = make_block(seed=9)
    stranger = BlockKey(b.key.namespace, ModelFingerprint(bytes(32)), b.key.prefix)
    rejected(
        store, lambda: store[0].put(with_meta(b, key=stranger)), UnknownModelError, "unknown model fingerprint 0000"
    )
    unregistered = make_block(spec=dataclasses.replace(SPEC, revision="other"), seed=9)
    rejected(store, lambda: store[0].put(unregistered), UnknownModelError, unregistered.key.model.hex())


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", DType.FLOAT16), ("shape", (2, 2, 8, 2, 32)), ("token_count", 15)],
)
def test_block_not_matching_its_spec(store: tuple[TieredStore, dict[str, Tier]], field: str, value: object) -> None:
    bad = with_meta(make_block(seed=9), **{field: value})
    rejected(store, lambda: store[0].put(bad), InvalidBlockError, f"{field} .* does not match model test/tiny-llama")


def test_payload_of_the_wrong_size_or_type(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    b = make_block(seed=9)
    rejected(store, lambda: store[0].put(Block(b.meta, b.payload[:-2])), InvalidBlockError, "payload is 4094 bytes")
    rejected(store, lambda: store[0].put(Block(b.meta, list(b.payload))), InvalidBlockError, "bytes-like")  # type: ignore[arg-type]


def test_oversized_block(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    big = make_block(spec=BIG)
    rejected(store, lambda: store[0].register_model(BIG), BlockTooLargeError, "262144 bytes exceeds the limit of 65536")
    rejected(store, lambda: store[0].put(big), BlockTooLargeError, "exceeds the limit")
    assert store[0].model(BIG.fingerprint()) is None


def test_one_bad_block_in_a_batch_stores_none(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    good = make_chain(3, seed=9)
    bad = with_meta(good[2], dtype=DType.INT8)
    rejected(store, lambda: store[0].put_many(good[:2] + [bad]), InvalidBlockError, "dtype")


def test_quota_exceeded_changes_nothing(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    rejected(store, lambda: store[0].put_many(make_chain(7, seed=9)), QuotaExceededError, "tenant-a")


def test_record_with_unknown_codec(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    header, payload = encode_record(make_block(seed=9))
    bad = bytearray(header)
    bad[CODEC_OFFSET] = 9
    record = reseal(bad) + bytes(payload)
    rejected(store, lambda: store[0].put_record(record), MalformedRecordError, "9 is not a valid Codec")


def test_unknown_codec_name_in_config() -> None:
    with pytest.raises(ConfigError, match="disk_codec: unknown codec 'lz5'"):
        StoreConfig(disk_codec="lz5")
    with pytest.raises(ValueError, match="unknown codec"):
        Codec.parse("lz5")


@pytest.mark.parametrize(
    ("name", "corrupt", "error", "match"),
    [
        ("bad magic", lambda h: b"XXXX" + h[4:], MalformedRecordError, "bad magic"),
        ("future version", lambda h: reseal(bytearray(h[:4] + b"\x07\x00" + h[6:])), MalformedRecordError, "version 7"),
        ("flipped bit", lambda h: h[:20] + bytes([h[20] ^ 1]) + h[21:], MalformedRecordError, "header checksum"),
        ("unknown dtype", lambda h: reseal(bytearray(h[:9] + b"\x63" + h[10:])), MalformedRecordError, "DType"),
    ],
)
def test_malformed_header(
    store: tuple[TieredStore, dict[str, Tier]], name: str, corrupt: Callable[[bytes], bytes], error: type, match: str
) -> None:
    header, payload = encode_record(make_block(seed=9))
    rejected(store, lambda: store[0].put_record(corrupt(header) + bytes(payload)), error, match)


@pytest.mark.parametrize("cut", [0, 30, -1, -4000])  # inside the header, or inside the payload
def test_truncated_record(store: tuple[TieredStore, dict[str, Tier]], cut: int) -> None:
    header, payload = encode_record(make_block(seed=9))
    record = (header + bytes(payload))[:cut]
    rejected(store, lambda: store[0].put_record(record), TruncatedRecordError, "got|header says")


def test_payload_not_matching_its_checksum(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    header, payload = encode_record(make_block(seed=9))
    flipped = bytearray(payload)
    flipped[100] ^= 0x40
    rejected(store, lambda: store[0].put_record(header + bytes(flipped)), RecordError, "checksum mismatch")


def test_bad_config_values_name_their_key() -> None:
    for kwargs, key in [
        ({"write_policy": {"disk": "write-sometimes"}}, "write_policy.disk"),
        ({"ram_policy": "mru"}, "ram_policy"),
        ({"fsync": "sometimes"}, "fsync"),
        ({"ram_low_watermark": 0.9, "ram_high_watermark": 0.5}, "ram_low_watermark"),
        ({"ram_bytes": 0}, "ram_bytes"),
    ]:
        with pytest.raises(ConfigError, match=key):
            StoreConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ttl_s"):
        NamespacePolicy(ttl_s=-1)
    with pytest.raises(ConfigError, match="quota_bytes"):
        NamespacePolicy(quota_bytes=0)


def test_a_good_block_still_goes_in_afterwards(store: tuple[TieredStore, dict[str, Tier]]) -> None:
    s, _ = store
    b = make_block(seed=9)
    with pytest.raises(InvalidBlockError):
        s.put(with_meta(b, token_count=1))
    s.put(b)
    assert s.namespace_stats()[Namespace("tenant-a")].blocks == 5
