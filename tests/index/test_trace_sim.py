"""The trace simulator against an independent replay, on a generated trace and (when present) the real one."""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from pathlib import Path

import pytest

from bench.sim.cluster import SimConfig, simulate, unlimited_hit_rate
from bench.sim.fabric import FabricTier
from bench.sim.trace import TraceRequest, default_trace_path, load_trace
from bench.trace_sim import main
from kvfabric.ids import TierId

REPO = Path(__file__).resolve().parents[2]


def write_trace(path: Path, n: int = 600, seed: int = 1) -> Path:
    """Multi-turn sessions: each turn extends its session's prefix, with a shared system prompt block."""
    rng = random.Random(seed)
    next_id = 1
    sessions: list[list[int]] = []
    lines = []
    for i in range(n):
        if sessions and rng.random() < 0.6:
            s = rng.choice(sessions)
        else:
            s = [0]
            sessions.append(s)
        grow = rng.randint(1, 6)
        s.extend(range(next_id, next_id + grow))
        next_id += grow
        ids = list(s)
        lines.append(json.dumps({"timestamp": i * 50, "input_length": len(ids) * 512 - rng.randint(0, 511),
                                 "output_length": rng.randint(1, 300), "hash_ids": ids}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_lru(trace: list[TraceRequest], capacity_blocks: int) -> float:
    """A plain LRU prefix-hit replay, written independently of the simulator."""
    cache: OrderedDict[bytes, None] = OrderedDict()
    hit = total = 0
    for req in trace:
        total += len(req.chain)
        k = 0
        while k < len(req.chain) and req.chain[k] in cache:
            k += 1
        hit += k
        for h in req.chain:
            cache[h] = None
            cache.move_to_end(h)
            while len(cache) > capacity_blocks:
                cache.popitem(last=False)
    return hit / total


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> list[TraceRequest]:
    return load_trace(write_trace(tmp_path_factory.mktemp("trace") / "t.jsonl"))


@pytest.mark.parametrize("capacity_blocks", [5, 40, 200, 1000])
def test_single_engine_lru_matches_an_independent_replay(trace: list[TraceRequest], capacity_blocks: int) -> None:
    res = simulate(trace, SimConfig(engines=1, capacity_tokens=capacity_blocks * 512))
    assert res.hit_rate == pytest.approx(reference_lru(trace, capacity_blocks), abs=1e-12)
    assert res.prefill_tokens == res.input_tokens - res.hit_tokens


def test_unlimited_capacity_reaches_the_ceiling(trace: list[TraceRequest]) -> None:
    res = simulate(trace, SimConfig(engines=1, capacity_tokens=None))
    assert res.hit_rate == pytest.approx(unlimited_hit_rate(trace))
    assert res.fabric_hit_blocks == 0


@pytest.mark.parametrize("router", ["round-robin", "least-loaded", "overlap", "kvfabric"])
def test_a_fabric_that_holds_everything_serves_every_repeat(trace: list[TraceRequest], router: str) -> None:
    fabric = (FabricTier(TierId("ram"), 30, 20e9), FabricTier(TierId("disk"), 60, 5e9),
              FabricTier(TierId("object"), None, 1e9))  # fmt: skip
    res = simulate(trace, SimConfig(engines=4, capacity_tokens=20 * 512, router=router, fabric=fabric))
    assert res.hit_rate == pytest.approx(unlimited_hit_rate(trace))
    assert res.local_hit_blocks + res.fabric_hit_blocks == res.hit_blocks
    assert set(res.fabric_tier_blocks) == {"ram", "disk", "object"} and res.fabric_hit_blocks > 0


def test_without_a_fabric_the_kv_router_beats_round_robin(trace: list[TraceRequest]) -> None:
    cfg = {"engines": 4, "capacity_tokens": 60 * 512}
    rr = simulate(trace, SimConfig(router="round-robin", **cfg))  # type: ignore[arg-type]
    kv = simulate(trace, SimConfig(router="kvfabric", **cfg))  # type: ignore[arg-type]
    assert kv.hit_rate > rr.hit_rate
    assert sum(kv.engine_requests) == len(trace)


def test_cli_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_trace(tmp_path / "t.jsonl", n=100)
    assert main(["--trace", str(path), "--engines", "1", "--capacity-tokens", "1e5", "--eviction", "lru",
                 "--json"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    for key in ("hit_rate", "token_hit_rate", "prefill_tokens", "max_mean_load", "metric", "value", "baseline",
                "ratio"):  # fmt: skip
        assert key in row
    assert main(["--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "trace not found" in capsys.readouterr().err


def test_malformed_trace_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_trace(path)


REAL = default_trace_path(REPO) or (
    Path(os.environ["KVFABRIC_TRACES"]) / "mooncake" / "conversation_trace.jsonl"
    if os.environ.get("KVFABRIC_TRACES") else None
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(REAL is None or not REAL.is_file(), reason="Mooncake conversation trace not found "
                    "(../shared/traces or $KVFABRIC_TRACES)")  # fmt: skip
def test_real_trace_reproduces_known_lru_hit_rates_and_the_router_target() -> None:
    assert REAL is not None
    real = load_trace(REAL)
    assert sum(len(r.chain) for r in real) == 288_500
    assert unlimited_hit_rate(real) == pytest.approx(0.366, abs=0.001)
    assert simulate(real, SimConfig(capacity_tokens=1e7)).hit_rate == pytest.approx(0.285, abs=0.003)
    assert simulate(real, SimConfig(capacity_tokens=3e6)).hit_rate == pytest.approx(0.136, abs=0.003)
    pool = (FabricTier(TierId("ram"), int(1e7 // 512), 20e9), FabricTier(TierId("disk"), int(3e7 // 512), 5e9),
            FabricTier(TierId("object"), None, 1e9))  # fmt: skip
    res = simulate(real, SimConfig(engines=10, capacity_tokens=3e6, router="kvfabric", fabric=pool))
    assert res.hit_rate >= 0.95 * unlimited_hit_rate(real)
    assert res.max_mean_load <= 1.25
