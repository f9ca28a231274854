from __future__ import annotations

import msgpack
import pytest

from kvfabric.errors import EventFormatError, ProtocolError
from kvfabric.events import (
    EVENT_FORMAT_VERSION,
    AllCleared,
    BlockRemoved,
    BlockStored,
    EventBus,
    EventLog,
    decode_batch,
    encode_batch,
)  # fmt: skip
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash, TierId

NS = Namespace("tenant-a")
FP = ModelFingerprint(b"\x11" * 32)


def h(i: int) -> PrefixHash:
    return PrefixHash(i.to_bytes(32, "big"))


EVENTS = [
    BlockStored("node-1", TierId("ram"), NS, FP, (h(1), h(2), h(3)), h(0), 16),
    BlockRemoved("engine-0", TierId("gpu"), NS, FP, (h(2),)),
    AllCleared("engine-0", TierId("gpu")),
    AllCleared("node-2"),
]


def test_roundtrip_every_kind() -> None:
    batch = decode_batch(encode_batch(EVENTS, seq=42, ts=1234.5))
    assert batch.seq == 42 and batch.ts == 1234.5
    assert list(batch.events) == EVENTS


def test_encoding_is_compact() -> None:
    one = BlockStored("e", TierId("gpu"), NS, FP, tuple(h(i) for i in range(100)))
    data = encode_batch([one])
    # 100 hashes of 32 bytes in one bin, plus the model, the parent and a few small fields
    assert len(data) < 100 * 32 + 128


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([EVENT_FORMAT_VERSION + 1, 0, 0.0, []]),
        msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0]),
        msgpack.packb({"events": []}),
        msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [[9, "x"]]]),
        msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [[1, "s", "ram", "ns", b"m" * 32, b"x" * 31, b"p" * 32, 16]]]),
        msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [[1, "s", "ram", "ns", b"short", b"x" * 32, b"p" * 32, 16]]]),
        msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [[2, "", "ram", "ns", b"m" * 32, b"x" * 32]]]),
        msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [[3, "s", 5]]]),
    ],
)
def test_malformed_batches_raise_a_clear_error(payload: bytes) -> None:
    with pytest.raises(EventFormatError):
        decode_batch(payload)
    assert issubclass(EventFormatError, ProtocolError)


def test_encode_refuses_wrong_size_hashes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encode_batch([BlockRemoved("e", TierId("gpu"), NS, FP, (PrefixHash(b"short"),))])


def test_bus_fans_out_in_order_and_unsubscribes() -> None:
    bus = EventBus()
    a, b = EventLog(), EventLog()
    bus.subscribe(a)
    unsubscribe = bus.subscribe(b)
    bus.publish(EVENTS[0])
    unsubscribe()
    bus.publish(EVENTS[1])
    assert a.take_events() == EVENTS[:2]
    assert b.take_events() == EVENTS[:1]


def test_bus_delivers_to_everyone_before_raising() -> None:
    class Broken:
        def publish(self, event: object) -> None:
            raise RuntimeError("subscriber broke")

    bus = EventBus()
    log = EventLog()
    bus.subscribe(Broken())
    bus.subscribe(log)
    with pytest.raises(RuntimeError, match="subscriber broke"):
        bus.publish(EVENTS[0])
    assert log.take_events() == EVENTS[:1]


def test_a_bad_event_after_good_ones_of_the_same_source_is_still_caught() -> None:
    good = [1, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p" * 32, 16]
    for bad in ([1, "s", "ram", "ns", b"m" * 32, b"x" * 32], [1, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p", 16],
                [1, "s", "ram", "ns", b"m" * 32, b"x" * 32, b"p" * 32, -1]):  # fmt: skip
        with pytest.raises(EventFormatError):
            decode_batch(msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [good, good, bad]]))
    batch = decode_batch(msgpack.packb([EVENT_FORMAT_VERSION, 0, 0.0, [good, good]]))
    assert batch.events[0] == batch.events[1]
