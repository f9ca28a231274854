"""Bounded work and resources per connection on the live server: request limits answered with an ERROR frame,
nothing large before HELLO, deadlines, connection limits, bytes-in-flight budgets, memory given back on close."""

from __future__ import annotations

import dataclasses
import gc
import socket
import threading
import time
import weakref

import numpy as np
import pytest

from kvfabric.client import Client
from kvfabric.errors import RemoteError
from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from kvfabric.transport import frames as fr
from kvfabric.transport.server import PRE_AUTH_CONTROL_BYTES
from tests.blocks import SPEC
from tests.transport.servers import held_bytes, thread_server
from tests.transport.wire import closed_by_peer, connect, hello, read_frame

WORDS = np.arange(8 * SPEC.block_size)


def kv(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SPEC.block_nbytes), dtype=np.uint8)


def test_get_of_one_hash_many_times_in_many_chunks_is_refused_at_parse_time(store: TieredStore) -> None:
    with thread_server(store, nixl=False) as srv, Client(srv.url, shm=False) as c:
        c.put(SPEC, WORDS, kv(8))
        h = c.block_hashes(SPEC, WORDS)[0]
        with connect(srv.port) as s:
            limits = hello(s).limits
            assert limits.max_reply_views == fr.MAX_REPLY_VIEWS
            started = time.monotonic()
            s.sendall(fr.encode_get(7, SPEC.fingerprint(), [h] * 1024, 16384))
            reply = read_frame(s)
            assert time.monotonic() - started < 5
            assert isinstance(reply, fr.Error) and reply.request_id == 7 and reply.code == "frame_too_large"
            assert "hashes x chunks" in reply.message and "max_reply_views" in reply.message
            s.sendall(fr.encode_stats(8))  # the connection carries on
            assert isinstance(read_frame(s), fr.StatsOk)
            # a batch over max_batch too, and a PUT over it has its payload skipped, not parsed as frames
            s.sendall(fr.encode_keys(9, "exists", SPEC.fingerprint(), [h] * (fr.MAX_BATCH + 1)))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.request_id == 9 and "max_batch" in reply.message
            item = fr.PutItem(h, fr.WireMeta(h, SPEC.dtype, (SPEC.block_nbytes // 2,), 16))
            s.sendall(fr.encode_put(10, SPEC.fingerprint(), [item] * (fr.MAX_BATCH + 1)))
            s.sendall(b"\x00" * SPEC.block_nbytes * (fr.MAX_BATCH + 1) + fr.encode_stats(11))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.request_id == 10
            assert isinstance(read_frame(s), fr.StatsOk)
        assert srv.sync(lambda: srv.server.counters.protocol_errors) == 0


def test_chunked_gets_are_split_by_the_client_within_the_advertised_view_limit(store: TieredStore) -> None:
    limits = fr.Limits(max_reply_views=16)
    with thread_server(store, nixl=False, limits=limits) as srv, Client(srv.url, shm=False) as c:
        data = kv(8, seed=2)
        c.put(SPEC, WORDS, data)
        assert c.session.limits.max_reply_views == 16
        seen: list[int] = []
        got = c.get_blocks(SPEC, c.block_hashes(SPEC, WORDS), chunks=4, on_chunk=seen.append)
        assert all(np.array_equal(g, d) for g, d in zip(got, data, strict=True))
        assert len(seen) == 8  # two GETs of 4 blocks x 4 chunks


def test_large_gets_run_off_the_event_loop_and_return_the_right_bytes(store: TieredStore, ram: MemoryTier) -> None:
    with thread_server(store, nixl=False) as srv, Client(srv.url, shm=False) as c:
        data = kv(8, seed=4)
        c.put(SPEC, WORDS, data)
        hashes = c.block_hashes(SPEC, WORDS) * 64  # 512 keys: above INLINE_KEYS
        got = c.get_blocks(SPEC, hashes, chunks=8)
        assert all(np.array_equal(g, data[i % 8]) for i, g in enumerate(got))
        assert c.get_blocks(SPEC, hashes[:1] * 2000)[1999] is not None  # many keys, one chunk
        with Client(srv.url, shm=True) as leased:  # LEASE of many keys: acquired in a thread too
            assert leased.transport == "shm"
            got = leased.get_blocks(SPEC, hashes)
            assert all(np.array_equal(g, data[i % 8]) for i, g in enumerate(got))
        time.sleep(0.2)
        assert srv.sync(lambda: held_bytes(ram)) == 0  # every lease of those replies was released


def test_nothing_large_is_allocated_before_hello(store: TieredStore) -> None:
    with thread_server(store, nixl=False) as srv:
        with connect(srv.port) as s:  # a header declaring a 4 MiB body: refused from the header alone
            s.sendall(fr.HEADER.pack(fr.MAGIC, 1, fr.OP_HELLO, 4 << 20, 1, 0))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.code == "frame_too_large"
            assert closed_by_peer(s)
        socks = [connect(srv.port) for _ in range(50)]
        try:
            for s in socks:  # partial HELLOs, each just under the pre-authentication body limit
                s.sendall(fr.HEADER.pack(fr.MAGIC, 1, fr.OP_HELLO, 8 << 10, 1, 0) + b"\x94" * 100)
            time.sleep(0.3)
            held = srv.sync(lambda: [c.receiver.buffered_bytes for c in srv.server._connections])
            assert len(held) == 50 and max(held) <= (8 << 10) + fr.HEADER_BYTES
        finally:
            for s in socks:
                s.close()
        assert PRE_AUTH_CONTROL_BYTES <= 4096


def test_handshake_frame_and_idle_deadlines(store: TieredStore) -> None:
    with thread_server(store, nixl=False, handshake_timeout_s=0.3, frame_timeout_s=0.3, idle_timeout_s=0.6) as srv:
        with connect(srv.port, timeout=5) as s:  # silent: no HELLO
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.code == "timeout" and "HELLO" in reply.message
            assert closed_by_peer(s)
        with connect(srv.port, timeout=5) as s:  # slow-loris: half a frame, then nothing
            hello(s)
            s.sendall(fr.encode_stats(2)[:10])
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.code == "timeout" and "no byte" in reply.message
        with connect(srv.port, timeout=5) as s:  # idle after HELLO
            hello(s)
            started = time.monotonic()
            assert closed_by_peer(s)
            assert time.monotonic() - started >= 0.5
        with Client(srv.url, shm=False) as c:  # a client that keeps talking is never dropped
            for _ in range(10):
                c.stats()
                time.sleep(0.1)
        assert srv.sync(lambda: srv.server.counters.timeouts) >= 3


def test_connection_limits_total_and_per_peer(store: TieredStore) -> None:
    with thread_server(store, nixl=False, max_connections_per_peer=3) as srv:
        socks = [connect(srv.port) for _ in range(3)]
        for s in socks:
            hello(s)
        with connect(srv.port, timeout=5) as extra:
            reply = read_frame(extra)
            assert isinstance(reply, fr.Error) and reply.code == "busy" and "127.0.0.1" in reply.message
        socks.pop().close()
        time.sleep(0.2)
        with connect(srv.port) as s:
            hello(s)
        for s in socks:
            s.close()
    with thread_server(store, nixl=False, max_connections=2) as srv:
        socks = [connect(srv.port) for _ in range(2)]
        with connect(srv.port, timeout=5) as extra:
            reply = read_frame(extra)
            assert isinstance(reply, fr.Error) and reply.code == "busy" and "limit of 2 connections" in reply.message
        for s in socks:
            s.close()


def test_puts_past_the_in_flight_budget_wait_then_complete(store: TieredStore) -> None:
    block = SPEC.block_nbytes
    limits = fr.Limits(max_payload_bytes=4 * block)
    with thread_server(store, nixl=False, limits=limits, max_inflight_bytes=4 * block) as srv:
        with Client(srv.url, shm=False) as c:
            c.register_model(SPEC)
            hashes = c.block_hashes(SPEC, WORDS)
        meta = fr.WireMeta(hashes[0], SPEC.dtype, SPEC.block_shape, SPEC.block_size)
        with connect(srv.port) as hog:  # holds the whole node-wide budget with a PUT whose payload stalls
            hello(hog)
            hog.sendall(fr.encode_put(2, SPEC.fingerprint(), [fr.PutItem(h, meta) for h in hashes[:4]]))
            hog.sendall(b"\x01" * block)
            time.sleep(0.2)
            assert srv.sync(lambda: srv.server.inflight.used) == 4 * block
            done = threading.Event()
            data = kv(1, seed=9)

            def put_one() -> None:
                with Client(srv.url, shm=False) as w:
                    assert w.put(SPEC, WORDS[: SPEC.block_size], data) == 1
                done.set()

            t = threading.Thread(target=put_one)
            t.start()
            assert not done.wait(0.5)  # waits for budget, is not refused
            assert srv.sync(lambda: srv.server.counters.put_waits) == 1
            hog.sendall(b"\x01" * 3 * block)
            reply = read_frame(hog)
            assert isinstance(reply, fr.Count) and reply.count == 4
            assert done.wait(10)
            t.join()
        assert srv.sync(lambda: srv.server.inflight.used) == 0


def test_a_put_over_one_connections_budget_is_refused_and_the_connection_goes_on(store: TieredStore) -> None:
    block = SPEC.block_nbytes
    with thread_server(store, nixl=False, max_inflight_bytes_per_connection=2 * block) as srv:
        with Client(srv.url, shm=False) as c:
            with pytest.raises(RemoteError, match="in-flight budget"):
                c.put(SPEC, WORDS[: 4 * SPEC.block_size], kv(4))
            assert c.put(SPEC, WORDS[: 2 * SPEC.block_size], kv(2)) == 2


def test_a_closed_connection_is_freed_without_the_cycle_collector(store: TieredStore) -> None:
    with thread_server(store, nixl=False) as srv:
        gc.collect()
        gc.disable()
        try:
            with Client(srv.url, shm=False) as c:
                c.put(SPEC, WORDS, kv(8))
                c.get_blocks(SPEC, c.block_hashes(SPEC, WORDS))
                refs = srv.sync(lambda: [weakref.ref(conn) for conn in srv.server._connections])
                assert refs
            deadline = time.monotonic() + 5
            while srv.sync(lambda: len(srv.server._connections)) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)
            assert all(r() is None for r in refs)
        finally:
            gc.enable()


def test_limits_for_the_socket_refusal_leave_other_clients_alone(store: TieredStore) -> None:
    with thread_server(store, nixl=False, max_connections_per_peer=2) as srv:
        with Client(srv.url, shm=False, pool_size=1) as c:
            c.put(SPEC, WORDS, kv(8))
            with socket.create_connection(("127.0.0.1", srv.port)) as extra:
                hello(extra)
                with connect(srv.port, timeout=5) as refused:
                    assert isinstance(read_frame(refused), fr.Error)
                assert c.lookup(SPEC, WORDS).blocks == 8


def test_model_registration_is_validated_and_bounded_per_tenant(store: TieredStore) -> None:
    with thread_server(store, nixl=False, max_models_per_tenant=3, tokens={"ta": "tenant-a", "tb": "tenant-b"}) as srv:
        with connect(srv.port) as s:
            hello(s, "ta")
            bad = {**SPEC.to_dict(), "model": ["not", "a", "name"]}
            s.sendall(fr.encode_register_model(2, bad))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.code == "invalid_block" and "must be a string" in reply.message
            s.sendall(fr.encode_register_model(3, {**SPEC.to_dict(), "model": "m" * 300}))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and "longer than" in reply.message
        with Client(srv.url, token="ta", shm=False) as a, Client(srv.url, token="tb", shm=False) as b:
            for i in range(3):
                a.register_model(dataclasses.replace(SPEC, model=f"m{i}"))
            with pytest.raises(RemoteError, match="limit") as exc:
                a.register_model(dataclasses.replace(SPEC, model="m3"))
            assert exc.value.code == "limit"
            b.register_model(dataclasses.replace(SPEC, model="m3"))  # the other tenant has its own allowance
        assert not any(s.model == "not" for s in store.models())


def test_a_client_reconnects_when_the_server_closed_its_idle_connection(store: TieredStore) -> None:
    with (
        thread_server(store, nixl=False, idle_timeout_s=0.3) as srv,
        Client(srv.url, shm=False, pool_size=1, retries=0) as c,
    ):
        assert c.put(SPEC, WORDS[: SPEC.block_size], kv(1)) == 1
        time.sleep(1.0)  # the server drops the pooled connection
        assert srv.sync(lambda: len(srv.server._connections)) == 0
        assert c.put(SPEC, WORDS[SPEC.block_size : 2 * SPEC.block_size], kv(1)) == 1  # no failed first attempt
