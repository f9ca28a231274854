"""DiskTier: the shared tier suite (per fsync policy and codec), the sealed-segment hook, concurrency, bad input."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvfabric.errors import InvalidBlockError, StoreError
from kvfabric.ids import BlockKey, Namespace
from kvfabric.record import Block, decode_record
from kvfabric.store.disk import DiskTier, SegmentEntry
from kvfabric.store.tier import Tier
from tests.blocks import make_block, make_chain
from tests.store.tier_suite import Corrupt, TierSuite, same

CONFIGS = [
    {"fsync": "group", "codec": "raw"},
    {"fsync": "always", "codec": "shuffle_zstd"},
    {"fsync": "none", "codec": "raw"},
]


class TestDiskTier(TierSuite):
    REPORTS = frozenset({"recovery", "disk"})

    @pytest.fixture(params=CONFIGS, ids=lambda c: f"{c['fsync']}-{c['codec']}")
    def config(self, request: pytest.FixtureRequest) -> dict[str, str]:
        return request.param

    @pytest.fixture
    def tier(self, tmp_path: Path, config: dict[str, str]) -> Iterator[Tier]:
        t = DiskTier(tmp_path / "disk", segment_bytes=64 << 10, **config)  # type: ignore[arg-type]
        yield t
        t.close()

    @pytest.fixture
    def reopen(self, tmp_path: Path, config: dict[str, str]) -> Callable[[], Tier]:
        return lambda: DiskTier(tmp_path / "disk", segment_bytes=64 << 10, **config)  # type: ignore[arg-type]

    @pytest.fixture
    def corrupt(self) -> Corrupt:
        return flip_payload_byte


def flip_payload_byte(tier: Tier, key: BlockKey) -> None:
    """Change the last stored payload byte of ``key``'s record in its segment file, behind the tier's back."""
    assert isinstance(tier, DiskTier)
    for path in tier.segment_paths():
        for e in tier.segment_entries(path):
            if e.key == key:
                with open(path, "r+b") as f:
                    f.seek(e.offset + e.record_len - 1)
                    byte = f.read(1)[0]
                    f.seek(e.offset + e.record_len - 1)
                    f.write(bytes([byte ^ 0xFF]))
                return
    raise AssertionError(f"no record of {key} in {tier.path}")


def test_sealed_segment_hook_lists_every_live_record(tmp_path: Path) -> None:
    sealed: list[tuple[Path, list[SegmentEntry]]] = []
    chain = make_chain(30)
    with DiskTier(tmp_path, segment_bytes=64 << 10, on_segment_sealed=lambda p, e: sealed.append((p, e))) as t:
        t.put_many(chain[:12])  # 8 records fill a segment: the first is sealed by now
        t.delete(chain[10].key)  # dead before its segment (the second) is sealed: not listed
        t.put_many(chain[12:])
        assert [p for p, _ in sealed] == t.sealed_segments() == t.segment_paths()[:-1]
        by_key = {b.key: b for b in chain}
        listed = set()
        for path, entries in sealed:
            data = path.read_bytes()
            assert entries == t.segment_entries(path)  # nothing changed since they were sealed
            for e in entries:
                assert e.offset % 4096 == 0
                block = decode_record(data[e.offset : e.offset + e.record_len])  # verifies both checksums
                assert same(block, by_key[e.key]) and e.meta == by_key[e.key].meta
                listed.add(e.key)
        active = {e.key for e in t.segment_entries(t.segment_paths()[-1])}
        assert listed | active == set(by_key) - {chain[10].key}
        assert not listed & active


def test_reopen_does_not_announce_old_segments(tmp_path: Path) -> None:
    sealed: list[Path] = []
    chain = make_chain(20)
    with DiskTier(tmp_path, segment_bytes=64 << 10, on_segment_sealed=lambda p, e: sealed.append(p)) as t:
        t.put_many(chain[:12])
    n = len(sealed)
    with DiskTier(tmp_path, segment_bytes=64 << 10, on_segment_sealed=lambda p, e: sealed.append(p)) as t:
        t.put_many(chain[12:])
        assert len(sealed) > n and len(set(sealed)) == len(sealed)
        entries = {e.key for p in sealed for e in t.segment_entries(p)}
        assert entries <= {b.key for b in chain}


@pytest.mark.parametrize("fsync", ["group", "always"])
def test_concurrent_puts_gets_deletes(tmp_path: Path, fsync: str) -> None:
    chains = [make_chain(60, seed=s, namespace=f"t{s}") for s in range(4)]
    errors: list[Exception] = []
    with DiskTier(tmp_path, segment_bytes=128 << 10, fsync=fsync, group_commit_ms=1.0) as t:

        def work(chain: list[Block]) -> None:
            try:
                for i, b in enumerate(chain):
                    t.put(b)
                    assert same(t.get(b.key), b)
                    if i % 5 == 4:
                        assert t.delete(chain[i - 1].key)
            except Exception as exc:  # noqa: BLE001 - handed to the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(c,)) for c in chains]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        expected = {b.key: b for c in chains for i, b in enumerate(c) if i % 5 != 3}
        assert t.stats().blocks == len(expected)
    with DiskTier(tmp_path) as t:
        assert {k.to_bytes() for k in t.keys()} == {k.to_bytes() for k in expected}
        assert all(same(t.get(k), b) for k, b in expected.items())


def test_overwrite_last_write_wins(tmp_path: Path) -> None:
    a = make_block(seed=1)
    b = Block(a.meta, make_block(seed=2).payload)
    with DiskTier(tmp_path) as t:
        t.put(a)
        t.put(b)  # same key and meta, new bytes
        assert same(t.get(a.key), b)
        assert t.stats().blocks == 1
    with DiskTier(tmp_path) as t:
        assert same(t.get(a.key), b)


def test_bad_input_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    good = make_block()
    bad = Block(good.meta, good.payload[:100])
    with DiskTier(tmp_path) as t:
        used = t.disk_usage()
        with pytest.raises(InvalidBlockError, match=str(good.key.prefix.hex())):
            t.put(bad)
        with pytest.raises(InvalidBlockError):
            t.put_many([good, bad])
        assert t.disk_usage() == used and t.stats().blocks == 0
        assert not t.contains(good.key)


def test_get_returns_a_writable_private_buffer(tmp_path: Path) -> None:
    b = make_block()
    with DiskTier(tmp_path) as t:
        t.put(b)
        got = t.get(b.key)
        assert got is not None
        arr = np.frombuffer(got.payload, dtype=np.uint8)
        assert arr.tobytes() == b.payload


def test_closed_tier_refuses_work(tmp_path: Path) -> None:
    b = make_block()
    t = DiskTier(tmp_path)
    t.close()
    t.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        t.put(b)
    with pytest.raises(StoreError, match="closed"):
        t.get(b.key)


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="segment_bytes"):
        DiskTier(tmp_path, segment_bytes=1000)
    with pytest.raises(ValueError, match="fsync"):
        DiskTier(tmp_path / "x", fsync="sometimes")
    with pytest.raises(ValueError, match="codec"):
        DiskTier(tmp_path / "y", codec="lz4")


def test_iter_created_ms_reads_ages_from_the_index(tmp_path: Path) -> None:
    a = make_chain(3, namespace="tenant-a")
    b = make_chain(2, namespace="tenant-b", seed=1)
    with DiskTier(tmp_path) as t:
        t.put_many(a + b)
        got = {k: (ms, n) for k, ms, n in t.iter_created_ms()}
        assert got == {x.key: (x.meta.created_ms, x.meta.nbytes) for x in a + b}
        assert {k for k, _, _ in t.iter_created_ms(Namespace("tenant-b"))} == {x.key for x in b}
