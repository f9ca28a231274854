"""The object tier against a real S3 server (SeaweedFS): the shared tier suite in three write modes, plus what
only an object tier does (segments, coalesced reads, segment-file upload, credentials, storage class)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvfabric.codec import Codec
from kvfabric.errors import ConfigError, StoreError
from kvfabric.events import BlockStored, EventLog
from kvfabric.ids import BlockKey
from kvfabric.record import decode_header, encode_record
from kvfabric.store.disk import DiskTier
from kvfabric.store.object import ObjectTier, ObjectTierConfig, SegmentEntry
from kvfabric.store.object.tier import ALIGN
from kvfabric.store.tier import Tier
from tests.blocks import make_block, make_chain
from tests.s3server import SeaweedFS
from tests.store.object_helpers import object_config, open_tier
from tests.store.tier_suite import Corrupt, TierSuite, same

MODES = {
    # every put is its own committed segment: every read is a ranged GET
    "write-through": {"durable_put": True},
    # puts buffer in the open segment (served from memory) until flush/close
    "write-back": {},
    # segments seal every few blocks and upload on the sealing thread: reads mix memory and ranged GETs
    "small-segments": {"segment_bytes": 3 * ALIGN * 3, "backlog_bytes": 1 << 20},
}


class TestObjectTier(TierSuite):
    REPORTS = frozenset({"objects"})

    @pytest.fixture(params=list(MODES))
    def config(self, request: pytest.FixtureRequest, s3_server: SeaweedFS) -> ObjectTierConfig:
        return object_config(s3_server, s3_server.create_bucket(), **MODES[request.param])

    @pytest.fixture
    def tier(self, s3_server: SeaweedFS, config: ObjectTierConfig) -> Iterator[ObjectTier]:
        tier = open_tier(s3_server, config)
        yield tier
        tier.close()

    @pytest.fixture
    def reopen(self, s3_server: SeaweedFS, config: ObjectTierConfig) -> Callable[[], ObjectTier]:
        return lambda: open_tier(s3_server, config)

    @pytest.fixture
    def corrupt(self, s3_server: SeaweedFS) -> Corrupt:
        def flip(tier: Tier, key: BlockKey) -> None:
            """Change the last stored payload byte of ``key``'s record in its segment object, behind the tier."""
            assert isinstance(tier, ObjectTier)
            loc = tier.locate(key)
            assert loc is not None, f"{key} is not uploaded"
            client = s3_server.client()
            bucket = tier.config.bucket
            data = bytearray(client.get_object(Bucket=bucket, Key=loc.object_key)["Body"].read())  # type: ignore[attr-defined]
            data[loc.offset + loc.record_len - 1] ^= 0xFF
            client.put_object(Bucket=bucket, Key=loc.object_key, Body=bytes(data))  # type: ignore[attr-defined]

        return flip


@pytest.fixture
def bucket(s3_server: SeaweedFS) -> str:
    return s3_server.create_bucket()


def test_segments_pack_aligned_records_and_commit_manifests(s3_server: SeaweedFS, bucket: str) -> None:
    config = object_config(s3_server, bucket, segment_bytes=64 * ALIGN)
    chain = make_chain(20)
    with open_tier(s3_server, config) as tier:
        tier.put_many(chain)
        assert tier.locate(chain[0].key) is None  # still in the open segment
        tier.flush()
        locations = [tier.locate(b.key) for b in chain]
        assert all(loc is not None and loc.offset % ALIGN == 0 for loc in locations)
        assert len({loc.object_key for loc in locations if loc}) == 1
        assert tier.object_stats().backlog_bytes == 0
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]  # type: ignore[attr-defined]
    segs = [k for k in keys if k.startswith("node-a/segments/") and k.endswith(".seg")]
    mans = [k for k in keys if k.startswith("node-a/manifests/") and k.endswith(".parquet")]
    assert len(segs) == 1 and len(mans) == 1
    assert segs[0].rsplit("/", 1)[1][:-4] == mans[0].rsplit("/", 1)[1][:-8]


def test_segment_seals_at_segment_bytes(s3_server: SeaweedFS, bucket: str) -> None:
    config = object_config(s3_server, bucket, segment_bytes=4 * 2 * ALIGN)  # a 4 KiB block takes two pages
    with open_tier(s3_server, config) as tier:
        chain = make_chain(10)
        tier.put_many(chain)  # sealed segments upload on this thread (no uploader started)
        uploaded = [b for b in chain if tier.locate(b.key) is not None]
        assert len(uploaded) == 8
        assert len({tier.locate(b.key).object_key for b in uploaded}) == 2  # type: ignore[union-attr]
        assert all(same(tier.get(b.key), b) for b in chain)


