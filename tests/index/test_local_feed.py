"""The bridge from the store's threads to the index's loop: real threads publishing, a real asyncio loop applying."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from kvfabric.events import BlockRemoved, BlockStored, KVEvent
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId
from kvfabric.index.local_feed import LoopEventSink, announce_held
from kvfabric.index.service import IndexService
from kvfabric.store.config import StoreConfig
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_chain

NS = Namespace("tenant-a")
FP = ModelFingerprint(b"\x11" * 32)


def ev(source: str, i: int) -> BlockStored:
    return BlockStored(source, TierId("ram"), NS, FP, (PrefixHash(i.to_bytes(32, "big")),))


async def until(cond, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_events_from_many_threads_arrive_in_order_in_batches_on_the_loop() -> None:
    sink = LoopEventSink(batch=100)
    sink.publish(ev("early", 0))  # before the loop exists: kept until attach
    got: list[list[KVEvent]] = []
    loop_thread: list[int] = []

    def apply(events: list[KVEvent]) -> None:
        loop_thread.append(threading.get_ident())
        got.append(events)

    async def main() -> None:
        sink.attach(apply)
        threads = [threading.Thread(target=lambda s=s: [sink.publish(ev(s, i)) for i in range(2000)])
                   for s in ("t0", "t1", "t2")]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await until(lambda: sum(map(len, got)) == 6001)
        assert set(loop_thread) == {threading.get_ident()}  # applied on the loop's thread only

    asyncio.run(main())
    flat = [e for batch in got for e in batch]
    assert flat[0].source == "early"
    for s in ("t0", "t1", "t2"):  # each thread's events in the order it published them
        assert [int.from_bytes(e.hashes[0], "big") for e in flat if e.source == s] == list(range(2000))
    assert max(map(len, got)) <= 100 and len(got) < 6001  # batched, within the batch bound
    assert (sink.stats.published, sink.stats.applied, sink.stats.dropped) == (6001, 6001, 0)


def test_overflow_drops_and_counts_and_a_refused_batch_does_not_stall_the_feed() -> None:
    sink = LoopEventSink(max_pending=10, batch=4)
    for i in range(15):
        sink.publish(ev("e", i))
    assert (sink.stats.published, sink.stats.dropped, sink.pending) == (10, 5, 10)
    applied: list[KVEvent] = []

    def apply(events: list[KVEvent]) -> None:
        if any(int.from_bytes(e.hashes[0], "big") == 5 for e in events):
            raise ValueError("refused")
        applied.extend(events)

    async def main() -> None:
        sink.attach(apply)
        await until(lambda: sink.pending == 0)
        sink.publish(ev("e", 99))
        await until(lambda: applied[-1:] and applied[-1].hashes[0][-1] == 99)
        sink.detach()
        sink.publish(ev("e", 100))  # after detach: queued, not delivered
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert [int.from_bytes(e.hashes[0], "big") for e in applied] == [0, 1, 2, 3, 8, 9, 99]
    assert sink.stats.errors == 1 and sink.pending == 1


def test_a_store_with_the_sink_feeds_the_index_service_and_existing_blocks_are_announced(tmp_path: Path) -> None:
    chain = make_chain(8)
    keys = [b.key for b in chain]

    async def main() -> None:
        svc = IndexService()
        sink = LoopEventSink()
        store = TieredStore.open(StoreConfig(data_dir=tmp_path, node_id="node-1", fsync="none"), events=sink)
        try:
            svc.feed_local(sink)
            store.register_model(SPEC)
            await asyncio.to_thread(store.put_many, chain)  # the tiers publish from a worker thread
            await until(lambda: svc.index.match(NS, SPEC.fingerprint(), [k.prefix for k in keys]) != [])
            [m] = svc.index.match(NS, SPEC.fingerprint(), [k.prefix for k in keys])
            assert (m.source, m.blocks, dict(m.media)) == ("node-1", 8, {TierId("ram"): 8, TierId("disk"): 8})
            await asyncio.to_thread(store.delete, keys[3])
            await until(lambda: svc.index.match(NS, SPEC.fingerprint(), [k.prefix for k in keys])[0].blocks == 3)
        finally:
            await svc.aclose()
            store.close()

        # a fresh index over the reopened store learns what the disk tier kept from the announcement alone
        svc = IndexService()
        sink = LoopEventSink(max_pending=8)  # smaller than a chunk: the announcer waits for the loop to drain
        store = TieredStore.open(StoreConfig(data_dir=tmp_path, node_id="node-1", fsync="none"), events=sink)
        try:
            svc.feed_local(sink)
            stop = threading.Event()
            held = [(tier, store.tier(tier).keys()) for tier in store.tiers]
            assert await asyncio.to_thread(announce_held, sink, "node-1", held, stop, chunk=3) == 7
            await until(lambda: svc.events_applied == 7)
            matches = svc.index.match(NS, SPEC.fingerprint(), [k.prefix for k in keys])
            assert [(m.source, m.blocks, dict(m.media)) for m in matches] == [("node-1", 3, {TierId("disk"): 3})]
            assert svc.stats()["local_feeds"] == [
                {"published": 7, "applied": 7, "dropped": 0, "errors": 0, "pending": 0}]  # fmt: skip
        finally:
            await svc.aclose()
            store.close()

    asyncio.run(main())


def test_announcing_stops_when_asked(tmp_path: Path) -> None:
    sink = LoopEventSink(max_pending=4)  # never attached: nothing drains, the announcer must not hang
    stop = threading.Event()
    keys = [b.key for b in make_chain(20)]
    t = threading.Thread(target=announce_held, args=(sink, "n", [(TierId("disk"), keys)], stop), kwargs={"chunk": 2})
    t.start()
    stop.set()
    t.join(10)
    assert not t.is_alive() and sink.pending <= 4


def test_removal_events_are_bridged_too() -> None:
    sink = LoopEventSink()
    svc = IndexService()

    async def main() -> None:
        svc.feed_local(sink)
        threading.Thread(
            target=lambda: [
                sink.publish(ev("n", 1)),
                sink.publish(BlockRemoved("n", TierId("ram"), NS, FP, (PrefixHash((1).to_bytes(32, "big")),))),
            ]
        ).start()
        await until(lambda: svc.events_applied == 2)
        await svc.aclose()

    asyncio.run(main())
    assert svc.index.stats().blocks == 0
