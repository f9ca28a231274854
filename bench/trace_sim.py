"""Trace-driven simulation: replay a Mooncake trace through N engines, an optional fabric pool and a router.

    python bench/trace_sim.py --engines 1 --capacity-tokens 1e7 --eviction lru --json
    python bench/trace_sim.py --curve                      # hit rate vs capacity, 1e4 .. 1e9 tokens, one engine
    python bench/trace_sim.py --engines 10 --capacity-tokens 3e6 --router overlap
    python bench/trace_sim.py --engines 10 --capacity-tokens 3e6 --router kvfabric \\
        --fabric-ram-tokens 1e7 --fabric-disk-tokens 3e7 --fabric-object-tokens unlimited
    python bench/trace_sim.py --compare                    # the router table of bench/RESULTS.md

The trace defaults to ``../shared/traces/mooncake/conversation_trace.jsonl`` beside the repo, else
``$KVFABRIC_TRACES/mooncake/conversation_trace.jsonl``; ``--trace`` names any Mooncake-format JSONL file.
With ``--json`` a single run prints one JSON object (``hit_rate``, ``token_hit_rate``, ``prefill_tokens``,
``max_mean_load``, ... and the common ``metric/size/against/value/baseline/ratio`` keys, where the baseline is the
unlimited-cache hit rate); ``--curve`` and ``--compare`` print one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sim.cache import EVICTION_POLICIES
from bench.sim.cluster import SimConfig, SimResult, simulate, unlimited_hit_rate
from bench.sim.fabric import FabricTier
from bench.sim.trace import MOONCAKE_BLOCK_TOKENS, TraceRequest, default_trace_path, load_trace
from kvfabric.ids import TierId
from kvfabric.index.router import POLICIES

CURVE = (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9)


def capacity(text: str) -> float | None:
    """Tokens as a float (``3e6``), or ``unlimited``/``inf`` for no limit."""
    if text.lower() in ("unlimited", "inf", "none"):
        return None
    value = float(text)
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"capacity must be >= 0 tokens, got {text}")
    return None if math.isinf(value) else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, help="Mooncake JSONL trace (default: the shared conversation trace)")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--capacity-tokens", type=capacity, default=1e7, help="KV capacity per engine ('unlimited' ok)")
    p.add_argument("--eviction", choices=EVICTION_POLICIES, default="lru")
    p.add_argument("--router", choices=POLICIES, default="kvfabric")
    p.add_argument("--fabric-ram-tokens", type=capacity, default=0.0, help="fabric RAM tier capacity (0 = none)")
    p.add_argument("--fabric-disk-tokens", type=capacity, default=0.0, help="fabric disk tier capacity (0 = none)")
    p.add_argument("--fabric-object-tokens", type=capacity, default=0.0, help="fabric S3 tier capacity (0 = none)")
    p.add_argument("--ram-gbps", type=float, default=20.0, help="GB/s an engine loads from fabric RAM")
    p.add_argument("--disk-gbps", type=float, default=5.0, help="GB/s an engine loads from fabric disk")
    p.add_argument("--object-gbps", type=float, default=1.0, help="GB/s an engine loads from S3")
    p.add_argument("--prefill-tps", type=float, default=8000.0, help="prefill tokens/s of one engine")
    p.add_argument("--decode-tps", type=float, default=40.0, help="output tokens/s of one request")
    p.add_argument("--kv-bytes-per-token", type=int, default=131_072, help="KV bytes per token (Llama-3-8B bf16)")
    p.add_argument("--overlap-weight", type=float, default=1.0, help="Dynamo overlap weight (router 'overlap')")
    p.add_argument("--curve", action="store_true", help="one engine, capacities 1e4..1e9 tokens")
    p.add_argument("--compare", action="store_true", help="the routers table: 10 engines of 3e6 tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def fabric_tiers(args: argparse.Namespace) -> tuple[FabricTier, ...]:
    tiers = []
    for medium, cap, gbps in (
        ("ram", args.fabric_ram_tokens, args.ram_gbps),
        ("disk", args.fabric_disk_tokens, args.disk_gbps),
        ("object", args.fabric_object_tokens, args.object_gbps),
    ):
        if cap is None or cap > 0:
            blocks = None if cap is None else int(cap // MOONCAKE_BLOCK_TOKENS)
            tiers.append(FabricTier(TierId(medium), blocks, gbps * 1e9))
    return tuple(tiers)


def config_from(args: argparse.Namespace, **overrides: object) -> SimConfig:
    base = {
        "engines": args.engines,
        "capacity_tokens": args.capacity_tokens,
        "eviction": args.eviction,
        "router": args.router,
        "fabric": fabric_tiers(args),
        "prefill_tokens_per_s": args.prefill_tps,
        "decode_tokens_per_s": args.decode_tps,
        "kv_bytes_per_token": args.kv_bytes_per_token,
        "overlap_weight": args.overlap_weight,
    }
    base.update(overrides)
    return SimConfig(**base)  # type: ignore[arg-type]


def _tokens(blocks: int | None, block_tokens: int) -> int | None:
    return None if blocks is None else blocks * block_tokens


def record(label: str, cfg: SimConfig, res: SimResult, ceiling: float) -> dict[str, object]:
    """The JSON object of one run: the common bench keys, then the simulator's figures."""
    out: dict[str, object] = {
        "metric": "hit_rate",
        "size": cfg.capacity_tokens if cfg.capacity_tokens is not None else "unlimited",
        "against": "unlimited_cache",
        "value": round(res.hit_rate, 6),
        "baseline": round(ceiling, 6),
        "ratio": round(res.hit_rate / ceiling, 4) if ceiling else None,
        "label": label,
        "engines": cfg.engines,
        "capacity_tokens": cfg.capacity_tokens,
        "eviction": cfg.eviction,
        "router": cfg.router,
        "fabric": {t.medium: _tokens(t.capacity_blocks, cfg.block_tokens) for t in cfg.fabric},
        "unlimited_hit_rate": round(ceiling, 6),
    }
    out.update(res.summary())
    return out


