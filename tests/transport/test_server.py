"""The live server: fuzzed connections, shared-memory lease lifetimes, crashed clients, TLS, NIXL and fallbacks."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfabric.client import Client
from kvfabric.client.sync_conn import SyncConnection
from kvfabric.errors import ClientError
from kvfabric.ids import TierId
from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from kvfabric.transport import frames as fr
from kvfabric.transport import nixl as nixl_transport
from tests.blocks import SPEC
from tests.transport.servers import (
    ROOT, ThreadServer, child_env, held_bytes, open_store, process_server, thread_server,
)  # fmt: skip

TOKENS = np.arange(4 * SPEC.block_size)


def kv(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SPEC.block_nbytes), dtype=np.uint8)


def rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


valid = [
    fr.encode_hello(1, None, {}, []),
    fr.encode_stats(2),
    fr.encode_get(3, SPEC.fingerprint(), [bytes(32)]),
    fr.encode_put(4, SPEC.fingerprint(), [fr.PutItem(bytes(32), fr.WireMeta(bytes(32), SPEC.dtype, (4,), 1))]),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(st.sampled_from(valid) | st.binary(max_size=64), min_size=1, max_size=6),
    cut=st.integers(0, 200),
    flip=st.integers(0, 400),
)
def test_fuzzed_connections_never_hurt_other_clients(server: ThreadServer, parts, cut, flip) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(b"".join(parts))
    if flip < len(data):
        data[flip] ^= 0x5A
    data = data[: len(data) - cut % (len(data) + 1)]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(2)
        try:
            while s.recv(65536):
                pass
        except TimeoutError:
            pass  # a truncated frame: the server waits for the rest, which is fine


def test_server_survives_fuzzing_and_keeps_serving(server: ThreadServer, ram: MemoryTier) -> None:
    with Client(server.url, shm=False) as c:
        c.put(SPEC, TOKENS, kv(4))
        before = rss_kib()
        for i in range(300):
            junk = np.random.default_rng(i).integers(0, 256, size=200, dtype=np.uint8).tobytes()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                bad = valid[0][: i % 40] + junk if i % 2 else fr.HEADER.pack(fr.MAGIC, 1, fr.OP_PUT, 10, 1, 1 << 40)
                s.sendall(bad)
            if i % 50 == 0:
                assert np.array_equal(np.stack(c.get_blocks(SPEC, c.block_hashes(SPEC, TOKENS))), kv(4))
        deadline = time.monotonic() + 10
        while server.sync(lambda: len(server.server._connections)) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.sync(lambda: len(server.server._connections)) == 1  # only the good client is left
        assert rss_kib() - before < 32 * 1024  # the 1 TiB payload claim was refused, not allocated
        assert held_bytes(ram) == 0
        assert server.server.counters.protocol_errors > 0


def test_oversized_and_invalid_requests_get_per_request_errors(server: ThreadServer) -> None:
    with Client(server.url, shm=False) as c:
        c.register_model(SPEC)
        conn = SyncConnection(c.endpoint, c.options)
        too_many = [bytes(32)] * (fr.MAX_BATCH + 1)
        reply = conn.request(fr.encode_keys(conn.next_id(), "exists", SPEC.fingerprint(), too_many))
        assert isinstance(reply, fr.Error) and reply.code == "frame_too_large"  # header-level: connection closed
        conn.close()
        conn = SyncConnection(c.endpoint, c.options)
        bad_dtype = fr.PutItem(bytes(32), fr.WireMeta(bytes(32), fr.DType.FLOAT32, (4,), 1))
        reply = conn.request(fr.encode_put(conn.next_id(), SPEC.fingerprint(), [bad_dtype]), [memoryview(bytes(16))])
        assert isinstance(reply, fr.Error) and reply.code == "invalid_block"
        unknown = fr.encode_get(conn.next_id(), bytes(32), [bytes(32)])
        assert isinstance(conn.request(unknown), fr.Blocks)  # the connection carries on after a request error
        conn.close()


def test_shm_lease_keeps_block_until_released(server: ThreadServer, ram: MemoryTier) -> None:
    with Client(server.url) as c:
        assert c.transport == "shm"
        c.put(SPEC, TOKENS, kv(4))
        hashes = c.block_hashes(SPEC, TOKENS)
        conn = SyncConnection(c.endpoint, c.options)
        leases = conn.request(fr.encode_lease(conn.next_id(), SPEC.fingerprint(), hashes))
        assert isinstance(leases, fr.Leases) and all(isinstance(e, fr.Lease) for e in leases.entries)
        arena = c._leased.arena  # type: ignore[union-attr]
        first = leases.entries[0]
        assert bytes(arena.view(first.offset, first.meta.nbytes)) == kv(4)[0].tobytes()
        # delete and overwrite with other data while the lease is held: the leased bytes stay put
        assert c.delete(SPEC, hashes) == 4
        other = np.arange(64, 64 + 4 * SPEC.block_size)
        c.put(SPEC, other, kv(4, seed=9))
        for i in range(40):
            c.put(SPEC, np.arange(1000 + i * 64, 1000 + (i + 1) * 64), kv(4, seed=i + 10))
        assert held_bytes(ram) >= 4 * SPEC.block_nbytes
        assert bytes(arena.view(first.offset, first.meta.nbytes)) == kv(4)[0].tobytes()
        conn.send_oneway(fr.encode_release(conn.next_id(), [e.lease_id for e in leases.entries]))
        conn.request(fr.encode_stats(conn.next_id()))  # the release was handled before this reply
        assert held_bytes(ram) == 0
        conn.close()


def test_blocks_below_ram_are_promoted_and_served_over_tcp_and_shm(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        with thread_server(store, nixl=False) as srv, Client(srv.url, shm=False) as tcp, Client(srv.url) as local:
            assert tcp.put(SPEC, TOKENS, kv(4)) == 4
            hashes = tcp.block_hashes(SPEC, TOKENS)
            srv.sync(lambda: store.evict(TierId("ram"), 1 << 62))
            assert tcp.lookup(SPEC, TOKENS).tiers == ("disk",) * 4
            assert np.array_equal(np.stack(tcp.get_blocks(SPEC, hashes[:2])), kv(4)[:2])
            assert local.transport == "shm"
            assert np.array_equal(np.stack(local.get_blocks(SPEC, hashes[2:])), kv(4)[2:])
            assert tcp.lookup(SPEC, TOKENS).tiers == ("ram",) * 4  # promoted by the reads
            assert tcp.get_blocks(SPEC, [bytes(32)]) == [None]
            srv.sync(lambda: store.evict(TierId("ram"), 1 << 62))
            conn = SyncConnection(local.endpoint, local.options)
            leases = conn.request(fr.encode_lease(conn.next_id(), SPEC.fingerprint(), [*hashes, bytes(32)]))
            assert isinstance(leases, fr.Leases)  # promoted into the arena and leased, not sent "elsewhere"
            assert [type(e) for e in leases.entries] == [fr.Lease] * 4 + [type(None)]
            conn.send_oneway(fr.encode_release(conn.next_id(), [e.lease_id for e in leases.entries[:4]]))
            conn.close()
    finally:
        store.close()


CRASHER = textwrap.dedent(
    """
    import sys, os
    from kvfabric.client import Client
    from kvfabric.client.sync_conn import SyncConnection
    from kvfabric.transport import frames as fr
    from tests.blocks import SPEC
    import numpy as np
    c = Client(sys.argv[1])
    hashes = c.block_hashes(SPEC, np.arange(4 * SPEC.block_size))
    conn = SyncConnection(c.endpoint, c.options)
    reply = conn.request(fr.encode_lease(conn.next_id(), SPEC.fingerprint(), hashes))
    print(sum(isinstance(e, fr.Lease) for e in reply.entries), flush=True)
    os.kill(os.getpid(), 9)
    """
)


def test_crashed_client_leaks_no_leases(server: ThreadServer, ram: MemoryTier) -> None:
    with Client(server.url, shm=False) as c:
        c.put(SPEC, TOKENS, kv(4))
    out = subprocess.run([sys.executable, "-c", CRASHER, server.url], env=child_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == -signal.SIGKILL and out.stdout.strip() == "4", out.stderr
    deadline = time.monotonic() + 10
    while held_bytes(ram) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_bytes(ram) == 0


def test_clients_in_other_processes(tmp_path: Path) -> None:
    with process_server("--ram-bytes", str(16 << 20)) as (_, port), Client(f"kvfabric://127.0.0.1:{port}") as c:
        assert c.transport == "shm"
        assert c.put(SPEC, TOKENS, kv(4)) == 4
        assert np.array_equal(np.stack(c.get_blocks(SPEC, c.block_hashes(SPEC, TOKENS))), kv(4))


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def test_tls(store: TieredStore, tmp_path: Path) -> None:
    from kvfabric.transport.tls import client_context, server_context

    cert, key = self_signed(tmp_path)
    with thread_server(store, ssl=server_context(cert, key), nixl=False) as srv:
        url = f"kvfabrics://localhost:{srv.port}"
        with Client(url, ssl=client_context(cert), shm=False) as c:
            assert c.put(SPEC, TOKENS, kv(4)) == 4
            assert np.array_equal(np.stack(c.get_blocks(SPEC, c.block_hashes(SPEC, TOKENS))), kv(4))
        with pytest.raises(ClientError, match="TLS handshake"):  # an untrusting client refuses the self-signed cert
            Client(url, shm=False).session


nixl_missing = nixl_transport.load_api()[0] is None


@pytest.mark.skipif(nixl_missing, reason="NIXL is not installed (pip install 'kvfabric[nixl]')")
def test_nixl_get(store: TieredStore, ram: MemoryTier) -> None:
    with thread_server(store, nixl=True) as srv, Client(srv.url, nixl=True) as c:
        with Client(srv.url, shm=False) as tcp:
            assert tcp.session.nixl and tcp.transport == "tcp"
            assert srv.sync(lambda: srv.server.nixl) is None  # offered, but started only for a client that asks
        assert c.transport == "nixl"
        assert srv.sync(lambda: srv.server.nixl) is not None
        c.put(SPEC, TOKENS, kv(4))
        out = [np.zeros(SPEC.block_nbytes, dtype=np.uint8) for _ in range(4)]
        c.get_blocks(SPEC, c.block_hashes(SPEC, TOKENS), out)
        assert np.array_equal(np.stack(out), kv(4))
        c.stats()  # on the same pooled connection, after the one-way release
        assert held_bytes(ram) == 0


def test_nixl_falls_back_to_tcp_with_a_log_line(store: TieredStore, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nixl_transport, "_API_MODULES", ("kvfabric_no_such_nixl_module",))
    caplog.set_level(logging.INFO)
    with thread_server(store, nixl=True) as srv:
        assert not srv.server.nixl_offered
        with Client(srv.url, nixl=True) as c:
            assert c.transport == "tcp"
            c.put(SPEC, TOKENS, kv(4))
            assert np.array_equal(np.stack(c.get_blocks(SPEC, c.block_hashes(SPEC, TOKENS))), kv(4))
    assert "NIXL transport unavailable" in caplog.text
    assert "does not offer it; using TCP" in caplog.text


def test_gds_reader_falls_back_to_host_reads(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import torch

    from kvfabric.transport.gds import PayloadReader

    caplog.set_level(logging.INFO)
    data = np.random.default_rng(3).integers(0, 256, 10000, dtype=np.uint8)
    (tmp_path / "seg").write_bytes(b"x" * 100 + data.tobytes())
    reader = PayloadReader()
    assert not reader.gds and "GPUDirect Storage off" in caplog.text
    out = torch.zeros(5000, dtype=torch.bfloat16)
    reader.read_into(tmp_path / "seg", 100, 10000, out)
    assert out.view(torch.uint8).numpy().tobytes() == data.tobytes()


def test_idempotent_requests_retry_after_a_lost_connection(server: ThreadServer) -> None:
    with Client(server.url, shm=False, pool_size=1) as c:
        c.put(SPEC, TOKENS, kv(4))
        server.sync(lambda: [conn.abort() for conn in list(server.server._connections)])
        time.sleep(0.1)
        assert c.lookup(SPEC, TOKENS).blocks == 4  # the pooled connection was dead; the retry reconnected


def test_timeouts_name_the_operation() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with pytest.raises(ClientError, match="timed out after 0.3s"):
            Client(f"kvfabric://127.0.0.1:{port}", timeout=0.3, retries=0).session


def test_refused_connection_names_the_endpoint() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(ClientError, match=f"cannot connect to kvfabric://127.0.0.1:{port}"):
        Client(f"kvfabric://127.0.0.1:{port}", retries=0).session


