"""An unreachable object store never fails a caller's read: reads miss (counted), writes wait in a bounded
backlog, a full backlog refuses puts, and the backlog drains when the store is back."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest

from kvfabric.errors import BlockTooLargeError, TierUnavailableError
from kvfabric.store.object import ObjectTier
from kvfabric.store.object.tier import ALIGN
from tests.blocks import make_chain
from tests.s3server import SeaweedFS
from tests.store.object_helpers import object_config, open_tier
from tests.store.tier_suite import same

SEGMENT = 4 * 2 * ALIGN  # four 4 KiB test blocks (each takes two aligned pages)
BACKLOG = 3 * SEGMENT


@pytest.fixture
def own_server() -> Iterator[SeaweedFS]:
    """A server of this test's own, so stopping it disturbs no other test."""
    with SeaweedFS() as server:
        yield server


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connections are refused


def _wait_until(predicate, what: str, deadline_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """Poll for an outcome (not a timing assertion: the deadline only stops a hung test)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_dead_endpoint_degrades_to_misses_and_bounded_backlog(s3_server: SeaweedFS) -> None:
    config = object_config(s3_server, "any-bucket", endpoint_url=_dead_endpoint(), segment_bytes=SEGMENT,
                           backlog_bytes=BACKLOG)  # fmt: skip
    with pytest.raises(TierUnavailableError, match="unreachable"):
        open_tier(s3_server, config)
    tier = ObjectTier(config, session=s3_server.endpoint.session())  # no rebuild: an empty index
    chain = make_chain(20, seed=51)
    accepted = []
    with pytest.raises(TierUnavailableError, match="backlog full"):
        for block in chain:
            tier.put(block)
            accepted.append(block)
    assert 0 < len(accepted) < len(chain)
    assert not tier.contains(chain[len(accepted)].key)  # the refused block changed nothing
    stats = tier.object_stats()
    assert stats.backlog_bytes <= BACKLOG and stats.rejected_puts == 1 and stats.store_down
    assert all(same(tier.get(b.key), b) for b in accepted)  # still served, from memory
    with pytest.raises(TierUnavailableError):
        tier.flush()
    tier.close()  # logs what could not be uploaded; never raises


def test_store_stopped_mid_test_then_back(own_server: SeaweedFS) -> None:
    bucket = own_server.create_bucket()
    config = object_config(own_server, bucket, segment_bytes=SEGMENT, backlog_bytes=BACKLOG)
    committed = make_chain(8, seed=52)
    later = make_chain(30, seed=53)
    tier = open_tier(own_server, config)
    tier.put_many(committed)
    tier.flush()

    own_server.stop()
    # reads of committed blocks: misses, counted, no exception, in every read form
    assert tier.get(committed[0].key) is None
    assert tier.get_many([b.key for b in committed]) == [None] * len(committed)
    buf = np.zeros(committed[1].meta.nbytes, dtype=np.uint8)
    assert tier.get_into(committed[1].key, memoryview(buf)) is None
    stats = tier.object_stats()
    assert stats.unavailable_misses >= 1 + len(committed) + 1 and stats.store_down
    assert tier.stats().corrupt == 0 and tier.stats().blocks == len(committed)  # nothing was dropped
    # writes: buffered until the backlog is full, then refused
    accepted = []
    with pytest.raises(TierUnavailableError, match="backlog full"):
        for block in later:
            tier.put(block)
            accepted.append(block)
    assert tier.object_stats().backlog_bytes <= BACKLOG
    tier.delete(committed[2].key)  # a delete while down waits in the backlog as a tombstone
    with pytest.raises(TierUnavailableError):
        tier.flush()

    own_server.start()  # same ports, same data
    tier.flush()  # the backlog drains
    stats = tier.object_stats()
    assert stats.backlog_bytes == 0 and stats.backlog_items == 0 and not stats.store_down
    assert same(tier.get(committed[0].key), committed[0])
    tier.close()

    with open_tier(own_server, config) as fresh:
        live = [b for b in committed if b.key != committed[2].key] + accepted
        assert set(fresh.keys()) == {b.key for b in live}
        assert all(same(g, b) for g, b in zip(fresh.get_many([b.key for b in live]), live, strict=True))


def test_uploader_thread_drains_after_an_outage(own_server: SeaweedFS) -> None:
    bucket = own_server.create_bucket()
    config = object_config(own_server, bucket, segment_bytes=SEGMENT, backlog_bytes=BACKLOG, seal_after_s=0.2)
    tier = open_tier(own_server, config)
    tier.start()
    first = make_chain(6, seed=54)
    tier.put_many(first)
    _wait_until(lambda: all(tier.locate(b.key) is not None for b in first), "the uploader to commit (seal_after_s)")

    own_server.stop()
    second = make_chain(6, seed=55)
    tier.put_many(second)  # returns at once: the uploader thread meets the outage, not the caller
    _wait_until(lambda: tier.object_stats().upload_failures > 0, "an upload attempt to fail")
    assert all(same(tier.get(b.key), b) for b in second)  # served from memory meanwhile

    own_server.start()
    _wait_until(lambda: tier.object_stats().backlog_bytes == 0, "the backlog to drain")
    assert all(tier.locate(b.key) is not None for b in second)
    tier.close()
    with open_tier(own_server, config) as fresh:
        assert set(fresh.keys()) == {b.key for b in first + second}


def test_block_larger_than_the_backlog_is_bad_input(s3_server: SeaweedFS) -> None:
    config = object_config(s3_server, s3_server.create_bucket(), segment_bytes=ALIGN, backlog_bytes=ALIGN)
    with open_tier(s3_server, config) as tier:
        block = make_chain(1, seed=56)[0]  # 4 KiB payload + header > 4 KiB
        with pytest.raises(BlockTooLargeError):
            tier.put(block)
        assert not tier.contains(block.key) and tier.object_stats().backlog_bytes == 0