def test_get_many_coalesces_ranges(s3_server: SeaweedFS, bucket: str) -> None:
    chain = make_chain(32)
    with open_tier(s3_server, object_config(s3_server, bucket)) as tier:
        tier.put_many(chain)
        tier.flush()
        before = tier.object_stats().range_gets
        got = tier.get_many([b.key for b in chain])
        assert all(same(g, b) for g, b in zip(got, chain, strict=True))
        assert tier.object_stats().range_gets - before == 1
    with open_tier(s3_server, object_config(s3_server, bucket, coalesce_gap_bytes=0)) as tier:
        before = tier.object_stats().range_gets
        got = tier.get_many([b.key for b in reversed(chain)] + [make_block(seed=99).key])
        assert all(same(g, b) for g, b in zip(got, reversed(chain), strict=False)) and got[-1] is None
        assert tier.object_stats().range_gets - before == 32  # records are 4 KiB + header apart: no zero gap
    with open_tier(s3_server, object_config(s3_server, bucket, max_range_bytes=8 * 2 * ALIGN)) as tier:
        before = tier.object_stats().range_gets
        assert all(same(g, b) for g, b in zip(tier.get_many([b.key for b in chain]), chain, strict=True))
        assert tier.object_stats().range_gets - before == 4


def test_get_into_reads_from_the_store(s3_server: SeaweedFS, bucket: str) -> None:
    b = make_block(seed=4)
    with open_tier(s3_server, object_config(s3_server, bucket, durable_put=True)) as tier:
        tier.put(b)
        assert tier.locate(b.key) is not None
        out = np.zeros(b.meta.nbytes, dtype=np.uint8)
        assert tier.get_into(b.key, memoryview(out)) == b.meta
        assert out.tobytes() == b.payload
        assert tier.stats().hits == 1


def test_compressed_codec_roundtrip(s3_server: SeaweedFS, bucket: str) -> None:
    spec_block = make_chain(4, seed=8)
    config = object_config(s3_server, bucket, codec="shuffle_zstd", durable_put=True)
    with open_tier(s3_server, config) as tier:
        tier.put_many(spec_block)
        assert all(same(tier.get(b.key), b) for b in spec_block)
        out = np.zeros(spec_block[0].meta.nbytes, dtype=np.uint8)
        assert tier.get_into(spec_block[0].key, memoryview(out)) == spec_block[0].meta
        assert out.tobytes() == spec_block[0].payload
    with open_tier(s3_server, config) as again:
        assert all(same(g, b) for g, b in zip(again.get_many([b.key for b in spec_block]), spec_block, strict=True))


def test_put_emits_stored_events(s3_server: SeaweedFS, bucket: str) -> None:
    events = EventLog()
    chain = make_chain(3)
    with open_tier(s3_server, object_config(s3_server, bucket), source="node-7", events=events) as tier:
        tier.put_many(chain)
    stored = [e for e in events.take_events() if isinstance(e, BlockStored)]
    assert [e.hashes for e in stored] == [(b.key.prefix,) for b in chain]
    assert {(e.source, e.medium) for e in stored} == {("node-7", "object")}


