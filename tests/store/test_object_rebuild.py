"""Losing the node loses nothing: a fresh tier on the same bucket/prefix rebuilds its index from manifests and
tombstones alone; deleted blocks stay deleted, re-puts after deletes stay put, dead segments are collected."""

from __future__ import annotations

import threading

from kvfabric.ids import Namespace
from kvfabric.store.object import ObjectTier
from kvfabric.store.object.tier import ALIGN
from tests.blocks import make_chain
from tests.s3server import SeaweedFS
from tests.store.object_helpers import object_config, open_tier
from tests.store.tier_suite import same


def _objects(s3_server: SeaweedFS, bucket: str, kind: str) -> list[str]:
    client = s3_server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"node-a/{kind}/")  # type: ignore[attr-defined]
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_fresh_tier_serves_everything_from_manifests(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket, segment_bytes=8 * 2 * ALIGN)  # ~8 blocks per segment
    a = make_chain(40, namespace="tenant-a", seed=41)
    b = make_chain(10, namespace="tenant-b", seed=42)
    deleted = {a[3].key, a[17].key, a[39].key, b[0].key}
    with open_tier(s3_server, config) as node:
        node.put_many(a)
        node.flush()
        node.put_many(b)  # b is partly committed (sealed segments), partly in the open segment
        assert node.delete_many(list(deleted)) == 4
        node.put(a[17])  # re-put after delete: must survive the rebuild
        deleted.discard(a[17].key)
    # "the node's disk is lost": a brand-new tier with nothing local
    with open_tier(s3_server, config) as fresh:
        everything = a + b
        assert set(fresh.keys()) == {x.key for x in everything} - deleted
        assert set(fresh.keys(Namespace("tenant-b"))) == {x.key for x in b} - deleted
        got = fresh.get_many([x.key for x in everything])
        for block, g in zip(everything, got, strict=True):
            assert (g is None) if block.key in deleted else same(g, block)
        assert fresh.stats().blocks == len(everything) - len(deleted)
        assert fresh.stats().corrupt == 0
        assert fresh.head(a[0].key) == a[0].meta  # metadata comes back from the manifest


def test_delete_then_reput_in_one_open_segment(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket)
    x, y = make_chain(2, seed=43)
    with open_tier(s3_server, config) as node:
        node.put(x)
        node.flush()  # x committed
        node.delete(x.key)  # tombstone queued
        node.put(x)  # back in the open segment, stamped after the tombstone
        node.put(y)
        node.delete(y.key)  # never committed: no tombstone needed, the row just leaves the open segment
    with open_tier(s3_server, config) as fresh:
        assert same(fresh.get(x.key), x)
        assert fresh.get(y.key) is None
        assert fresh.stats().blocks == 1


def test_dead_segments_are_collected_and_tombstones_pruned(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket, segment_bytes=4 * 2 * ALIGN)  # 4 blocks per segment
    chain = make_chain(12, seed=44)
    with open_tier(s3_server, config) as node:
        node.put_many(chain)
        node.flush()
        assert len(_objects(s3_server, bucket, "segments")) == 3
        node.delete_many([b.key for b in chain[:4]])  # everything in the first segment
        node.delete(chain[5].key)  # one block of the second
        node.flush()
        assert node.object_stats().gc_segments == 1
        assert node.object_stats().segments == 2
    assert len(_objects(s3_server, bucket, "segments")) == 2
    assert len(_objects(s3_server, bucket, "manifests")) == 2
    assert len(_objects(s3_server, bucket, "tombstones")) == 1

    with open_tier(s3_server, config) as fresh:  # the tombstone of chain[5] still hides a row: kept
        assert fresh.stats().blocks == 7
        fresh.delete_many([b.key for b in chain[4:8]])
        fresh.flush()
    assert len(_objects(s3_server, bucket, "segments")) == 1
    with open_tier(s3_server, config) as fresh:  # now no surviving row is older than any tombstone: pruned
        assert set(fresh.keys()) == {b.key for b in chain[8:]}
    assert _objects(s3_server, bucket, "tombstones") == []
    with open_tier(s3_server, config) as fresh:
        assert set(fresh.keys()) == {b.key for b in chain[8:]}
        assert all(same(fresh.get(b.key), b) for b in chain[8:])


def test_prefixes_are_separate(s3_server: SeaweedFS) -> None:
    bucket = s3_server.create_bucket()
    one = make_chain(3, seed=45)
    two = make_chain(2, seed=46)
    with open_tier(s3_server, object_config(s3_server, bucket, prefix="node-1")) as n1, \
            open_tier(s3_server, object_config(s3_server, bucket, prefix="node-2")) as n2:  # fmt: skip
        n1.put_many(one)
        n2.put_many(two)
    with open_tier(s3_server, object_config(s3_server, bucket, prefix="node-1")) as again:
        assert set(again.keys()) == {b.key for b in one}


def test_concurrent_writers_readers_and_uploader(s3_server: SeaweedFS) -> None:
    """Threads putting, reading, deleting and re-putting while the uploader seals and uploads: the rebuilt index
    equals the final state the threads left."""
    bucket = s3_server.create_bucket()
    config = object_config(s3_server, bucket, segment_bytes=6 * 2 * ALIGN, seal_after_s=0.05)
    chains = [make_chain(24, seed=60 + t, namespace=f"tenant-{t}") for t in range(4)]
    errors: list[BaseException] = []

    def work(tier: ObjectTier, chain: list) -> None:  # type: ignore[type-arg]
        try:
            for i, block in enumerate(chain):
                tier.put(block)
                if i % 3 == 2:
                    assert tier.delete(chain[i - 1].key)
                got = tier.get_many([b.key for b in chain[: i + 1]])
                for j, g in enumerate(got):
                    if g is not None:
                        assert same(g, chain[j])
            for i in range(1, len(chain), 6):
                tier.put(chain[i])  # re-put some deleted ones
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    tier = open_tier(s3_server, config)
    tier.start()
    threads = [threading.Thread(target=work, args=(tier, c)) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = {
        b.key for c in chains for i, b in enumerate(c) if not (i % 3 == 1 and i + 1 < len(c)) or (i - 1) % 6 == 0
    }
    assert set(tier.keys()) == expected
    tier.close()
    with open_tier(s3_server, config) as fresh:
        assert set(fresh.keys()) == expected
        all_blocks = [b for c in chains for b in c if b.key in expected]
        assert all(same(g, b) for g, b in zip(fresh.get_many([b.key for b in all_blocks]), all_blocks, strict=True))
        assert fresh.stats().corrupt == 0
