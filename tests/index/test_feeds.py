"""Event feeds over real ZMQ sockets on 127.0.0.1 (ephemeral ports), into the index service."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from kvfabric.events import BlockStored, encode_batch
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.publisher import ZmqEventPublisher
from kvfabric.index.service import IndexService
from kvfabric.index.subscriber import ZmqEventSubscriber
from kvfabric.index.vllm_events import VllmEngineBinding, chain_tokens
from kvfabric.spec import ModelSpec

NS = Namespace("tenant-a")
FP = ModelFingerprint(b"\x11" * 32)
CHAIN = tuple(PrefixHash(i.to_bytes(32, "big")) for i in range(1, 9))


async def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_kvfabric_events_over_zmq_reach_the_index() -> None:
    async def main() -> None:
        svc = IndexService()
        sub = svc.subscribe_events()
        assert sub.endpoint.startswith("tcp://127.0.0.1:") and not sub.endpoint.endswith(":0")
        with ZmqEventPublisher(sub.endpoint) as pub:
            # PUB/SUB drops messages until the connection is up: republish until the index has them
            async def delivered() -> bool:
                pub.publish(BlockStored("node-1", TierId("ram"), NS, FP, CHAIN))
                pub.flush()
                await asyncio.sleep(0.05)
                return bool(svc.index.match(NS, FP, CHAIN))

            for _ in range(200):
                if await delivered():
                    break
            assert svc.index.match(NS, FP, CHAIN)[0].blocks == 8
        assert sub.stats.errors == 0 and sub.stats.batches >= 1
        await svc.aclose()

    asyncio.run(main())


def test_vllm_feed_rekeys_and_registers_the_engine() -> None:
    spec = ModelSpec(model="m", num_layers=2, kv_heads=2, head_dim=16, block_size=4)
    binding = VllmEngineBinding("vllm-0", NS, spec)
    tokens = list(range(16))

    async def main() -> None:
        import zmq

        svc = IndexService()
        feed = svc.subscribe_vllm(binding)
        assert feed.kv_events_config["endpoint"] == feed.subscriber.endpoint
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(feed.subscriber.endpoint)
        payload = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1, 2, 3], "parent_block_hash": None,
                                        "token_ids": tokens[:12], "block_size": 4, "lora_id": None, "medium": "GPU",
                                        "lora_name": None}]])  # fmt: skip
        seq = 0
        chain = chain_tokens(binding, tokens)
        while not svc.index.match(NS, spec.fingerprint(), chain) and seq < 200:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            seq += 1
            await asyncio.sleep(0.05)
        pub.close()
        assert svc.index.match(NS, spec.fingerprint(), chain)[0].blocks == 3
        assert svc.route(NS, spec.fingerprint(), tokens=tokens).engine == "vllm-0"
        await svc.aclose()

    asyncio.run(main())


def test_subscriber_counts_gaps_and_bad_payloads_without_applying_them() -> None:
    svc = IndexService()
    sub = ZmqEventSubscriber("tcp://127.0.0.1:0", svc.ingest_batch)
    good = encode_batch([BlockStored("n", TierId("ram"), NS, FP, CHAIN)])
    sub.handle([b"kvfabric", (0).to_bytes(8, "big"), good])
    sub.handle([b"kvfabric", (2).to_bytes(8, "big"), good])  # seq 1 was lost
    sub.handle([b"kvfabric", (3).to_bytes(8, "big"), b"\x93garbage"])
    sub.handle([b"only-one-frame"])
    assert (sub.stats.batches, sub.stats.gaps, sub.stats.errors, sub.stats.last_seq) == (2, 1, 2, 3)
    assert svc.events_applied == 2


def test_binding_a_taken_port_fails_clearly() -> None:
    async def main() -> None:
        a = ZmqEventSubscriber("tcp://127.0.0.1:0", lambda p: None)
        endpoint = a.open()
        b = ZmqEventSubscriber(endpoint, lambda p: None)
        with pytest.raises(OSError, match="cannot bind KV event socket"):
            b.open()
        await a.aclose()

    asyncio.run(main())
