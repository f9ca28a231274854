from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric.events import AllCleared, BlockRemoved, BlockStored
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import NO_TIER, Location, PrefixIndex, SourceMatch

NS = Namespace("tenant-a")
FP = ModelFingerprint(b"\x11" * 32)
GPU, RAM, DISK = TierId("gpu"), TierId("ram"), TierId("disk")
CHAIN = [PrefixHash(bytes([i]) * 32) for i in range(12)]


def stored(source: str, medium: str, lo: int, hi: int, ns: str = NS, fp: bytes = FP) -> BlockStored:
    return BlockStored(source, TierId(medium), Namespace(ns), ModelFingerprint(fp), tuple(CHAIN[lo:hi]))


def removed(source: str, medium: str, lo: int, hi: int) -> BlockRemoved:
    return BlockRemoved(source, TierId(medium), NS, FP, tuple(CHAIN[lo:hi]))


def test_leading_depth_per_source_and_medium() -> None:
    idx = PrefixIndex()
    assert idx.apply_many([stored("e1", GPU, 0, 3), stored("e2", GPU, 0, 6), stored("n1", RAM, 0, 4),
                           stored("n1", DISK, 0, 9), stored("e3", GPU, 1, 8)]) == 5  # fmt: skip
    assert idx.match(NS, FP, CHAIN) == [
        SourceMatch("n1", 9, ((DISK, 9), (RAM, 4))),
        SourceMatch("e2", 6, ((GPU, 6),)),
        SourceMatch("e1", 3, ((GPU, 3),)),
    ]  # e3 lacks block 0: no leading match


def test_a_source_matches_over_the_union_of_its_media() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("n1", RAM, 0, 3), stored("n1", DISK, 3, 7)])
    [m] = idx.match(NS, FP, CHAIN)
    assert m.blocks == 7 and dict(m.media) == {RAM: 3}
    assert idx.walk(NS, FP, CHAIN).depths == {"n1": 7}


def test_removal_cuts_the_chain_where_the_block_went() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("e1", GPU, 0, 8), removed("e1", GPU, 5, 6)])
    assert idx.match(NS, FP, CHAIN)[0].blocks == 5
    idx.apply(removed("e1", GPU, 0, 1))
    assert idx.match(NS, FP, CHAIN) == []
    assert idx.stats().locations == {Location("e1", GPU): 6}


def test_removing_unknown_blocks_or_locations_changes_nothing() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("e1", GPU, 0, 4), removed("e2", GPU, 0, 4), removed("e1", RAM, 0, 4)])
    idx.apply(BlockRemoved("e1", GPU, Namespace("other"), FP, tuple(CHAIN[:4])))
    assert idx.match(NS, FP, CHAIN)[0].blocks == 4
    assert idx.remove_location("nobody") == 0


def test_namespaces_and_models_never_see_each_other() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("e1", GPU, 0, 5, ns="tenant-b"), stored("e2", GPU, 0, 5, fp=b"\x22" * 32)])
    assert idx.match(NS, FP, CHAIN) == []
    assert idx.match(Namespace("tenant-b"), FP, CHAIN)[0].source == "e1"
    assert idx.match(NS, ModelFingerprint(b"\x22" * 32), CHAIN)[0].source == "e2"


def test_engine_gone_is_one_operation_and_compaction_frees_the_bit() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("e1", GPU, 0, 6), stored("e1", RAM, 0, 6), stored("e2", GPU, 0, 3)])
    assert idx.remove_location("e1") == 12
    assert [m.source for m in idx.match(NS, FP, CHAIN)] == ["e2"]
    assert idx.stats().retired_bits == 2
    assert len(idx) == 6  # stale marks stay until compaction ...
    assert idx.compact() == 3  # ... which drops blocks nobody live holds
    assert len(idx) == 3 and idx.stats().retired_bits == 0
    idx.apply(stored("e3", GPU, 0, 2))  # reuses a freed bit, starting clean
    assert {m.source: m.blocks for m in idx.match(NS, FP, CHAIN)} == {"e2": 3, "e3": 2}


def test_all_cleared_per_medium_or_whole_source() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("n1", RAM, 0, 4), stored("n1", DISK, 0, 2), AllCleared("n1", RAM)])
    assert idx.match(NS, FP, CHAIN) == [SourceMatch("n1", 2, ((DISK, 2),))]
    idx.apply(AllCleared("n1"))
    assert idx.match(NS, FP, CHAIN) == []
    idx.apply(stored("n1", RAM, 0, 1))  # a source can come back after being cleared
    assert idx.match(NS, FP, CHAIN)[0].blocks == 1


def test_walk_reports_fastest_tier_per_position_and_stops_early() -> None:
    idx = PrefixIndex()
    idx.apply_many([stored("e1", GPU, 0, 2), stored("n1", RAM, 0, 3), stored("n1", DISK, 2, 6)])
    masks = [idx.mask_of(media=[RAM]), idx.mask_of(media=[DISK])]
    w = idx.walk(NS, FP, CHAIN, masks)
    assert w.depths == {"e1": 2, "n1": 6}
    assert w.tiers == [0, 0, 0, 1, 1, 1]
    assert w.probed == 7  # block 6 is held by nobody: the walk stops there
    e1, n1_ram, n1_disk = (idx.mask_of(sources=["e1"]), *masks)
    assert sorted(zip(w.bits, w.bit_depths)) == sorted([(e1.bit_length() - 1, 2), (n1_ram.bit_length() - 1, 6),
                                                       (n1_disk.bit_length() - 1, 6)])  # fmt: skip
    w = idx.walk(NS, FP, CHAIN, [masks[1]], sources_mask=e1)
    assert (w.depths, w.codes, w.tiers) == ({"e1": 2}, bytes([NO_TIER, NO_TIER, 0, 0, 0, 0]), [-1, -1, 0, 0, 0, 0])


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(TypeError):
        PrefixIndex().apply_many([object()])  # type: ignore[list-item]


