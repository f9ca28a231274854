"""Speed of the prefix index and the router.

    python bench/index.py --json          # full sizes: 1M events, 10M indexed blocks, 1,000 engines
    python bench/index.py --quick         # small sizes, a smoke run

Metrics (one JSON line each with ``--json``; ``baseline`` is a straightforward dict-of-sets index measured in the
same run on the same input, ``ratio = value / baseline``):

- ``events_per_s``: BlockStored events of ONE hash each applied per second (batches of 64 events per publisher,
  100 publishers): the per-event cost without any batching of hashes into events.
- ``blocks_per_s``: the same with 16 hashes per event (what a vLLM prefill looks like), counted per hash.
- ``wire_events_per_s``: one-hash events decoded from kvfabric's msgpack batches and applied the way the ZMQ
  subscriber does (``IndexService.ingest_batch``: ``decode_runs`` + ``PrefixIndex.apply_runs``, no object per event).
- ``probes_per_s``: hashes looked up per second by chain walks (``PrefixIndex.walk``) over an index of
  ``--blocks`` entries.
- ``route_ms``: one kvfabric TTFT decision for a ``--request-tokens`` request (``--block-size`` tokens a block)
  across ``--engines`` engines with ``--blocks`` indexed blocks, 20% of the engines holding prefixes of the request
  at random depths and a fabric node holding it in RAM and disk; the engines' loads given as a list of
  ``EngineLoad`` (converted per decision). Lower is better (so a ratio < 1 is a win).
- ``service_route_ms``: the same decision through ``IndexService.route(hashes=...)`` over registered engines (what
  ``POST /v1/route`` does below HTTP): the service keeps the engines' loads as columns, updated as they report.
- ``chain_hash_ms``: hashing the request's tokens into its chain (``kvfabric.hashing.prefix_hashes``), which a
  request given as ``tokens`` pays before routing; baseline: chaining ``block_hash`` block by block.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvfabric.events import BlockStored, KVEvent, decode_batch, decode_runs, encode_batch
from kvfabric.hashing import block_hash, prefix_hashes, root_hash
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import PrefixIndex
from kvfabric.index.router import Calibration, EngineLoad, RouteRequest, TTFTRouter
from kvfabric.index.service import IndexService

NS = Namespace("bench")
FP = ModelFingerprint(b"\x42" * 32)
GPU, RAM, DISK = TierId("gpu"), TierId("ram"), TierId("disk")


def key(i: int) -> PrefixHash:
    return PrefixHash(i.to_bytes(32, "big"))


class NaiveIndex:
    """The obvious design, as the baseline: hash -> set of (source, medium)."""

    def __init__(self) -> None:
        self.table: dict[bytes, set[tuple[str, str]]] = {}

    def apply_many(self, events: Sequence[KVEvent]) -> None:
        table = self.table
        for ev in events:
            assert isinstance(ev, BlockStored)
            loc = (ev.source, ev.medium)
            for h in ev.hashes:
                s = table.get(h)
                if s is None:
                    table[h] = {loc}
                else:
                    s.add(loc)

    def depth(self, chain: Sequence[bytes], loc: tuple[str, str]) -> int:
        n = 0
        for h in chain:
            s = self.table.get(h)
            if s is None or loc not in s:
                break
            n += 1
        return n

    def walk(self, chain: Sequence[bytes]) -> int:
        """Intersect holder sets along the chain until empty; returns hashes probed."""
        run: set[tuple[str, str]] | None = None
        probed = 0
        for h in chain:
            probed += 1
            s = self.table.get(h, set())
            run = set(s) if run is None else run & s
            if not run:
                break
        return probed


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs (the box is shared and noisy)."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def one_hash_events(n: int, sources: int = 100, batch: int = 64) -> list[KVEvent]:
    return [BlockStored(f"engine-{(i // batch) % sources}", GPU, NS, FP, (key(i),)) for i in range(n)]


def multi_hash_events(n_blocks: int, per_event: int = 16, sources: int = 100) -> list[KVEvent]:
    return [BlockStored(f"engine-{j % sources}", GPU, NS, FP, tuple(key(i) for i in range(s, s + per_event)))
            for j, s in enumerate(range(0, n_blocks, per_event))]  # fmt: skip


def bench_events(n: int) -> list[dict[str, object]]:
    out = []
    events = one_hash_events(n)
    t = timed(lambda: PrefixIndex().apply_many(events))
    tb = timed(lambda: NaiveIndex().apply_many(events))
    out.append(row("events_per_s", n, n / t, n / tb, "1 hash per event, batches of 64 per publisher"))
    multi = multi_hash_events(n)
    t = timed(lambda: PrefixIndex().apply_many(multi))
    tb = timed(lambda: NaiveIndex().apply_many(multi))
    out.append(row("blocks_per_s", n, n / t, n / tb, f"{len(multi)} events of 16 hashes"))
    batches = [encode_batch(events[i : i + 1000], seq=i) for i in range(0, n, 1000)]
    t = timed(lambda: _apply_wire_runs(PrefixIndex(), batches))
    tb = timed(lambda: _apply_wire(NaiveIndex(), batches))
    out.append(row("wire_events_per_s", n, n / t, n / tb, "decode_runs + apply_runs, 1,000 events per batch; "
                   "baseline: decode_batch + naive apply"))  # fmt: skip
    return out


def _apply_wire(index: NaiveIndex, batches: list[bytes]) -> None:
    for b in batches:
        index.apply_many(decode_batch(b).events)


def _apply_wire_runs(index: PrefixIndex, batches: list[bytes]) -> None:
    for b in batches:
        index.apply_runs(decode_runs(b).runs)


def build_world(
    n_blocks: int, n_engines: int, chain_len: int, seed: int = 7, idx: PrefixIndex | None = None
) -> tuple[PrefixIndex, NaiveIndex, list[PrefixHash], list[EngineLoad]]:
    """``n_blocks`` indexed blocks over ``n_engines`` engines plus one fabric node; the request chain's blocks
    are held by 20% of the engines at random depths and by the node (RAM for the first half, disk for all).
    Built into ``idx`` when given (an ``IndexService``'s own index)."""
    rng = random.Random(seed)
    idx = PrefixIndex() if idx is None else idx
    naive = NaiveIndex()
    chain = [key((1 << 200) + i) for i in range(chain_len)]
    holders = rng.sample(range(n_engines), max(1, n_engines // 5))
    related: list[KVEvent] = [BlockStored("fabric-0", RAM, NS, FP, tuple(chain[: chain_len // 2])),
                              BlockStored("fabric-0", DISK, NS, FP, tuple(chain))]  # fmt: skip
    for e in holders:
        depth = rng.randint(1, chain_len)
        related.append(BlockStored(f"engine-{e}", GPU, NS, FP, tuple(chain[:depth])))
    idx.apply_many(related)
    naive.apply_many(related)  # the naive baseline indexes only what the request touches (see module doc)
    filler = n_blocks - len(idx)
    per_event = 1024
    for start in range(0, filler, per_event):
        e = (start // per_event) % n_engines
        idx.apply(BlockStored(f"engine-{e}", GPU, NS, FP,
                              tuple(key(i) for i in range(start, min(start + per_event, filler)))))  # fmt: skip
    engines = [EngineLoad(f"engine-{i}", pending_prefill_tokens=rng.randint(0, 20_000)) for i in range(n_engines)]
    return idx, naive, chain, engines


def bench_lookups(n_blocks: int, n_engines: int, request_tokens: int, block_size: int) -> list[dict[str, object]]:
    chain_len = request_tokens // block_size
    cal = Calibration(prefill_tokens_per_s=10_000.0)
    service = IndexService(cal)
    t0 = time.perf_counter()
    idx, naive, chain, engines = build_world(n_blocks, n_engines, chain_len, idx=service.index)
    build_s = time.perf_counter() - t0
    size = f"{n_engines} engines, {len(idx):,} blocks, {chain_len}-block request"
    out = []

    ram, disk = idx.mask_of(media=[RAM]), idx.mask_of(media=[DISK])
    engine_mask = idx.mask_of(sources=[e.engine for e in engines])
    walks = 100
    probed = idx.walk(NS, FP, chain, [ram, disk], sources_mask=engine_mask).probed
    t = timed(lambda: [idx.walk(NS, FP, chain, [ram, disk], sources_mask=engine_mask) for _ in range(walks)])
    tb = timed(lambda: [naive.walk(chain) for _ in range(walks)])
    out.append(row("probes_per_s", size, walks * probed / t, walks * naive.walk(chain) / tb,
                   f"PrefixIndex.walk ({probed} hashes a walk) vs set intersection along the chain"))  # fmt: skip

    router = TTFTRouter(idx, cal)
    request = RouteRequest(NS, FP, chain, request_tokens, block_size)
    for e in engines:
        service.report_load(e)
    decision = router.route(request, engines)  # warm the tier-mask caches, as a long-running router would be
    assert (
        service.route(NS, FP, hashes=chain, num_tokens=request_tokens, block_size=block_size).local_blocks
        == decision.local_blocks
    )  # the same decision (ties may rotate to another engine of equal cost)
    # The two ways are timed alternately, so both see the same moments of a shared, noisy machine.
    samples, service_samples = _route_samples(
        lambda: router.route(request, engines),
        lambda: service.route(NS, FP, hashes=chain, num_tokens=request_tokens, block_size=block_size),
    )

    def naive_route() -> None:
        best = min(range(len(engines)), key=lambda j: engines[j].pending_prefill_tokens / cal.prefill_tokens_per_s
                   + (request_tokens - naive.depth(chain, (engines[j].engine, GPU)) * block_size)
                   / cal.prefill_tokens_per_s)  # fmt: skip
        assert best >= 0

    tb = timed(naive_route) * 1e3
    med = statistics.median(samples)
    out.append(row("route_ms", size, med, tb, f"median of {len(samples)} (p90 {_p90(samples):.3f} ms); "
                   f"baseline: per-engine depth scan of a dict-of-sets index, no fabric; index built in "
                   f"{build_s:.1f} s"))  # fmt: skip

    out.append(row("service_route_ms", size, statistics.median(service_samples), tb,
                   f"median of {len(service_samples)} (p90 {_p90(service_samples):.3f} ms); IndexService.route over "
                   f"registered engines; same baseline"))  # fmt: skip

    tokens = random.Random(3).choices(range(128_000), k=request_tokens)
    root = root_hash(FP, b"tenant salt")

    def chained() -> None:
        parent = root
        for i in range(chain_len):
            parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])

    assert prefix_hashes(root, tokens, block_size)[-1] == block_hash(
        prefix_hashes(root, tokens, block_size)[-2], tokens[(chain_len - 1) * block_size : chain_len * block_size]
    )
    out.append(row("chain_hash_ms", f"{request_tokens:,} tokens, {chain_len} blocks",
                   timed(lambda: prefix_hashes(root, tokens, block_size)) * 1e3, timed(chained) * 1e3,
                   "prefix_hashes over a list of ints vs block_hash per block"))  # fmt: skip
    return out


def _route_samples(*decide: Callable[[], object], n: int = 300) -> list[list[float]]:
    """``n`` timings in ms of each of ``decide``, taken in turn."""
    samples: list[list[float]] = [[] for _ in decide]
    for _ in range(n):
        for fn, out in zip(decide, samples, strict=True):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return samples


def _p90(samples: list[float]) -> float:
    return sorted(samples)[int(0.9 * len(samples))]


def row(metric: str, size: object, value: float, baseline: float, note: str) -> dict[str, object]:
    return {"metric": metric, "size": size, "against": "naive dict-of-sets index", "value": round(value, 4),
            "baseline": round(baseline, 4), "ratio": round(value / baseline, 3) if baseline else None,
            "note": note}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--blocks", type=int, default=10_000_000)
    p.add_argument("--engines", type=int, default=1000)
    p.add_argument("--request-tokens", type=int, default=32_768)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.blocks, args.engines = 50_000, 200_000, 100
    rows = bench_events(args.events) + bench_lookups(args.blocks, args.engines, args.request_tokens, args.block_size)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'metric':<18} {'value':>14} {'baseline':>14} {'ratio':>7}  size / note")
        for r in rows:
            print(f"{r['metric']:<18} {r['value']:>14,.3f} {r['baseline']:>14,.3f} {r['ratio']:>7}  "
                  f"{r['size']} / {r['note']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
