"""Bit flips anywhere in a record (header or payload) make the block a counted, announced miss; never served."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from kvfabric.events import BlockRemoved, EventLog
from kvfabric.record import Block
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.disk import DiskTier, SegmentEntry
from tests.blocks import make_chain
from tests.store.tier_suite import same

BIG = ModelSpec(model="test/f32", num_layers=2, kv_heads=4, head_dim=64, dtype=DType.FLOAT32, block_size=16)


def flip_bit(path: Path, pos: int, rng: random.Random) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))


def flip_records(tier: DiskTier, rng: random.Random, fraction: float) -> set[bytes]:
    """Flip one bit in a random ``fraction`` of the records, half in headers and half in payloads (and a few extra
    flips in padding, which belong to no block); returns the keys hit."""
    entries: list[tuple[Path, SegmentEntry]] = [(p, e) for p in tier.segment_paths() for e in tier.segment_entries(p)]
    victims = rng.sample(entries, int(len(entries) * fraction))
    hit = set()
    for n, (path, e) in enumerate(victims):
        if n % 2:
            pos = e.offset + rng.randrange(e.header_len)
        else:
            pos = e.offset + e.header_len + rng.randrange(e.record_len - e.header_len)
        flip_bit(path, pos, rng)
        hit.add(e.key.to_bytes())
    for path, e in rng.sample(entries, 3):  # padding between records is not part of any block
        pad_start = e.offset + e.record_len
        pad_len = -e.record_len % 4096
        if pad_len:
            flip_bit(path, pad_start + rng.randrange(pad_len), rng)
    return hit


@pytest.mark.parametrize("reopen", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flipped_blocks_are_misses(tmp_path: Path, reopen: bool, seed: int) -> None:
    rng = random.Random(seed)
    blocks = make_chain(40, seed=seed) + make_chain(20, spec=BIG, seed=seed)  # 4 KiB and 32 KiB payloads
    events = EventLog()
    t = DiskTier(tmp_path, segment_bytes=128 << 10, events=events)
    try:
        t.put_many(blocks)
        hit = flip_records(t, rng, 0.4)
        if reopen:
            t.close()
            t = DiskTier(tmp_path, segment_bytes=128 << 10, events=events)
        events.take_events()
        served_bad = 0
        for b in blocks:
            got = t.get(b.key) if rng.random() < 0.5 else _get_into(t, b)
            if b.key.to_bytes() in hit:
                served_bad += got is not None
            else:
                assert same(got, b)
        assert served_bad == 0
        assert t.stats().corrupt == len(hit)
        removed = {h for e in events.take_events() if isinstance(e, BlockRemoved) for h in e.hashes}
        assert removed == {b.key.prefix for b in blocks if b.key.to_bytes() in hit}
        # dropped from the index: a second read is a plain miss, not counted again
        assert all(t.get(b.key) is None for b in blocks if b.key.to_bytes() in hit)
        assert t.stats().corrupt == len(hit)
        assert t.stats().blocks == len(blocks) - len(hit)
    finally:
        t.close()


def _get_into(t: DiskTier, b: Block) -> Block | None:
    out = np.zeros(b.meta.nbytes, dtype=np.uint8)
    meta = t.get_into(b.key, memoryview(out))
    return None if meta is None else Block(meta, out.tobytes())


def test_compressed_records_are_verified_too(tmp_path: Path) -> None:
    rng = random.Random(7)
    blocks = make_chain(30)
    with DiskTier(tmp_path, codec="shuffle_zstd") as t:
        t.put_many(blocks)
        hit = flip_records(t, rng, 0.5)
        got = {b.key.to_bytes(): t.get(b.key) for b in blocks}
        assert all(got[k] is None for k in hit)
        assert all(same(got[b.key.to_bytes()], b) for b in blocks if b.key.to_bytes() not in hit)
        assert t.stats().corrupt == len(hit)
