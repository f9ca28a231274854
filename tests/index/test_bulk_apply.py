"""Bulk application (``apply_many`` runs, ``decode_runs`` + ``apply_runs``) must leave the index exactly as
applying the same events one by one does."""

from __future__ import annotations

import random

import msgpack
import pytest

from kvfabric.errors import EventFormatError
from kvfabric.events import (
    EVENT_FORMAT_VERSION,
    AllCleared,
    BlockRemoved,
    BlockStored,
    HashRun,
    KVEvent,
    decode_batch,
    decode_runs,
    encode_batch,
)  # fmt: skip
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import Location, PrefixIndex

SOURCES = ["engine-0", "engine-1", "node-a"]
MEDIA = [TierId("gpu"), TierId("ram"), TierId("disk")]
SCOPES = [(Namespace("t1"), ModelFingerprint(b"\x01" * 32)), (Namespace("t2"), ModelFingerprint(b"\x01" * 32)),
          (Namespace("t1"), ModelFingerprint(b"\x02" * 32))]  # fmt: skip
HASHES = [PrefixHash(i.to_bytes(32, "big")) for i in range(120)]  # few, so stores and removals collide often


def random_stream(seed: int, n: int) -> list[KVEvent]:
    """Events of several sources, media and scopes, in runs (as publishers batch them) and interleaved; hashes
    repeat within and across events; removals of held and unheld blocks, clears of one medium and of a source."""
    rng = random.Random(seed)
    out: list[KVEvent] = []
    while len(out) < n:
        source, medium = rng.choice(SOURCES), rng.choice(MEDIA)
        ns, model = rng.choice(SCOPES)
        roll = rng.random()
        if roll < 0.03:
            out.append(AllCleared(source, rng.choice([None, medium])))
            continue
        kind = BlockStored if roll < 0.7 else BlockRemoved
        for _ in range(rng.choice([1, 1, 3, 20])):  # a run of one place, or a lone event
            hashes = tuple(rng.choices(HASHES, k=rng.choice([0, 1, 1, 2, 5])))
            if kind is BlockStored:
                out.append(BlockStored(source, medium, ns, model, hashes))
            else:
                out.append(BlockRemoved(source, medium, ns, model, hashes))
    return out


def state(idx: PrefixIndex) -> tuple[object, ...]:
    """Everything the index holds, location bits resolved to locations (so the comparison is by meaning)."""
    by_bit = idx.locations_by_bit()
    tables = {}
    for scope, table in idx._scopes.items():  # the test compares the whole state
        tables[scope] = {h: frozenset(by_bit[b] for b in range(mask.bit_length()) if mask >> b & 1 and by_bit[b])
                         for h, mask in table.items() if mask & idx._live}  # fmt: skip
    return tables, idx.stats().locations


def model_state(events: list[KVEvent]) -> tuple[object, ...]:
    """What :func:`state` must be after ``events``, by the plain meaning of each (sets, no bits)."""
    tables: dict[tuple[str, bytes], dict[bytes, set[Location]]] = {}
    live: dict[Location, int] = {}
    for ev in events:
        match ev:
            case BlockStored():
                loc = Location(ev.source, ev.medium)
                live.setdefault(loc, 0)
                table = tables.setdefault((ev.namespace, ev.model), {})
                for h in ev.hashes:
                    if loc not in table.setdefault(h, set()):
                        table[h].add(loc)
                        live[loc] += 1
            case BlockRemoved():
                loc = Location(ev.source, ev.medium)
                table = tables.get((ev.namespace, ev.model), {})
                for h in ev.hashes:
                    if loc in table.get(h, ()):
                        table[h].discard(loc)
                        live[loc] -= 1
            case AllCleared():
                for loc in [x for x in live if x.source == ev.source and ev.medium in (None, x.medium)]:
                    del live[loc]
                    for table in tables.values():
                        for holders in table.values():
                            holders.discard(loc)
    # a scope exists once a store named it (even with no hash left), as in the index
    out = {scope: {h: frozenset(s) for h, s in table.items() if s} for scope, table in tables.items()}
    return out, live


def one_by_one(events: list[KVEvent]) -> PrefixIndex:
    idx = PrefixIndex()
    for ev in events:
        idx.apply(ev)
    return idx


