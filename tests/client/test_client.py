"""The SDK against the real server: buffers of every kind, batches, layer streaming. Every test taking ``connect``
runs with both clients (the sync one and the asyncio one behind the same calls)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from kvfabric.client import AsyncClient
from kvfabric.errors import ClientError, RemoteError
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.tiered import TieredStore
from kvfabric.transport.frames import Limits
from tests.blocks import SPEC
from tests.client.both import Connect
from tests.transport.servers import ThreadServer, thread_server

TOKENS = np.arange(6 * SPEC.block_size)


def bf16_kv(n: int, spec: ModelSpec = SPEC) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn((n, *spec.block_shape), generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("shm", [False, True])
def test_put_get_bf16_tensors(connect: Connect, server: ThreadServer, shm: bool) -> None:
    kv = bf16_kv(6)
    with connect(server.url, shm=shm) as c:
        assert c.transport == ("shm" if shm else "tcp")
        assert c.put(SPEC, TOKENS, kv) == 6
        got = c.get(SPEC, TOKENS)
        assert got.dtype == torch.bfloat16 and got.shape == (6, *SPEC.block_shape) and torch.equal(got, kv)
        longer = np.concatenate([TOKENS, np.arange(5000, 5000 + 2 * SPEC.block_size)])
        assert c.lookup(SPEC, longer).blocks == 6 and c.lookup(SPEC, longer).tokens == 6 * SPEC.block_size
        out = torch.zeros((8, *SPEC.block_shape), dtype=torch.bfloat16)
        assert torch.equal(c.get(SPEC, longer, out=out), kv)  # the leading 6 of 8


def test_buffers_of_every_kind(connect: Connect, server: ThreadServer) -> None:
    spec = ModelSpec(model="test/f32", num_layers=2, kv_heads=2, head_dim=8, dtype=DType.FLOAT32, block_size=4)
    tokens = np.arange(3 * spec.block_size)
    kv = np.random.default_rng(0).standard_normal((3, *spec.block_shape)).astype(np.float32)
    with connect(server.url, shm=False) as c:
        assert c.put(spec, tokens, [kv[0], torch.from_numpy(kv[1]), bytearray(kv[2].tobytes())]) == 3
        hashes = c.block_hashes(spec, tokens)
        outs = [np.zeros_like(kv[0]), torch.zeros(spec.block_shape), bytearray(spec.block_nbytes)]
        got = c.get_blocks(spec, hashes, outs)
        assert got[0] is outs[0] and np.array_equal(outs[0], kv[0])
        assert np.array_equal(outs[1].numpy(), kv[1]) and bytes(outs[2]) == kv[2].tobytes()
        with pytest.raises(ValueError):
            c.get_blocks(spec, hashes, [np.zeros(3, dtype=np.float32)[::2]] * 3)  # not contiguous


@pytest.mark.parametrize("shm", [False, True])
@pytest.mark.parametrize(
    "limits", [Limits(max_batch=4), Limits(max_batch=8, max_reply_views=3)], ids=["batch", "views"]
)
def test_batches_within_the_server_limits(connect: Connect, store: TieredStore, limits: Limits, shm: bool) -> None:
    """Calls larger than the server's batch limit, or than its reply-view limit (gets split by views; key
    operations, whose replies carry no views, by the batch limit; a lookup reads on past its first batch)."""
    with thread_server(store, nixl=False, limits=limits) as srv, connect(srv.url, shm=shm) as c:
        kv = bf16_kv(11)
        tokens = np.arange(11 * SPEC.block_size)
        assert c.put(SPEC, tokens, kv) == 11
        assert c.lookup(SPEC, tokens).blocks == 11
        assert torch.equal(c.get(SPEC, tokens), kv)
        assert c.exists(SPEC, c.block_hashes(SPEC, tokens)) == [True] * 11


def test_layer_streaming_reports_each_layer_in_order(connect: Connect, server: ThreadServer) -> None:
    kv = bf16_kv(6)
    seen: list[tuple[int, bool]] = []
    with connect(server.url, shm=False) as c:
        c.put(SPEC, TOKENS, kv)
        out = torch.zeros_like(kv)

        def on_layer(layer: int) -> None:  # layer l of every block has landed when this runs
            seen.append((layer, torch.equal(out[:, layer], kv[:, layer])))

        c.get_blocks(SPEC, c.block_hashes(SPEC, TOKENS), [out[i] for i in range(6)], chunks=SPEC.num_layers,
                     on_chunk=on_layer)  # fmt: skip
    assert seen == [(layer, True) for layer in range(SPEC.num_layers)]
    assert torch.equal(out, kv)


def test_pin_unpin_delete_stats(connect: Connect, server: ThreadServer) -> None:
    with connect(server.url) as c:
        c.put(SPEC, TOKENS, bf16_kv(6))
        hashes = c.block_hashes(SPEC, TOKENS)
        assert c.pin(SPEC, hashes[:2]) == 2 and c.unpin(SPEC, hashes[:2]) == 2
        assert c.delete(SPEC, hashes[3:]) == 3
        assert c.lookup(SPEC, TOKENS).blocks == 3
        assert c.stats()["tiers"]["ram"]["blocks"] == 3  # auth off: one tenant sees the tier totals


@pytest.mark.parametrize("shm", [False, True])
def test_async_client_pipelines_many_requests(server: ThreadServer, shm: bool) -> None:
    kv = bf16_kv(6)

    async def main() -> None:
        async with AsyncClient(server.url, shm=shm, pool_size=2) as c:
            assert await c.transport() == ("shm" if shm else "tcp")
            assert await c.put(SPEC, TOKENS, kv) == 6
            assert (await c.lookup(SPEC, TOKENS)).blocks == 6
            assert torch.equal(await c.get(SPEC, TOKENS), kv)
            hashes = await c.block_hashes(SPEC, TOKENS)
            # many requests in flight on two pipelined connections
            outs = [[np.zeros(SPEC.block_nbytes, dtype=np.uint8) for _ in hashes] for _ in range(20)]
            await asyncio.gather(*(c.get_blocks(SPEC, hashes, o) for o in outs))
            for o in outs:
                assert np.stack(o).tobytes() == kv.view(torch.uint8).numpy().tobytes()
            assert await c.exists(SPEC, hashes) == [True] * 6
            assert await c.delete(SPEC, hashes[2:]) == 4
            assert (await c.lookup(SPEC, TOKENS)).blocks == 2

    asyncio.run(main())


def test_a_reply_body_larger_than_the_receive_buffer(connect: Connect, server: ThreadServer) -> None:
    spec = ModelSpec(model="test/many-small", num_layers=1, kv_heads=1, head_dim=8, dtype=DType.UINT8, block_size=4)
    n = 3000  # a BLOCKS reply with 3000 metas: a body of ~200 KiB, more than the client's 64 KiB control buffer
    tokens = np.arange(n * spec.block_size)
    kv = np.random.default_rng(5).integers(0, 256, (n, *spec.block_shape), dtype=np.uint8)
    with connect(server.url, shm=False) as c:
        assert c.put(spec, tokens, kv) == n
        got = c.get_blocks(spec, c.block_hashes(spec, tokens))
        assert np.array_equal(np.stack(got), kv.reshape(n, -1))
        assert c.lookup(spec, tokens).blocks == n  # the same connection reads on after the grown buffer


def test_bad_input_is_refused_before_anything_is_sent(connect: Connect, server: ThreadServer) -> None:
    with connect(server.url, shm=False) as c:
        hashes = c.block_hashes(SPEC, TOKENS)
        with pytest.raises(ValueError, match="block 1 holds"):
            c.put_blocks(SPEC, hashes[:2], [bf16_kv(1)[0], bytearray(10)])
        with pytest.raises(ValueError, match="3 blocks for 2 hashes"):
            c.put_blocks(SPEC, hashes[:2], list(bf16_kv(3)))
        with pytest.raises(ValueError, match="1 output buffers for 2 hashes"):
            c.get_blocks(SPEC, hashes[:2], [bytearray(SPEC.block_nbytes)])
        assert c.lookup(SPEC, TOKENS).blocks == 0  # nothing stored, and the connection still works
        assert c.get(SPEC, TOKENS) is None and c.get(SPEC, TOKENS[:3]) is None  # a miss; no full block
        assert c.put(SPEC, TOKENS[:3], bf16_kv(1)) == 0


@pytest.mark.parametrize("shm", [False, True])
def test_a_destination_too_small_for_its_block(connect: Connect, server: ThreadServer, shm: bool) -> None:
    with connect(server.url, shm=shm) as c:
        c.put(SPEC, TOKENS, bf16_kv(6))
        hashes = c.block_hashes(SPEC, TOKENS)
        with pytest.raises(ValueError, match="destination 1 holds 10 bytes"):
            c.get_blocks(SPEC, hashes[:2], [bytearray(SPEC.block_nbytes), bytearray(10)])
        assert c.exists(SPEC, hashes) == [True] * 6


def test_register_model_and_errors_name_the_operation(connect: Connect, server: ThreadServer) -> None:
    with connect(server.url, shm=False) as c:
        assert c.register_model(SPEC) == SPEC.fingerprint()
        assert SPEC.fingerprint() in c.session.registered
        with pytest.raises(RemoteError, match="delete failed"):
            c.delete(SPEC, [b"short"])  # a hash of the wrong size: the server refuses the request


def test_a_closed_client_refuses_calls(connect: Connect, server: ThreadServer) -> None:
    c = connect(server.url, shm=False)
    assert c.lookup(SPEC, TOKENS).blocks == 0
    c.close()
    with pytest.raises(ClientError, match="client is closed"):
        c.lookup(SPEC, TOKENS)
