"""PUT payloads received straight into RAM arena extents: reserved, filled, then adopted by the put or given back,
and never readable half way."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from kvfabric.client import Client
from kvfabric.ids import BlockKey
from kvfabric.record import Block, BlockMeta
from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from kvfabric.transport import frames as fr
from tests.blocks import SPEC
from tests.transport.servers import open_store, thread_server
from tests.transport.wire import connect, hello, read_frame

NS = "default"


def payload(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, SPEC.block_nbytes, dtype=np.uint8)


def test_a_put_adopts_its_reserved_extent_and_a_cancel_after_it_changes_nothing(store: TieredStore,
                                                                                ram: MemoryTier) -> None:  # fmt: skip
    fp = store.register_model(SPEC)
    key = BlockKey(NS, fp, b"\x01" * 32)
    res = store.reserve_ram(SPEC.block_nbytes)
    assert res is not None
    used = ram.used_bytes
    assert store.get(key) is None  # reserved, filled below, not yet put: nobody can read it
    data = payload(1)
    res.view[:] = data
    assert ram.evict(1 << 62) == 0 and ram.used_bytes == used  # a reservation is not evictable
    store.put(Block(BlockMeta(key, SPEC.dtype, SPEC.block_shape, SPEC.block_size), res.view))
    assert ram.used_bytes == used  # adopted in place: no second extent
    lease = store.acquire(key)
    assert lease is not None and lease.offset == res.offset
    store.release(lease)
    assert store.cancel_reservation(res) is False and ram.used_bytes == used
    got = store.get(key)
    assert got is not None and bytes(got.payload) == data.tobytes()


def test_a_cancelled_reservation_goes_back_to_the_free_space(store: TieredStore, ram: MemoryTier) -> None:
    res = store.reserve_ram(SPEC.block_nbytes)
    assert res is not None and ram.used_bytes > 0
    assert store.cancel_reservation(res) is True
    assert ram.used_bytes == 0
    assert store.cancel_reservation(res) is False  # once only


def test_no_reservation_where_the_block_cannot_go_to_ram(store: TieredStore, ram: MemoryTier) -> None:
    assert store.reserve_ram(ram.capacity_bytes + 1) is None  # bigger than the arena
    held = [store.reserve_ram(1 << 20) for _ in range(ram.capacity_bytes >> 20)]
    assert all(r is not None for r in held)
    assert store.reserve_ram(1 << 20) is None  # full of what may not be evicted
    for r in held:
        store.cancel_reservation(r)  # type: ignore[arg-type]
    assert ram.used_bytes == 0


def test_a_half_received_put_is_never_readable_and_its_extent_comes_back(server, store: TieredStore,
                                                                         ram: MemoryTier) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    with Client(server.url, shm=False) as c:
        c.register_model(SPEC)
        hashes = c.block_hashes(SPEC, np.arange(2 * SPEC.block_size))
    meta = fr.WireMeta(b"\x00" * 32, SPEC.dtype, SPEC.block_shape, SPEC.block_size)
    sock = connect(server.port)
    hello(sock)
    sock.sendall(fr.encode_put(7, SPEC.fingerprint(), [fr.PutItem(h, meta) for h in hashes]))
    sock.sendall(payload(2).tobytes() + payload(3).tobytes()[: SPEC.block_nbytes // 2])
    deadline = time.monotonic() + 10
    while server.sync(lambda: ram.used_bytes) < 2 * SPEC.block_nbytes:  # both extents reserved, one filled
        assert time.monotonic() < deadline, "the put's extents were never reserved"
        time.sleep(0.01)
    with Client(server.url, shm=False) as c:
        assert c.exists(SPEC, hashes) == [False, False]
    sock.close()
    while server.sync(lambda: ram.used_bytes) != 0:
        assert time.monotonic() < deadline, "a dropped put's extents were not given back"
        time.sleep(0.01)
    with Client(server.url, shm=False) as c:
        assert c.exists(SPEC, hashes) == [False, False]


def test_a_refused_put_changes_nothing_in_ram(server, store: TieredStore, ram: MemoryTier) -> None:  # type: ignore[no-untyped-def]
    with Client(server.url, shm=False) as c:
        c.register_model(SPEC)
        hashes = c.block_hashes(SPEC, np.arange(SPEC.block_size))
        c.put_blocks(SPEC, hashes, [payload(4)])
    used = server.sync(lambda: ram.used_bytes)
    bad = fr.WireMeta(b"\x00" * 32, SPEC.dtype, (1, 2, 3), SPEC.block_size)  # not the model's block shape
    sock = connect(server.port)
    hello(sock)
    sock.sendall(fr.encode_put(9, SPEC.fingerprint(), [fr.PutItem(b"\x02" * 32, bad)]) + b"\x00" * bad.nbytes)
    reply = read_frame(sock)
    assert isinstance(reply, fr.Error) and reply.code == "invalid_block"
    sock.close()
    assert server.sync(lambda: ram.used_bytes) == used
    with Client(server.url, shm=False) as c:
        got = c.get_blocks(SPEC, hashes)
        assert got[0] is not None and np.array_equal(got[0], payload(4))


def test_puts_into_ram_are_written_through_to_disk(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        with thread_server(store, nixl=False) as srv, Client(srv.url, shm=False) as c:
            c.register_model(SPEC)
            hashes = c.block_hashes(SPEC, np.arange(3 * SPEC.block_size))
            blocks = [payload(10 + i) for i in range(3)]
            assert c.put_blocks(SPEC, hashes, blocks) == 3
            srv.sync(lambda: store.evict(store.tiers[0], 1 << 62))  # RAM empty: what is left is on disk
            got = c.get_blocks(SPEC, hashes)
            assert all(g is not None and np.array_equal(g, b) for g, b in zip(got, blocks, strict=True))
    finally:
        store.close()


def test_a_run_of_reservations_lies_end_to_end_and_each_part_is_its_own(store: TieredStore, ram: MemoryTier) -> None:
    fp = store.register_model(SPEC)
    n = SPEC.block_nbytes
    got = store.reserve_ram_run([n, n, n])
    assert got is not None
    whole, parts = got
    assert len(whole) == 3 * n and [p.offset - parts[0].offset for p in parts] == [0, n, 2 * n]
    whole[:] = np.concatenate([payload(20), payload(21), payload(22)])  # one receive fills all three
    key = BlockKey(NS, fp, b"\x03" * 32)
    store.put(Block(BlockMeta(key, SPEC.dtype, SPEC.block_shape, SPEC.block_size), parts[1].view))
    assert store.cancel_reservation(parts[0]) and store.cancel_reservation(parts[2])
    assert ram.used_bytes == n  # only the adopted part is left
    block = store.get(key)
    assert block is not None and bytes(block.payload) == payload(21).tobytes()
    assert store.reserve_ram_run([n, n + 1]) is None  # a size off the alignment would leave gaps between them
