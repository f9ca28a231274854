from __future__ import annotations

import pytest

from kvfabric.errors import ConfigError
from kvfabric.events import BlockStored
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.prefix_index import PrefixIndex
from kvfabric.index.router import (
    Calibration,
    EngineLoad,
    EngineTable,
    RouteRequest,
    TierSpeed,
    make_policy,
)  # fmt: skip

NS = Namespace("tenant-a")
FP = ModelFingerprint(b"\x11" * 32)
BS = 16
CHAIN = [PrefixHash(i.to_bytes(32, "big")) for i in range(1, 65)]
REQ = RouteRequest(NS, FP, CHAIN, len(CHAIN) * BS + 7, BS)
# 1 KiB per token, so a 16-token block is 16 KiB; prefill 1,000 tokens/s -> a block costs 16 ms to recompute
CAL = Calibration(prefill_tokens_per_s=1000.0, kv_bytes_per_token=1024,
                  tiers=(TierSpeed(TierId("ram"), 16e6), TierSpeed(TierId("object"), 0.5e6)))  # fmt: skip


def store(idx: PrefixIndex, source: str, medium: str, lo: int, hi: int) -> None:
    idx.apply(BlockStored(source, TierId(medium), NS, FP, tuple(CHAIN[lo:hi])))


def engines(*pending: int) -> list[EngineLoad]:
    return [EngineLoad(f"e{i}", p) for i, p in enumerate(pending)]


def test_ttft_prefers_the_engine_holding_the_prefix() -> None:
    idx = PrefixIndex()
    store(idx, "e1", "gpu", 0, 40)
    store(idx, "e2", "gpu", 0, 10)
    d = make_policy("kvfabric", idx, CAL).route(REQ, engines(0, 0, 0))
    assert (d.engine, d.local_blocks, d.fabric_blocks) == ("e1", 40, 0)
    assert d.prefill_tokens == 24 * BS + 7
    assert d.predicted_ttft_s == pytest.approx((24 * BS + 7) / 1000.0)


def test_queueing_outweighs_a_prefix_when_the_queue_is_long() -> None:
    idx = PrefixIndex()
    store(idx, "e1", "gpu", 0, 40)  # saves 640 tokens = 0.64 s of prefill
    assert make_policy("kvfabric", idx, CAL).route(REQ, engines(0, 500, 0)).engine == "e1"
    assert make_policy("kvfabric", idx, CAL).route(REQ, engines(0, 800, 0)).engine != "e1"


def test_fabric_blocks_are_loaded_at_tier_bandwidth() -> None:
    idx = PrefixIndex()
    store(idx, "e1", "gpu", 0, 8)
    store(idx, "node", "ram", 0, 30)
    d = make_policy("kvfabric", idx, CAL).route(REQ, engines(0, 0))
    assert (d.engine, d.local_blocks, d.fabric_blocks, d.fabric_tiers) == ("e1", 8, 22, ((TierId("ram"), 22),))
    load_s = 22 * BS * 1024 / 16e6
    assert d.predicted_ttft_s == pytest.approx(load_s + (REQ.num_tokens - 30 * BS) / 1000.0)
    # the busy engine with the local prefix loses to an idle one that can load the whole prefix
    d2 = make_policy("kvfabric", idx, CAL).route(REQ, [EngineLoad("e1", 2000), EngineLoad("e9")])
    assert (d2.engine, d2.local_blocks, d2.fabric_blocks) == ("e9", 0, 30)


def test_a_tier_slower_than_recompute_is_not_used_and_no_fabric_means_local_only() -> None:
    idx = PrefixIndex()
    store(idx, "node", "object", 0, 30)  # 16 KiB at 0.5 MB/s = 33 ms per block > 16 ms to recompute
    d = make_policy("kvfabric", idx, CAL).route(REQ, engines(0))
    assert d.fabric_blocks == 0
    store(idx, "node", "ram", 0, 30)
    assert make_policy("kvfabric", idx, CAL).route(REQ, engines(0)).fabric_blocks == 30
    assert make_policy("kvfabric", idx, CAL, use_fabric=False).route(REQ, engines(0)).fabric_blocks == 0


