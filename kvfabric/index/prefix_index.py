"""The prefix index: which locations hold which blocks, answering "how deep does each location match this chain".

A plain synchronous data structure: no locks, no awaits, owned by one task (see ``kvfabric/index/service.py``).

Layout, chosen for Python speed (``docs/router.md`` has the numbers):

- A *location* is one ``(source, medium)`` pair: an engine's GPU cache, a fabric node's RAM tier. Each live location
  owns one bit number.
- Blocks are partitioned by *scope* ``(namespace, model fingerprint)``; within a scope a dict maps each prefix hash to
  an ``int`` bitmask of the locations holding it. Storing a block is one ``dict.get`` plus one store; a chain lookup is
  one ``dict.get`` and one ``&`` per block.
- A source's depth is over the union of its media (a node serves a block from RAM or disk alike).
- Removing a location (an engine is gone) is O(1): its bit leaves the live mask, so no query sees it again. The bit's
  stale marks are swept by :meth:`PrefixIndex.compact`, which the owner runs when convenient; until then the bit
  number is not reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress, repeat
from operator import add, and_, eq, ne, rshift, sub, xor

from kvfabric.events import AllCleared, BlockRemoved, BlockStored, EventRun, HashRun, KVEvent
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId

Scope = tuple[Namespace, ModelFingerprint]
"""Blocks of different namespaces or models never match each other."""


@dataclass(frozen=True, slots=True)
class Location:
    """One place blocks live: a source (engine or fabric node) and a medium (``gpu``, ``ram``, ``disk``, ...)."""

    source: str
    medium: TierId


@dataclass(frozen=True, slots=True)
class SourceMatch:
    """How far a chain matches at one source: ``blocks`` leading blocks over all its media, and per medium."""

    source: str
    blocks: int
    media: tuple[tuple[TierId, int], ...]
    """``(medium, leading blocks held in that medium)``, deepest first; media with no leading block are left out."""


NO_TIER = 255
"""Tier code of a walked position that no tier mask holds (see :attr:`ChainWalk.codes`)."""


@dataclass(frozen=True, slots=True)
class ChainWalk:
    """Result of :meth:`PrefixIndex.walk`: the raw material of a routing decision, in the compact form the router
    vectorises (bit numbers, depths, one byte per position); :attr:`depths` and :attr:`tiers` are the readable view.
    """

    bits: list[int]
    """Location bits (of the tracked sources) holding at least the first block of the chain."""
    bit_depths: list[int]
    """For each of :attr:`bits`, the leading blocks its source holds (over the union of the source's media)."""
    codes: bytes
    """For each position walked, the index in ``tier_masks`` of the first mask holding the block, or ``NO_TIER``."""
    probed: int
    """Hashes looked up (the walk stops once nothing can extend any match)."""
    locations: tuple[Location | None, ...]
    """Bit number -> location when the walk ran (to name the sources of :attr:`bits`)."""

    @property
    def depths(self) -> dict[str, int]:
        """Leading blocks held by each source (union of its media); sources matching nothing are absent."""
        out: dict[str, int] = {}
        for bit, depth in zip(self.bits, self.bit_depths, strict=True):
            loc = self.locations[bit]
            if loc is not None:
                out[loc.source] = depth
        return out

    @property
    def tiers(self) -> list[int]:
        """:attr:`codes` as ints, -1 where no tier holds the block."""
        return [-1 if c == NO_TIER else c for c in self.codes]


@dataclass(frozen=True, slots=True)
class IndexStats:
    scopes: int
    blocks: int
    """Distinct (scope, hash) entries."""
    locations: dict[Location, int]
    """Blocks held per live location."""
    retired_bits: int
    """Bits of removed locations whose marks await :meth:`PrefixIndex.compact`."""


class PrefixIndex:
    """Applies KV events and answers chain lookups. Not thread-safe by design: one owner calls it."""

    __slots__ = (
        "_bits",
        "_bitval",
        "_by_bit",
        "_counts",
        "_epoch",
        "_free",
        "_groups",
        "_live",
        "_locations",
        "_retired",
        "_scopes",
        "_tier_tables",
    )  # fmt: skip

    def __init__(self) -> None:
        self._scopes: dict[Scope, dict[bytes, int]] = {}
        self._bits: dict[tuple[str, str], int] = {}  # live (source, medium) -> bit number
        self._locations: list[Location | None] = []  # bit number -> live location, None when retired or free
        self._counts: list[int] = []  # bit number -> blocks marked (live bits only)
        self._bitval: list[int] = []  # bit number -> 1 << bit, one shared int object: a block held by one location
        # points at it instead of owning a copy (a 1,000-bit int is ~160 bytes; 10M blocks would pay that each)
        self._live = 0  # mask of live bits
        self._retired = 0  # mask of removed bits still marked somewhere
        self._free: list[int] = []  # swept bit numbers ready for reuse
        self._groups: list[int] = []  # masks of sources with more than one live medium
        self._epoch = 0  # bumped whenever the set of locations changes (callers cache masks by it)
        self._by_bit: tuple[Location | None, ...] | None = None  # snapshot of _locations for this epoch
        self._tier_tables: dict[tuple[int, ...], bytes] = {}  # walk's tier-code tables, by tier masks

    # --- locations -------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Changes whenever a location is added or removed; masks from :meth:`mask_of` are valid within one epoch."""
        return self._epoch

    def _add_location(self, source: str, medium: str) -> int:
        if not source or not medium:
            raise ValueError("event source and medium must be non-empty")
        bit = self._free.pop() if self._free else len(self._locations)
        if bit == len(self._locations):
            self._locations.append(None)
            self._counts.append(0)
            self._bitval.append(1 << bit)
        self._locations[bit] = Location(source, TierId(medium))
        self._counts[bit] = 0
        self._bits[(source, medium)] = bit
        self._live |= 1 << bit
        self._location_changed()
        return bit

    def _location_changed(self) -> None:
        self._epoch += 1
        self._by_bit = None
        by_source: dict[str, int] = {}
        multi: set[str] = set()
        for (source, _), bit in self._bits.items():
            if source in by_source:
                multi.add(source)
            by_source[source] = by_source.get(source, 0) | (1 << bit)
        self._groups = [by_source[s] for s in sorted(multi)]

    def locations(self) -> list[Location]:
        return [loc for loc in self._locations if loc is not None]

    def locations_by_bit(self) -> tuple[Location | None, ...]:
        """Bit number -> live location (``None`` for a removed or free bit); valid within one :attr:`epoch`."""
        if self._by_bit is None:
            self._by_bit = tuple(self._locations)
        return self._by_bit

    def sources(self) -> list[str]:
        return sorted({loc.source for loc in self.locations()})

    def mask_of(self, *, sources: Iterable[str] | None = None, media: Iterable[str] | None = None) -> int:
        """Bitmask of the live locations whose source is in ``sources`` and medium in ``media`` (None = any)."""
        src = None if sources is None else set(sources)
        med = None if media is None else set(media)
        mask = 0
        for (source, medium), bit in self._bits.items():
            if (src is None or source in src) and (med is None or medium in med):
                mask |= 1 << bit
        return mask

    def remove_location(self, source: str, medium: str | None = None) -> int:
        """Forget everything ``source`` holds (in ``medium``, or in all its media). O(1) per location removed;
        returns the number of blocks it held."""
        gone = [key for key in self._bits if key[0] == source and (medium is None or key[1] == medium)]
        held = 0
        for key in gone:
            bit = self._bits.pop(key)
            held += self._counts[bit]
            self._counts[bit] = 0
            self._locations[bit] = None
            self._live &= ~(1 << bit)
            self._retired |= 1 << bit
        if gone:
            self._location_changed()
        return held

    def compact(self) -> int:
        """Sweep the marks of removed locations (O(blocks)) and free their bits for reuse; returns entries dropped."""
        if not self._retired:
            return 0
        live = self._live
        dropped = 0
        for table in self._scopes.values():
            dead = []
            for h, mask in table.items():
                if mask & ~live:
                    if mask & live:
                        table[h] = mask & live
                    else:
                        dead.append(h)
            for h in dead:
                del table[h]
            dropped += len(dead)
        bits = self._retired
        while bits:
            low = bits & -bits
            self._free.append(low.bit_length() - 1)
            bits ^= low
        self._retired = 0
        for scope in [s for s, t in self._scopes.items() if not t]:
            del self._scopes[scope]
        return dropped

    # --- events ----------------------------------------------------------------------------------------------------
    def apply(self, event: KVEvent) -> None:
        self.apply_many((event,))

    def apply_many(self, events: Iterable[KVEvent]) -> int:
        """Apply events in order; returns how many were applied.

        Consecutive events of one kind, location and scope (a publisher's batch) are gathered by one cheap loop and
        applied as one run: the hashes are marked by C-level ``map`` over ``dict.setdefault``, so the per-event
        Python work is a few attribute compares (fields are compared by identity first: publishers reuse them)."""
        events = events if isinstance(events, list | tuple) else list(events)
        kind: type | None = None
        src: object = None
        med: object = None
        ns: object = None
        model: object = None
        run: list[tuple[PrefixHash, ...]] = []
        for ev in events:
            if type(ev) is kind and ev.model is model and ev.namespace is ns and ev.medium is med and ev.source == src:
                run.append(ev.hashes)
                continue
            if type(ev) is kind and ev.model == model and ev.namespace == ns and ev.medium == med and ev.source == src:
                run.append(ev.hashes)  # the same place in other objects (events decoded one by one)
                continue
            if run:
                self._apply_run(kind is BlockStored, (src, med), (ns, model), run)  # type: ignore[arg-type]
            kind = type(ev)
            if kind is BlockStored or kind is BlockRemoved:
                src, med, ns, model = ev.source, ev.medium, ev.namespace, ev.model
                run = [ev.hashes]
            elif kind is AllCleared:
                self.remove_location(ev.source, ev.medium)
                kind, run = None, []
            else:
                raise TypeError(f"not a KV event: {kind.__name__}")
        if run:
            self._apply_run(kind is BlockStored, (src, med), (ns, model), run)  # type: ignore[arg-type]
        return len(events)

    def apply_runs(self, runs: Iterable[EventRun]) -> None:
        """Apply the runs of a batch decoded by :func:`kvfabric.events.decode_runs`, in order: the same index as
        applying the batch's events one by one, without an object per event."""
        for run in runs:
            if type(run) is HashRun:
                self._apply_run(run.stored, run.location, run.scope, (run.hashes,))
            elif type(run) is AllCleared:
                self.remove_location(run.source, run.medium)
            else:
                raise TypeError(f"not an event run: {type(run).__name__}")

    def _apply_run(
        self, stored: bool, location: tuple[str, TierId], scope: Scope, hashes: list[Sequence[PrefixHash]]
    ) -> None:
        """Mark (``stored``) or unmark ``location``'s bit on the hashes of ``hashes`` (one sequence per event)."""
        found = self._bits.get(location)
        if stored:
            b = self._add_location(*location) if found is None else found
            table = self._scopes.get(scope)
            if table is None:
                table = self._scopes[scope] = {}
            flat = hashes[0] if len(hashes) == 1 else list(chain.from_iterable(hashes))
            self._counts[b] += _mark(table, self._bitval[b], flat)
        elif found is not None:
            table = self._scopes.get(scope)
            if table is not None:
                self._counts[found] -= _unmark(table, self._bitval[found], chain.from_iterable(hashes))

    # --- queries ---------------------------------------------------------------------------------------------------
    def walk(
        self,
        namespace: Namespace,
        model: ModelFingerprint,
        chain: Sequence[PrefixHash],
        tier_masks: Sequence[int] = (),
        *,
        sources_mask: int | None = None,
    ) -> ChainWalk:
        """One pass over ``chain``: the leading depth of every source (of those in ``sources_mask``, default all)
        and, per position, the first of ``tier_masks`` holding the block. Stops at the first block that neither a
        still-matching source nor any tier mask holds.

        The chain is fetched in growing chunks (``map`` over ``dict.get``) and the running AND is taken by
        ``itertools.accumulate``, so the per-block work is C-level; Python-level work happens only where a source
        drops out. At most 254 tier masks (codes are bytes)."""
        if len(tier_masks) >= NO_TIER:
            raise ValueError(f"at most {NO_TIER - 1} tier masks")
        table = self._scopes.get((namespace, model))
        if table is None or not chain:
            return ChainWalk([], [], b"", 0, ())
        get = table.get
        run = self._live if sources_mask is None else self._live & sources_mask
        groups = [g for g in self._groups if g & run]
        any_tier = 0
        for tm in tier_masks:
            any_tier |= tm
        masks: list[int] = []
        drop_masks: list[int] = []  # bits that stopped matching ...
        drop_depths: list[int] = []  # ... and the depth they reached
        n = len(chain)
        pos = 0
        step = 16
        stop = n  # position of the first block nobody useful holds
        while pos < n and run:
            chunk = list(map(get, chain[pos : pos + step], repeat(0)))
            spread = chunk if not groups else [_spread(m, groups) for m in chunk]
            acc = list(accumulate(spread, and_, initial=run))
            if acc[-1] != run:
                at = list(compress(range(len(chunk)), map(ne, acc, acc[1:])))
                drop_masks += map(xor, map(acc.__getitem__, at), map(acc.__getitem__, map(add, at, repeat(1))))
                drop_depths += map(add, at, repeat(pos))
                run = acc[-1]
            if run:
                masks += chunk
                pos += len(chunk)
                step = min(step * 2, 512)
                continue
            dead = acc.index(0) - 1  # first block where nothing tracked matches any more
            for k in range(dead, len(chunk)):  # from there on, only the tiers keep the walk going
                if not chunk[k] & any_tier:
                    stop = pos + k
                    break
            masks += chunk[:k] if stop < n else chunk
            pos += len(chunk)
        while pos < n and stop == n:
            chunk = list(map(get, chain[pos : pos + step], repeat(0)))
            held = list(map(and_, chunk, repeat(any_tier)))
            if 0 in held:
                k = held.index(0)
                stop = pos + k
                chunk = chunk[:k]
            masks += chunk
            pos += step
            step = min(step * 2, 512)
        if run:
            drop_masks.append(run)
            drop_depths.append(n)
        if drop_depths and not drop_depths[0]:  # sources holding not even the first block
            del drop_masks[0], drop_depths[0]
        if all(map(eq, map(int.bit_count, drop_masks), repeat(1))):  # one source a drop: the usual case
            bits = list(map(sub, map(int.bit_length, drop_masks), repeat(1)))
            depths = drop_depths
        else:
            bits, depths = [], []
            for mask, depth in zip(drop_masks, drop_depths, strict=True):
                while mask:
                    low = mask & -mask
                    bits.append(low.bit_length() - 1)
                    depths.append(depth)
                    mask ^= low
        codes = _first_tier(masks, tier_masks, self._tier_tables)
        return ChainWalk(bits, depths, codes, min(stop + 1, n), self.locations_by_bit())

    def match(self, namespace: Namespace, model: ModelFingerprint, chain: Sequence[PrefixHash]) -> list[SourceMatch]:
        """For each source matching at least one leading block: its depth overall and per medium, deepest first."""
        table = self._scopes.get((namespace, model))
        if table is None:
            return []
        live = self._live
        masks: list[int] = []
        union = live
        for h in chain:
            m = table.get(h, 0) & live
            g = m
            for grp in self._groups:
                if m & grp:
                    g |= grp
            union &= g
            if not union:
                break
            masks.append(m)
        per_source: dict[str, list[tuple[TierId, int]]] = {}
        for (source, medium), bit in self._bits.items():
            b = 1 << bit
            depth = 0
            while depth < len(masks) and masks[depth] & b:
                depth += 1
            if depth:
                per_source.setdefault(source, []).append((TierId(medium), depth))
        out = []
        for source, media in per_source.items():
            group = self.mask_of(sources=(source,))
            depth = 0
            while depth < len(masks) and masks[depth] & group:
                depth += 1
            out.append(SourceMatch(source, depth, tuple(sorted(media, key=lambda x: (-x[1], x[0])))))
        out.sort(key=lambda s: (-s.blocks, s.source))
        return out

    def holders(self, namespace: Namespace, model: ModelFingerprint, h: PrefixHash) -> list[Location]:
        """Live locations holding one block."""
        table = self._scopes.get((namespace, model))
        mask = (table.get(h, 0) if table else 0) & self._live
        out = []
        while mask:
            low = mask & -mask
            loc = self._locations[low.bit_length() - 1]
            if loc is not None:
                out.append(loc)
            mask ^= low
        return out

    def stats(self) -> IndexStats:
        locs = {loc: self._counts[bit] for bit, loc in enumerate(self._locations) if loc is not None}
        retired = self._retired.bit_count()
        return IndexStats(len(self._scopes), sum(len(t) for t in self._scopes.values()), locs, retired)

    def __len__(self) -> int:
        return sum(len(t) for t in self._scopes.values())


def _mark(table: dict[bytes, int], bit: int, hashes: Sequence[PrefixHash]) -> int:
    """Set ``bit`` on every hash of ``hashes``; returns how many did not have it.

    New hashes get ``bit`` itself (the location's shared int). When none is in the table yet (the usual case), one
    C-level pass checks that and one merges them in; otherwise ``setdefault`` adds the new ones and the hashes held
    already, by others only, get the bit OR-ed in one by one, re-read so a hash repeated in ``hashes`` counts once."""
    before = len(table)
    if table.keys().isdisjoint(hashes):
        table.update(dict.fromkeys(hashes, bit))
        return len(table) - before
    held = list(map(table.setdefault, hashes, repeat(bit)))
    added = len(table) - before
    if held.count(bit) != len(held):
        for h in compress(hashes, map(ne, held, repeat(bit))):
            old = table[h]
            if not old & bit:
                table[h] = old | bit
                added += 1
    return added


def _unmark(table: dict[bytes, int], bit: int, hashes: Iterable[PrefixHash]) -> int:
    """Clear ``bit`` on every hash of ``hashes`` (a hash held by nobody then leaves the table); returns how many
    had it."""
    removed = 0
    get = table.get
    for h in hashes:
        old = get(h, 0)
        if old & bit:
            if old == bit:
                del table[h]
            else:
                table[h] = old ^ bit
            removed += 1
    return removed


def _spread(m: int, groups: list[int]) -> int:
    """``m`` with every medium of a source set when any of its media is (a source matches over its union)."""
    for grp in groups:
        if m & grp:
            m |= grp
    return m


def _first_tier(masks: list[int], tier_masks: Sequence[int], tables: dict[tuple[int, ...], bytes]) -> bytes:
    """For each mask, the index of the first tier mask it intersects, or ``NO_TIER``. ``tables`` caches the byte
    tables of the fast path by tier masks."""
    if not tier_masks:
        return bytes([NO_TIER]) * len(masks)
    any_tier = 0
    for tm in tier_masks:
        any_tier |= tm
    low = (any_tier & -any_tier).bit_length() - 1 if any_tier else 0
    if any_tier >> low < 256:
        # All tier bits within one byte (a node's tiers, whose bits are usually the first ones): one C-level pass
        # takes each block's tier bits into a byte, and a 256-entry table names the fastest tier of each pattern.
        key = tuple(tier_masks)
        table = tables.get(key)
        if table is None:
            if len(tables) >= 64:
                tables.clear()
            table = tables[key] = bytes(
                next((k for k, tm in enumerate(tier_masks) if (p << low) & tm), NO_TIER) for p in range(256)
            )
        held = map(and_, masks, repeat(any_tier))
        return bytes(map(rshift, held, repeat(low)) if low else held).translate(table)
    if len(tier_masks) == 1:
        (t0,) = tier_masks
        return bytes([0 if m & t0 else NO_TIER for m in masks])
    if len(tier_masks) == 2:
        t0, t1 = tier_masks
        return bytes([0 if m & t0 else 1 if m & t1 else NO_TIER for m in masks])
    if len(tier_masks) == 3:
        t0, t1, t2 = tier_masks
        return bytes([0 if m & t0 else 1 if m & t1 else 2 if m & t2 else NO_TIER for m in masks])
    return bytes([next((k for k, tm in enumerate(tier_masks) if m & tm), NO_TIER) for m in masks])