def _write_segment_file(path: Path, blocks: list) -> list[SegmentEntry]:  # type: ignore[type-arg]
    """What a disk tier's sealed segment looks like: records at 4 KiB-aligned offsets; entries from its headers."""
    entries = []
    with open(path, "wb") as f:
        for block in blocks:
            offset = -(-f.tell() // ALIGN) * ALIGN
            f.write(bytes(offset - f.tell()))
            header, payload = encode_record(block)
            f.write(header)
            f.write(payload)
            entries.append(SegmentEntry.from_header(decode_header(header), offset))
    return entries


def test_upload_segment_file(s3_server: SeaweedFS, bucket: str, tmp_path: Path) -> None:
    blocks = make_chain(6, seed=12)
    entries = _write_segment_file(tmp_path / "000001.seg", blocks)
    config = object_config(s3_server, bucket)
    with open_tier(s3_server, config) as tier:
        tier.put(blocks[0])  # also in the open segment: the uploaded file's newer copy wins
        segment_id = tier.upload_segment_file(tmp_path / "000001.seg", entries[1:] + entries[:1])
        assert all(same(tier.get(b.key), b) for b in blocks)
        assert all(tier.locate(b.key).object_key.endswith(f"{segment_id}.seg") for b in blocks)  # type: ignore[union-attr]
        assert tier.stats().blocks == 6
        with pytest.raises(ValueError, match="outside"):
            bad = dataclasses.replace(entries[0], offset=1 << 20)
            tier.upload_segment_file(tmp_path / "000001.seg", [bad])
    with open_tier(s3_server, config) as again:
        assert all(same(again.get(b.key), b) for b in blocks)


def test_upload_segment_file_takes_disk_tier_entries(s3_server: SeaweedFS, bucket: str, tmp_path: Path) -> None:
    blocks = make_chain(12, seed=13)
    with DiskTier(tmp_path / "disk", segment_bytes=64 << 10) as disk:
        disk.put_many(blocks)  # 8 records fill a segment: the first is sealed by now
        sealed = disk.sealed_segments()
        assert sealed
        listed = [(path, disk.segment_entries(path)) for path in sealed]
    uploaded = {e.key for _, entries in listed for e in entries}
    with open_tier(s3_server, object_config(s3_server, bucket)) as tier:
        for path, entries in listed:
            tier.upload_segment_file(path, entries)  # the disk tier's entries, unstamped, as they are
    with open_tier(s3_server, object_config(s3_server, bucket)) as again:
        assert uploaded and all(same(again.get(b.key), b) for b in blocks if b.key in uploaded)


def test_credentials_from_the_standard_chain(
    s3_server: SeaweedFS, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = make_block(seed=21)
    for name, value in s3_server.endpoint.env().items():
        monkeypatch.setenv(name, value)
    config = object_config(s3_server, bucket, durable_put=True)
    with ObjectTier.open(config) as tier:  # no session: boto3 finds the keys in the environment
        tier.put(b)
        assert same(tier.get(b.key), b)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match=bucket):
        ObjectTier.open(config)


def test_explicit_keys_and_storage_class(s3_server: SeaweedFS, bucket: str) -> None:
    ep = s3_server.endpoint
    config = object_config(
        s3_server, bucket, access_key_id=ep.access_key, secret_access_key=ep.secret_key, storage_class="STANDARD_IA",
        durable_put=True,
    )  # fmt: skip
    assert ep.secret_key not in repr(config)
    b = make_block(seed=22)
    with ObjectTier.open(config) as tier:
        tier.put(b)
        loc = tier.locate(b.key)
        assert loc is not None
    head = s3_server.client().head_object(Bucket=bucket, Key=loc.object_key)  # type: ignore[attr-defined]
    assert head.get("StorageClass") == "STANDARD_IA"


def test_missing_bucket(s3_server: SeaweedFS) -> None:
    config = object_config(s3_server, "kvf-does-not-exist")
    with pytest.raises(StoreError, match="kvf-does-not-exist"):
        open_tier(s3_server, config)
    name = f"kvf-created-{np.random.default_rng().integers(1 << 40):x}"
    with open_tier(s3_server, object_config(s3_server, name, create_bucket=True)) as tier:
        assert list(tier.keys()) == []


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("storage_class", "GLACIER", "ranged GETs"),
        ("segment_bytes", 0, "segment_bytes"),
        ("backlog_bytes", 1024, "backlog_bytes"),
        ("codec", "lz4", "codec"),
        ("access_key_id", "only-one", "both"),
        ("bucket", "", "bucket"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object, match: str) -> None:
    fields: dict[str, object] = {"bucket": "b", field: value}
    with pytest.raises(ConfigError, match=match):
        ObjectTierConfig(**fields)  # type: ignore[arg-type]


def test_config_accepts_codec_names_and_strips_prefix() -> None:
    c = ObjectTierConfig(bucket="b", prefix="/kvfabric/node-1/", codec="shuffle_zstd")
    assert c.codec == Codec.SHUFFLE_ZSTD and c.prefix == "kvfabric/node-1"
    assert c.object_key("segments", "x.seg") == "kvfabric/node-1/segments/x.seg"
    assert ObjectTierConfig(bucket="b", prefix="").object_key("segments", "x.seg") == "segments/x.seg"
