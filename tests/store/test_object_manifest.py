"""Manifest/tombstone encoding and the rebuild rule, without a server."""

from __future__ import annotations

import dataclasses
import io

import pyarrow.parquet as pq
import pytest

from kvfabric.errors import MalformedRecordError
from kvfabric.record import decode_header, encode_record
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.object.manifest import (
    SegmentEntry,
    decode_manifest,
    decode_tombstones,
    encode_manifest,
    encode_tombstones,
)
from kvfabric.store.object.rebuild import resolve
from tests.blocks import make_block, make_chain


def _entries(n: int, seed: int = 0, stamp0: int = 100) -> list[SegmentEntry]:
    out = []
    for i, block in enumerate(make_chain(n, seed=seed)):
        header, _ = encode_record(block)
        out.append(SegmentEntry.from_header(decode_header(header), offset=i * 8192, stored_ns=stamp0 + i))
    return out


def test_manifest_roundtrip() -> None:
    spec = ModelSpec(model="m/fp8", num_layers=1, kv_heads=1, head_dim=16, dtype=DType.FLOAT8_E4M3)
    entries = _entries(5) + [
        SegmentEntry.from_header(decode_header(encode_record(make_block(spec=spec))[0]), 5 * 8192, 7)
    ]
    data = encode_manifest(entries, segment_id="seg-1", segment_bytes=6 * 8192)
    manifest = decode_manifest(data)
    assert manifest.segment_id == "seg-1" and manifest.segment_bytes == 6 * 8192
    assert manifest.entries == entries


def test_manifest_is_plain_parquet_with_the_documented_columns() -> None:
    table = pq.read_table(io.BytesIO(encode_manifest(_entries(3), segment_id="s", segment_bytes=3 * 8192)))
    assert table.column_names == [
        "key", "namespace", "model", "prefix", "parent", "offset", "record_len", "header_len", "checksum", "dtype",
        "shape", "token_count", "created_ms", "stored_ns",
    ]  # fmt: skip
    assert table.column("namespace").to_pylist() == ["tenant-a"] * 3
    assert table.column("dtype").to_pylist() == ["bfloat16"] * 3


def test_manifest_rejects_inconsistency() -> None:
    entries = _entries(2)
    with pytest.raises(MalformedRecordError, match="outside segment"):
        decode_manifest(encode_manifest(entries, segment_id="s", segment_bytes=8192))
    with pytest.raises(MalformedRecordError, match="not readable"):
        decode_manifest(b"PAR1 not really")
    with pytest.raises(MalformedRecordError, match="format"):
        decode_manifest(encode_tombstones([(entries[0].key, 1)]))


def test_tombstones_roundtrip() -> None:
    keys = [e.key for e in _entries(3)]
    deleted = [(k, 1000 + i) for i, k in enumerate(keys)]
    assert decode_tombstones(encode_tombstones(deleted)) == deleted
    with pytest.raises(MalformedRecordError):
        decode_tombstones(encode_manifest(_entries(1), segment_id="s", segment_bytes=8192))


def test_resolve_latest_stamp_wins() -> None:
    a, b, c = _entries(3, stamp0=100)  # stamps 100, 101, 102
    a2 = dataclasses.replace(a, offset=0, stored_ns=300)  # a re-put later, in segment s2
    plan = resolve(
        {"s1": [a, b, c], "s2": [a2]},
        {"t1": [(a.key, 200), (b.key, 200)], "t2": [(c.key, 50)]},  # c's delete is older than its put
    )
    assert set(plan.live) == {a.key, c.key}
    assert plan.live[a.key].segment_id == "s2" and plan.live[c.key].segment_id == "s1"
    assert plan.live_per_segment == {"s1": 1, "s2": 1}
    assert plan.dead_segments == []
    assert plan.moot_tombstones == ["t2"]  # t1 still hides a and b's rows in s1
    assert plan.last_stamp == 300


def test_resolve_dead_segments_and_ties() -> None:
    a, b = _entries(2, stamp0=100)
    plan = resolve({"s1": [a], "s2": [b]}, {"t1": [(a.key, 100)]})  # a tie goes to the delete
    assert set(plan.live) == {b.key}
    assert plan.dead_segments == ["s1"]
    assert plan.moot_tombstones == ["t1"]  # s1 will be collected: nothing left to hide