@pytest.mark.parametrize("seed", range(6))
def test_a_stream_applied_in_bulk_equals_it_applied_event_by_event(seed: int) -> None:
    events = random_stream(seed, 3000)
    expected = state(one_by_one(events))
    assert expected == model_state(events)
    bulk = PrefixIndex()
    assert bulk.apply_many(events) == len(events)
    assert state(bulk) == expected
    chunked = PrefixIndex()
    for i in range(0, len(events), 97):
        chunked.apply_many(iter(events[i : i + 97]))  # any iterable, batch boundaries anywhere
    assert state(chunked) == expected


@pytest.mark.parametrize("seed", range(6))
def test_wire_runs_applied_equal_the_decoded_events(seed: int) -> None:
    events = random_stream(100 + seed, 3000)
    expected = state(one_by_one(events))
    idx = PrefixIndex()
    applied = 0
    for i in range(0, len(events), 250):
        payload = encode_batch(events[i : i + 250], seq=i)
        assert decode_batch(payload).events == tuple(events[i : i + 250])
        batch = decode_runs(payload)
        idx.apply_runs(batch.runs)
        applied += batch.events
    assert applied == len(events)
    assert state(idx) == expected


def test_equal_fields_in_distinct_objects_still_form_one_run() -> None:
    # Fields decoded one by one are equal, not identical: the index must treat them as the same place.
    a = BlockStored("e" + "1", TierId("g" + "pu"), Namespace("t" + "1"), ModelFingerprint(bytes(32)), (HASHES[0],))
    b = BlockStored("e" + "1", TierId("g" + "pu"), Namespace("t" + "1"), ModelFingerprint(bytes(32)), (HASHES[0],))
    idx = PrefixIndex()
    idx.apply_many([a, b, BlockRemoved(a.source, a.medium, a.namespace, a.model, (HASHES[0],))])
    assert len(idx) == 0 and sum(idx.stats().locations.values()) == 0


def test_consecutive_events_of_one_place_decode_into_one_run() -> None:
    ns, model = SCOPES[0]
    events = [BlockStored("e", MEDIA[0], ns, model, (h,)) for h in HASHES[:5]]
    events += [BlockStored("e", MEDIA[0], ns, model, tuple(HASHES[5:8])), AllCleared("e"),
               BlockRemoved("e", MEDIA[0], ns, model, (HASHES[0],))]  # fmt: skip
    batch = decode_runs(encode_batch(events))
    assert batch.events == len(events)
    assert batch.runs == [HashRun(True, ("e", MEDIA[0]), (ns, model), HASHES[:8]), AllCleared("e"),
                          HashRun(False, ("e", MEDIA[0]), (ns, model), [HASHES[0]])]  # fmt: skip


GOOD = [1, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p" * 32, 16]


@pytest.mark.parametrize(
    "items",
    [
        [[9, "x"]],
        [GOOD, [1, "s", "ram", "ns", b"m" * 32, b"x" * 31, b"p" * 32, 16]],
        [GOOD, [1, "s", "ram", "ns", b"m" * 32, b"x" * 32]],
        [GOOD, [1, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p", 16]],
        [GOOD, [1, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p" * 32, -1]],
        [GOOD, [1, "s", "ram", "ns", b"m" * 32, "x" * 32, b"p" * 32, 16]],
        [GOOD, [2, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p" * 32, 16]],
        [GOOD, [2, "", "ram", "ns", b"m" * 32, b"x" * 32]],
        [GOOD, GOOD, [3, "s", 5]],
        [GOOD, "not an event"],
    ],
)
def test_decode_runs_refuses_what_decode_batch_refuses(items: list[object]) -> None:
    payload = msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, items])
    with pytest.raises(EventFormatError):
        decode_batch(payload)
    with pytest.raises(EventFormatError):
        decode_runs(payload)


def test_apply_many_refuses_a_non_event_after_applying_those_before() -> None:
    ns, model = SCOPES[0]
    idx = PrefixIndex()
    with pytest.raises(TypeError, match="not a KV event"):
        idx.apply_many([BlockStored("e", MEDIA[0], ns, model, (HASHES[0],)), "oops"])  # type: ignore[list-item]
    assert len(idx) == 1
