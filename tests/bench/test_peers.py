"""The peer-measurement harness: figures, rounds, process handling; and, where ``.bench-venv/`` is installed, each
peer end to end on small blocks. The peers are bench-only: without the virtualenv those tests skip."""

from __future__ import annotations

import shutil
import sys

import pytest

from bench.peers import lmcache_peer, mooncake_peer, processes, redis_peer
from bench.peers.result import (
    GIB,
    PeerUnavailableError,
    measurement_from_dict,
    measurement_from_times,
)
from bench.peers.rounds import PeerOps, run_rounds, source_blocks


def test_figures_are_median_gibps_of_the_bytes_each_round_moved() -> None:
    m = measurement_from_times("p", size=GIB // 4, count=4, put_seconds=[2.0, 0.5, 1.0], get_seconds=[1.0, 4.0, 2.0],
                               verified=True, api="a", server="s")
    assert m.put_gibps_samples == (0.5, 2.0, 1.0)
    assert m.put_gibps == 1.0
    assert m.get_gibps == 0.5
    assert m.rounds == 3
    assert measurement_from_dict(m.to_dict()) == m


def test_figures_need_one_put_and_one_get_time_per_round() -> None:
    with pytest.raises(ValueError, match="one put and one get"):
        measurement_from_times("p", 1, 1, [1.0, 2.0], [1.0], True, "a", "s")


def test_rounds_exclude_the_warm_up_and_carry_a_failed_check() -> None:
    store: dict[int, bytes] = {}
    fetched: list[bytes] = []
    source = source_blocks(size=8, count=3)
    checks = iter([True, True, False])  # the second timed round's check fails

    ops = PeerOps(
        put_all=lambda: store.update({i: source[i * 8:(i + 1) * 8].tobytes() for i in range(3)}),
        get_all=lambda: fetched.extend(store[i] for i in range(3)),
        verify=lambda: next(checks) and b"".join(fetched) == source.tobytes(),
        clear=lambda: (fetched.clear(), store.clear()),
    )
    times = run_rounds(ops, rounds=2)
    assert len(times.put_seconds) == len(times.get_seconds) == 2
    assert times.verified is False


def test_source_blocks_are_the_same_bytes_for_every_peer() -> None:
    assert source_blocks(1024, 4).tobytes() == source_blocks(1024, 4).tobytes()
    assert source_blocks(1024, 4).nbytes == 4096


@pytest.mark.parametrize("peer", [redis_peer, mooncake_peer, lmcache_peer], ids=lambda m: m.PEER)
def test_an_empty_request_is_refused_before_anything_starts(peer) -> None:
    with pytest.raises(ValueError, match="count must be at least 1"):
        peer.measure(size=1 << 20, count=0)


def test_lmcache_chunk_shape_holds_exactly_one_block() -> None:
    layers, kv, tokens, heads, head_dim = lmcache_peer.chunk_shape(1 << 20)
    assert layers * kv * tokens * heads * head_dim == 1 << 20
    with pytest.raises(ValueError, match="multiple of 512"):
        lmcache_peer.chunk_shape(1000)


def test_missing_virtualenv_names_the_install_step(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(processes, "BENCH_VENV", tmp_path / "absent")
    with pytest.raises(PeerUnavailableError, match="bench/peers/install.sh"):
        processes.bench_executable("mooncake", "mooncake_master")


def test_a_server_that_exits_early_is_reported_with_its_log(tmp_path) -> None:
    server = processes.ServerProcess(
        "p", "early-exit", [sys.executable, "-c", "import sys; print('no segment', flush=True); sys.exit(3)"], tmp_path)
    try:
        with pytest.raises(PeerUnavailableError, match=r"(?s)exited with code 3.*no segment"):
            server.wait_for_port(processes.free_port(), timeout_s=30)
    finally:
        server.stop()


needs_venv = pytest.mark.skipif(not (processes.BENCH_VENV / "bin" / "python").exists(),
                                reason="peers not installed (bash bench/peers/install.sh)")


@pytest.mark.slow
@needs_venv
@pytest.mark.parametrize("peer", [redis_peer, mooncake_peer, lmcache_peer], ids=lambda m: m.PEER)
def test_peer_moves_and_verifies_blocks_across_processes(peer) -> None:
    if peer is redis_peer and shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    m = peer.measure(size=64 * 1024, count=4, rounds=1)
    assert m.verified
    assert (m.peer, m.size, m.count, m.rounds) == (peer.PEER, 64 * 1024, 4, 1)
    assert m.put_gibps > 0 and m.get_gibps > 0
