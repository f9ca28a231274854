"""A corrupt block in the store is never served: bits flipped in uploaded segment objects turn exactly the blocks
they land in into counted misses (and durable deletes); every other block still reads."""

from __future__ import annotations

import numpy as np
import pytest

from kvfabric.events import BlockRemoved, EventLog
from kvfabric.ids import BlockKey
from kvfabric.record import Block
from kvfabric.store.object import ObjectLocation, ObjectTier
from kvfabric.store.object.tier import ALIGN
from tests.blocks import make_chain
from tests.s3server import SeaweedFS
from tests.store.object_helpers import object_config, open_tier
from tests.store.tier_suite import same


def _read(tier: ObjectTier, method: str, blocks: list[Block]) -> list[Block | None]:
    if method == "get":
        return [tier.get(b.key) for b in blocks]
    if method == "get_many":
        return tier.get_many([b.key for b in blocks])
    out: list[Block | None] = []
    for b in blocks:
        buf = np.zeros(b.meta.nbytes, dtype=np.uint8)
        meta = tier.get_into(b.key, memoryview(buf))
        out.append(None if meta is None else Block(meta, buf.tobytes()))
    return out


def _flip_bits(s3_server: SeaweedFS, bucket: str, locations: dict[BlockKey, ObjectLocation], seed: int,
               flips_per_object: int) -> set[BlockKey]:  # fmt: skip
    """Download each segment object, flip bits at random positions, upload it again under the same key; return the
    keys whose records a flip landed in (flips in the alignment padding hit nothing)."""
    client = s3_server.client()
    rng = np.random.default_rng(seed)
    hit: set[BlockKey] = set()
    for object_key in sorted({loc.object_key for loc in locations.values()}):
        data = bytearray(client.get_object(Bucket=bucket, Key=object_key)["Body"].read())  # type: ignore[attr-defined]
        for pos in rng.choice(len(data), size=flips_per_object, replace=False):
            data[pos] ^= 1 << int(rng.integers(8))
            hit |= {
                k for k, loc in locations.items()
                if loc.object_key == object_key and loc.offset <= pos < loc.offset + loc.record_len
            }  # fmt: skip
        client.put_object(Bucket=bucket, Key=object_key, Body=bytes(data))  # type: ignore[attr-defined]
    return hit


@pytest.mark.parametrize("method", ["get", "get_many", "get_into"])
def test_flipped_bits_read_as_counted_misses(s3_server: SeaweedFS, method: str) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket, segment_bytes=16 * 2 * ALIGN)
    chain = make_chain(64, seed=31)
    with open_tier(s3_server, config) as writer:
        writer.put_many(chain)
        writer.flush()
        locations = {b.key: writer.locate(b.key) for b in chain}
    assert all(loc is not None for loc in locations.values())
    hit = _flip_bits(s3_server, bucket, locations, seed=1234, flips_per_object=6)  # type: ignore[arg-type]
    assert 0 < len(hit) < len(chain)

    events = EventLog()
    with open_tier(s3_server, config, events=events) as reader:  # nothing local: index from manifests, ranged GETs
        got = _read(reader, method, chain)
        for block, g in zip(chain, got, strict=True):
            if block.key in hit:
                assert g is None, f"corrupt block {block.key} was served"
            else:
                assert same(g, block)
        stats = reader.stats()
        assert stats.corrupt == len(hit)
        assert stats.misses >= len(hit)
        assert stats.blocks == len(chain) - len(hit)
        removed = {h for e in events.take_events() if isinstance(e, BlockRemoved) for h in e.hashes}
        assert removed == {k.prefix for k in hit}
        # a second read is a plain miss: the entry left the index
        assert all(reader.get(k) is None for k in hit)
        assert reader.stats().corrupt == len(hit)

    with open_tier(s3_server, config) as again:  # the corrupt blocks were deleted durably (tombstones)
        assert set(again.keys()) == {b.key for b in chain} - hit
        assert all(same(g, b) for g, b in zip(again.get_many([b.key for b in chain]), chain, strict=True)
                   if b.key not in hit)  # fmt: skip


def test_header_and_payload_flips_are_both_caught(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket)
    a, b, c = make_chain(3, seed=32)
    with open_tier(s3_server, config) as writer:
        writer.put_many([a, b, c])
        writer.flush()
        la, lb = writer.locate(a.key), writer.locate(b.key)
    assert la is not None and lb is not None
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=la.object_key)["Body"].read())  # type: ignore[attr-defined]
    data[la.offset + 40] ^= 0x10  # inside a's header
    data[lb.offset + lb.record_len - 1] ^= 0x01  # last payload byte of b
    client.put_object(Bucket=bucket, Key=la.object_key, Body=bytes(data))  # type: ignore[attr-defined]
    with open_tier(s3_server, config) as reader:
        assert reader.get(a.key) is None
        assert reader.get(b.key) is None
        assert same(reader.get(c.key), c)
        assert reader.stats().corrupt == 2


def test_truncated_or_vanished_segment(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket, segment_bytes=4 * 2 * ALIGN)
    chain = make_chain(8, seed=33)
    with open_tier(s3_server, config) as writer:
        writer.put_many(chain)
        writer.flush()
        locations = [writer.locate(b.key) for b in chain]
    first, second = locations[0], locations[4]
    assert first is not None and second is not None and first.object_key != second.object_key
    client = s3_server.client()
    data = client.get_object(Bucket=bucket, Key=first.object_key)["Body"].read()  # type: ignore[attr-defined]
    client.put_object(Bucket=bucket, Key=first.object_key, Body=data[: locations[2].offset + 100])  # type: ignore[attr-defined]
    client.delete_object(Bucket=bucket, Key=second.object_key)  # type: ignore[attr-defined]
    with open_tier(s3_server, config) as reader:
        got = reader.get_many([b.key for b in chain])
        assert same(got[0], chain[0]) and same(got[1], chain[1])
        assert all(g is None for g in got[2:])
        assert reader.stats().corrupt == 2  # the truncated ones; a vanished object is a miss, not corruption
        assert reader.stats().blocks == 2


def test_untrustworthy_manifest_is_skipped(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket, segment_bytes=4 * 2 * ALIGN)
    chain = make_chain(8, seed=34)
    with open_tier(s3_server, config) as writer:
        writer.put_many(chain)
        writer.flush()
        bad_segment = writer.locate(chain[0].key)
    assert bad_segment is not None
    manifest_key = bad_segment.object_key.replace("/segments/", "/manifests/").replace(".seg", ".parquet")
    client = s3_server.client()
    data = client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()  # type: ignore[attr-defined]
    client.put_object(Bucket=bucket, Key=manifest_key, Body=data[: len(data) // 2])  # type: ignore[attr-defined]
    with open_tier(s3_server, config) as reader:
        assert reader.object_stats().bad_manifests == 1
        assert set(reader.keys()) == {b.key for b in chain[4:]}
        assert all(same(reader.get(b.key), b) for b in chain[4:])