TABLE_COLS = ("label", "hit_rate", "local_hit_rate", "fabric_hit_rate", "token_hit_rate", "mean_request_hit_rate",
              "prefill_tokens", "max_mean_load", "ttft_mean_s", "ttft_p99_s", "wall_s")  # fmt: skip


def print_table(rows: list[dict[str, object]]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in TABLE_COLS]
    print("  ".join(c.ljust(w) for c, w in zip(TABLE_COLS, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(TABLE_COLS, widths, strict=True)))


def compare_runs(args: argparse.Namespace) -> list[tuple[str, SimConfig]]:
    """The router comparison: 10 engines of 3e6 tokens each; with a pool of RAM 1e7 + disk 3e7 + S3 unlimited
    tokens (the trace's distinct blocks are 9.4e7 tokens, so S3 holds what the faster tiers cannot)."""
    ram = FabricTier(TierId("ram"), int(1e7 // MOONCAKE_BLOCK_TOKENS), args.ram_gbps * 1e9)
    disk = FabricTier(TierId("disk"), int(3e7 // MOONCAKE_BLOCK_TOKENS), args.disk_gbps * 1e9)
    s3 = FabricTier(TierId("object"), None, args.object_gbps * 1e9)
    pool = (ram, disk, s3)
    base = {"engines": 10, "capacity_tokens": 3e6, "fabric": ()}
    runs = [(name, config_from(args, router=name, **base)) for name in ("round-robin", "least-loaded", "overlap")]
    runs.append(("kvfabric (no fabric)", config_from(args, router="kvfabric", **base)))
    runs.append(("kvfabric + fabric", config_from(args, router="kvfabric", **{**base, "fabric": pool})))
    runs.append(("kvfabric + RAM/disk only", config_from(args, router="kvfabric", **{**base, "fabric": (ram, disk)})))
    for name in ("round-robin", "least-loaded", "overlap"):
        runs.append((f"{name} + fabric", config_from(args, router=name, **{**base, "fabric": pool})))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.trace or default_trace_path(REPO)
    if path is None or not Path(path).is_file():
        print(
            f"trace not found: {path or '../shared/traces/mooncake/conversation_trace.jsonl'}; pass --trace FILE or "
            "set KVFABRIC_TRACES to the folder holding mooncake/conversation_trace.jsonl",
            file=sys.stderr,
        )
        return 2
    trace: list[TraceRequest] = load_trace(Path(path), args.limit)
    ceiling = unlimited_hit_rate(trace)

    if args.curve:
        runs = [(f"capacity {c:.0e}", config_from(args, engines=1, capacity_tokens=c)) for c in CURVE]
        runs.append(("unlimited", config_from(args, engines=1, capacity_tokens=None)))
    elif args.compare:
        runs = compare_runs(args)
    else:
        runs = [(args.router, config_from(args))]

    rows = []
    for label, cfg in runs:
        row = record(label, cfg, simulate(trace, cfg), ceiling)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"trace {path}: {len(trace)} requests, unlimited-cache hit rate {ceiling:.4f}")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