SOURCES = ["e0", "e1", "n0"]
MEDIA = [GPU, RAM]
op = st.tuples(
    st.sampled_from(["store", "remove", "clear", "clear-medium", "compact"]),
    st.sampled_from(SOURCES),
    st.sampled_from(MEDIA),
    st.integers(0, 11),
    st.integers(0, 11),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_matches_a_naive_model(ops: list[tuple[str, str, TierId, int, int]]) -> None:
    idx = PrefixIndex()
    model: dict[tuple[str, str], set[bytes]] = {}
    for kind, source, medium, a, b in ops:
        lo, hi = min(a, b), max(a, b) + 1
        if kind == "store":
            idx.apply(stored(source, medium, lo, hi))
            model.setdefault((source, medium), set()).update(CHAIN[lo:hi])
        elif kind == "remove":
            idx.apply(removed(source, medium, lo, hi))
            model.get((source, medium), set()).difference_update(CHAIN[lo:hi])
        elif kind == "clear":
            idx.apply(AllCleared(source))
            for key in [k for k in model if k[0] == source]:
                del model[key]
        elif kind == "clear-medium":
            idx.apply(AllCleared(source, medium))
            model.pop((source, medium), None)
        else:
            idx.compact()
    expected = {}
    for source in SOURCES:
        held = set().union(*(v for k, v in model.items() if k[0] == source))
        depth = 0
        while depth < len(CHAIN) and CHAIN[depth] in held:
            depth += 1
        if depth:
            expected[source] = depth
    assert {m.source: m.blocks for m in idx.match(NS, FP, CHAIN)} == expected
    assert idx.walk(NS, FP, CHAIN).depths == expected
    counts = {loc: n for loc, n in idx.stats().locations.items() if n}
    assert counts == {Location(s, TierId(m)): len(v) for (s, m), v in model.items() if v}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 700), min_size=1, max_size=6), st.integers(0, 700), st.integers(0, 700))
def test_walk_over_long_chains_matches_a_naive_walk(depths: list[int], ram_to: int, disk_to: int) -> None:
    """Drops and the fabric run land anywhere, across the walk's chunk boundaries."""
    chain = [PrefixHash(i.to_bytes(32, "big")) for i in range(1, 701)]
    idx = PrefixIndex()
    for e, d in enumerate(depths):
        idx.apply(BlockStored(f"e{e}", GPU, NS, FP, tuple(chain[:d])))
    idx.apply(BlockStored("node", RAM, NS, FP, tuple(chain[:ram_to])))
    idx.apply(BlockStored("node", DISK, NS, FP, tuple(chain[ram_to // 2 : disk_to])))
    tiers = [idx.mask_of(media=[RAM]), idx.mask_of(media=[DISK])]
    engines = idx.mask_of(sources=[f"e{e}" for e in range(len(depths))])
    w = idx.walk(NS, FP, chain, tiers, sources_mask=engines)
    assert w.depths == {f"e{e}": d for e, d in enumerate(depths) if d}
    tier_at = [0 if i < ram_to else 1 if ram_to // 2 <= i < disk_to else -1 for i in range(len(chain))]
    stop = next((i for i in range(max(depths, default=0), len(chain)) if tier_at[i] < 0), len(chain))
    assert w.tiers == tier_at[:stop]
    assert w.probed == min(stop + 1, len(chain))


@pytest.mark.parametrize("engines_between", [1, 12])
@pytest.mark.parametrize("engines_first", [0, 3, 300])
def test_tier_codes_wherever_the_tier_bits_lie(engines_first: int, engines_between: int) -> None:
    """Tier codes are the same whether the tiers' bits are the first ones, a window further up, or spread wide."""
    chain = [PrefixHash(i.to_bytes(32, "big")) for i in range(1, 41)]
    idx = PrefixIndex()
    for e in range(engines_first):  # locations created before the fabric's take the low bits
        idx.apply(BlockStored(f"e{e}", GPU, NS, FP, (chain[0],)))
    idx.apply(BlockStored("n1", RAM, NS, FP, tuple(chain[0:10]) + tuple(chain[20:25])))
    idx.apply(BlockStored("n1", TierId("object"), NS, FP, tuple(chain[32:38])))  # one medium at two nodes
    for e in range(engines_between):  # spread the fabric's bits over more than a byte
        idx.apply(BlockStored(f"late{e}", GPU, NS, FP, tuple(chain[:2])))
    idx.apply(BlockStored("n2", DISK, NS, FP, tuple(chain[5:30])))
    idx.apply(BlockStored("n3", TierId("object"), NS, FP, tuple(chain[:32])))
    obj = TierId("object")
    for media in ([RAM], [obj], [RAM, DISK], [RAM, DISK, obj], [obj, DISK, RAM, GPU]):
        tiers = [idx.mask_of(media=[m]) for m in media]
        w = idx.walk(NS, FP, chain, tiers, sources_mask=0)
        expected = [next((t for t, tm in enumerate(tiers) if (idx.holders(NS, FP, h) and any(
            idx.mask_of(sources=[loc.source], media=[loc.medium]) & tm for loc in idx.holders(NS, FP, h)))), -1)
            for h in chain]  # fmt: skip
        stop = expected.index(-1) if -1 in expected else len(chain)
        assert w.tiers == expected[:stop], media