def test_overlap_router_is_dynamos_cost() -> None:
    idx = PrefixIndex()
    store(idx, "e0", "gpu", 0, 32)
    loads = [EngineLoad("e0", 0, active_decode_blocks=30), EngineLoad("e1", 0, active_decode_blocks=0)]
    # e0: 1 * (1031 - 512) / 16 + 30 + 65 = 127.4 ; e1: 1031 / 16 + 0 + 65 = 129.4
    assert make_policy("overlap", idx, CAL).route(REQ, loads).engine == "e0"
    # with a low overlap weight the decode load dominates
    assert make_policy("overlap", idx, CAL, overlap_weight=0.5).route(REQ, loads).engine == "e1"


def test_baselines_ignore_the_cache() -> None:
    idx = PrefixIndex()
    store(idx, "e2", "gpu", 0, 64)
    assert make_policy("least-loaded", idx, CAL).route(REQ, engines(30, 10, 20)).engine == "e1"
    rr = make_policy("round-robin", idx, CAL)
    assert [rr.route(REQ, engines(0, 0, 0)).engine for _ in range(4)] == ["e0", "e1", "e2", "e0"]


def test_ties_rotate_so_idle_engines_share_new_prefixes() -> None:
    router = make_policy("kvfabric", PrefixIndex(), CAL)
    picks = [router.route(REQ, engines(0, 0, 0, 0)).engine for _ in range(8)]
    assert sorted(set(picks)) == ["e0", "e1", "e2", "e3"]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown routing policy"):
        make_policy("random", PrefixIndex())
    with pytest.raises(ValueError, match="no engines"):
        make_policy("kvfabric", PrefixIndex()).route(REQ, [])
    with pytest.raises(ValueError, match="exceed"):
        RouteRequest(NS, FP, CHAIN, 10, BS)
    with pytest.raises(ConfigError, match="prefill_tokens_per_s"):
        Calibration(prefill_tokens_per_s=0)


def test_calibration_from_config_mapping() -> None:
    cal = Calibration.from_mapping({"prefill_tokens_per_s": 5000, "tiers": {"ram": 1e10, "disk": 2e9}})
    assert cal.prefill_tokens_per_s == 5000
    assert cal.tiers == (TierSpeed(TierId("ram"), 1e10), TierSpeed(TierId("disk"), 2e9))
    with pytest.raises(ConfigError, match="unknown calibration keys"):
        Calibration.from_mapping({"prefill": 1})


def test_an_engine_table_updated_in_place_routes_like_the_load_list() -> None:
    idx = PrefixIndex()
    store(idx, "e1", "gpu", 0, 40)
    store(idx, "node", "ram", 0, 64)
    loads = engines(0, 900, 0)
    table = EngineTable(loads)
    for policy in ("kvfabric", "overlap", "least-loaded"):
        a, b = make_policy(policy, idx, CAL), make_policy(policy, idx, CAL)
        assert a.route(REQ, loads) == b.route(REQ, table)
    assert make_policy("kvfabric", idx, CAL).route(REQ, table).engine != "e1"  # e1 queues 0.9 s
    assert table.update(EngineLoad("e1", 0, prefill_tokens_per_s=2000.0))
    assert (table.pending[1], table.rate[1]) == (0.0, 2000.0) and table[1].prefill_tokens_per_s == 2000.0
    assert make_policy("kvfabric", idx, CAL).route(REQ, table).engine == "e1"
    assert not table.update(EngineLoad("e7", 5)) and len(table) == 3  # membership is fixed
    with pytest.raises(ValueError, match="'e0' is listed twice"):
        EngineTable([EngineLoad("e0"), EngineLoad("e1"), EngineLoad("e0")])


def test_the_model_block_bytes_price_the_fabric_load() -> None:
    idx = PrefixIndex()
    store(idx, "node", "ram", 0, 64)
    d = make_policy("kvfabric", idx, CAL).route(REQ, engines(0))
    assert d.predicted_ttft_s == pytest.approx(64 * BS * 1024 / 16e6 + 7 / 1000.0)
    # blocks 4x larger: 64 KiB at 16 MB/s = 4 ms each, still under the 16 ms recompute
    big = RouteRequest(NS, FP, CHAIN, REQ.num_tokens, BS, block_bytes=4 * BS * 1024)
    d = make_policy("kvfabric", idx, CAL).route(big, engines(0))
    assert d.fabric_blocks == 64 and d.predicted_ttft_s == pytest.approx(64 * 4 * BS * 1024 / 16e6 + 7 / 1000.0)
