"""The frame codec, fed bytes with no sockets: every frame round-trips; bad bytes give clear errors."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfabric.errors import FrameTooLargeError, ProtocolError
from kvfabric.spec import DType
from kvfabric.transport import frames as fr
from kvfabric.transport.receiver import DEFER, FrameReceiver

H = bytes(range(32))
P = bytes(32 * [7])
META = fr.WireMeta(P, DType.BFLOAT16, (2, 2, 16, 2, 16), 16, 123)


def parse(data: bytes, limits: fr.Limits = fr.Limits()) -> fr.Frame:
    async def go() -> fr.Frame:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await fr.read_frame(reader, limits)

    return asyncio.run(go())


ROUND_TRIPS = [
    (fr.encode_hello(1, "tok", {"host": "h", "boot_id": "b", "pid": 3}, ["shm"]),
     fr.Hello(1, "tok", {"host": "h", "boot_id": "b", "pid": 3}, ("shm",))),
    (fr.encode_hello(2, None, {}, []), fr.Hello(2, None, {}, ())),
    (fr.encode_register_model(3, {"model": "m"}), fr.RegisterModel(3, {"model": "m"})),
    (fr.encode_keys(4, "lookup", H, [H, P]), fr.KeyRequest(4, "lookup", H, (H, P))),
    (fr.encode_keys(5, "unpin", H, []), fr.KeyRequest(5, "unpin", H, ())),
    (fr.encode_get(6, H, [P], 4), fr.Get(6, H, (P,), 4)),
    (fr.encode_stats(7), fr.Stats(7)),
    (fr.encode_lease(8, H, [P]), fr.LeaseRequest(8, H, (P,))),
    (fr.encode_release(9, [1, 2]), fr.Release(9, (1, 2))),
    (fr.encode_nixl_connect(10, b"md"), fr.NixlConnect(10, b"md")),
    (fr.encode_hello_ok(11, "t", b"salt", "n", fr.Limits(), fr.ShmOffer("/dev/shm/x", 1, 2, 3), True),
     fr.HelloOk(11, "t", b"salt", "n",
                fr.ServerLimits(fr.MAX_BODY_BYTES, fr.MAX_BATCH, fr.MAX_BLOCK_BYTES, fr.MAX_PAYLOAD_BYTES),
                fr.ShmOffer("/dev/shm/x", 1, 2, 3), True)),
    (fr.encode_model_ok(12, H), fr.ModelOk(12, H)),
    (fr.encode_lookup_ok(13, ["ram", "disk"]), fr.LookupOk(13, ("ram", "disk"))),
    (fr.encode_count(14, 5), fr.Count(14, 5)),
    (fr.encode_flags(15, [True, False]), fr.Flags(15, (True, False))),
    (fr.encode_stats_ok(16, {"a": 1}), fr.StatsOk(16, {"a": 1})),
    (fr.encode_leases(17, [None, fr.Lease(3, 4096, META), fr.Elsewhere(META)]),
     fr.Leases(17, (None, fr.Lease(3, 4096, META), fr.Elsewhere(META)))),
    (fr.encode_nixl_ok(18, b"md", "agent", 1 << 40, 1 << 30), fr.NixlOk(18, b"md", "agent", 1 << 40, 1 << 30)),
    (fr.encode_error(19, "auth", "no"), fr.Error(19, "auth", "no")),
]  # fmt: skip


@pytest.mark.parametrize("data,expected", ROUND_TRIPS, ids=[e.op for _, e in ROUND_TRIPS])
def test_round_trip(data: bytes, expected: fr.Frame) -> None:
    assert parse(data) == expected


def test_payload_frames_carry_lengths_not_bytes() -> None:
    put = fr.encode_put(20, H, [fr.PutItem(P, META), fr.PutItem(H, META)])
    frame = parse(put)
    assert isinstance(frame, fr.Put) and frame.payload_len == 2 * META.nbytes
    assert frame.items == (fr.PutItem(P, META), fr.PutItem(H, META))
    blocks = parse(fr.encode_blocks(21, [META, None], 2))
    assert blocks == fr.Blocks(21, (META, None), 2, META.nbytes)


def test_header_is_24_bytes_little_endian() -> None:
    data = fr.encode_stats(0x0102030405060708)
    assert len(data) == fr.HEADER_BYTES + 1 and data[:2] == b"KF" and data[2] == 1 and data[3] == fr.OP_STATS
    assert struct.unpack_from("<IQQ", data, 4) == (1, 0x0102030405060708, 0)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: b"XX" + d[2:], "bad frame magic"),
        (lambda d: d[:2] + b"\x09" + d[3:], "unsupported protocol version"),
        (lambda d: d[:3] + b"\x7e" + d[4:], "unknown op code"),
        (lambda d: d[:16] + struct.pack("<Q", 5) + d[24:], "carries no payload"),
    ],
)
def test_bad_headers(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(fr.ParseError, match=message):
        fr.parse_header(mutate(fr.encode_stats(1)))


def test_size_limits_are_checked_from_the_header() -> None:
    limits = fr.Limits(max_body_bytes=64, max_batch=2, max_block_bytes=1024, max_payload_bytes=4096)
    with pytest.raises(FrameTooLargeError) as exc:
        fr.parse_header(fr.encode_keys(1, "exists", H, [H, H, H]), limits)
    assert exc.value.limit == 64
    big_payload = fr.HEADER.pack(fr.MAGIC, 1, fr.OP_PUT, 0, 1, 1 << 20)
    with pytest.raises(FrameTooLargeError):
        fr.parse_header(big_payload, limits)
    with pytest.raises(FrameTooLargeError):  # batch count
        parse(fr.encode_keys(1, "exists", H, [H, H, H]), fr.Limits(max_batch=2))
    with pytest.raises(FrameTooLargeError):  # one block over the block limit
        parse(fr.encode_put(1, H, [fr.PutItem(P, META)]), fr.Limits(max_block_bytes=1024))


def test_body_errors_name_the_problem() -> None:
    good = fr.encode_get(1, H, [P], 1)
    body = msgpack.packb([H, [b"short"], 1])
    bad = fr.HEADER.pack(fr.MAGIC, 1, fr.OP_GET, len(body), 1, 0) + body
    with pytest.raises(fr.ParseError, match="prefix hash must be 32 raw bytes"):
        parse(bad)
    body = b"\xc1"  # never-used msgpack byte
    with pytest.raises(fr.ParseError, match="malformed msgpack"):
        parse(fr.HEADER.pack(fr.MAGIC, 1, fr.OP_GET, 1, 1, 0) + body)
    put = fr.encode_put(1, H, [fr.PutItem(P, META)])
    lying = put[:16] + struct.pack("<Q", 7) + put[24:]
    with pytest.raises(fr.ParseError, match="does not match the blocks"):
        parse(lying)
    assert isinstance(parse(good), fr.Get)


def test_truncated_frames_raise_incomplete_read() -> None:
    data = fr.encode_get(1, H, [P, H], 1)
    for cut in (3, fr.HEADER_BYTES, len(data) - 1):
        with pytest.raises(asyncio.IncompleteReadError):
            parse(data[:cut])


class Collect:
    """A FrameReceiver owner that stores payloads in fresh buffers, as the server does."""

    def __init__(self) -> None:
        self.frames: list[fr.Frame] = []
        self.payloads: list[bytes] = []
        self._bufs: list[bytearray] = []
        self.receiver = FrameReceiver(fr.Limits(), self.on_frame, self.on_done)

    def on_frame(self, frame: fr.Frame) -> list[memoryview] | None:
        n = fr.payload_len(frame)
        self._bufs = [bytearray(n // 2), bytearray(n - n // 2)] if n else []
        return [memoryview(b) for b in self._bufs]

    def on_done(self, frame: fr.Frame) -> None:
        self.frames.append(frame)
        self.payloads.append(b"".join(self._bufs))

    def feed(self, data: bytes, step: int) -> None:
        pos = 0
        while pos < len(data):
            buf = self.receiver.get_buffer(-1)
            n = min(step, len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
            self.receiver.buffer_updated(n)
            pos += n


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_receiver_reassembles_frames_and_payloads_at_any_read_size(step: int) -> None:
    payload = bytes(range(256)) * (META.nbytes // 256)
    stream = (
        fr.encode_stats(1) + fr.encode_put(2, H, [fr.PutItem(P, META)]) + payload
        + fr.encode_keys(3, "delete", H, [P]) + fr.encode_put(4, H, []) + fr.encode_stats(5)
    )  # fmt: skip
    c = Collect()
    c.feed(stream, step)
    assert [f.request_id for f in c.frames] == [1, 2, 3, 4, 5]
    assert c.payloads[1] == payload and c.payloads[0] == b""


frame_bytes = st.sampled_from([d for d, _ in ROUND_TRIPS] + [fr.encode_put(2, H, [fr.PutItem(P, META)])])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    prefix=frame_bytes,
    garbage=st.binary(max_size=256),
    cut=st.integers(min_value=0, max_value=400),
    flip=st.tuples(st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=255)),
)
def test_fuzz_parser_only_raises_protocol_errors(prefix: bytes, garbage: bytes, cut: int, flip: tuple) -> None:
    data = bytearray(prefix[:cut] + garbage)
    if flip[0] < len(data):
        data[flip[0]] ^= flip[1]
    c = Collect()
    try:
        c.feed(bytes(data), 13)
    except ProtocolError as exc:
        assert str(exc)
    # anything else (IndexError, TypeError, MemoryError...) fails the test by propagating


@settings(max_examples=200, deadline=None)
@given(body=st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
), op=st.sampled_from(sorted(fr._BODY_PARSERS)))  # fmt: skip
def test_fuzz_well_formed_msgpack_with_wrong_shapes(body: object, op: int) -> None:
    data = msgpack.packb(body)
    header = fr.FrameHeader(op, len(data), 1, 0)
    try:
        fr.parse_body(header, data)
    except ProtocolError:
        pass


def test_get_over_hashes_x_chunks_is_a_request_error_naming_the_limit() -> None:
    data = fr.encode_get(5, H, [P] * 1024, 16384)
    with pytest.raises(fr.RequestLimitError) as exc:
        parse(data)
    assert exc.value.request_id == 5 and exc.value.size == 1024 * 16384 and exc.value.limit == fr.MAX_REPLY_VIEWS
    assert "hashes x chunks" in str(exc.value) and "max_reply_views" in str(exc.value)
    assert isinstance(parse(fr.encode_get(5, H, [P] * 4, 16384)), fr.Get)  # 65536 views: at the limit


def test_hello_ok_carries_the_view_limit_and_reads_servers_without_it() -> None:
    limits = fr.Limits(max_reply_views=99)
    ok = parse(fr.encode_hello_ok(1, "t", b"s", "n", limits, None, False))
    assert isinstance(ok, fr.HelloOk) and ok.limits.max_reply_views == 99
    old = fr._frame(fr.OP_HELLO_OK, 1, [1, "t", b"s", "n", [1, 2, 3, 4], None, False])
    assert parse(old).limits.max_reply_views == fr.MAX_REPLY_VIEWS  # type: ignore[union-attr]


class Rejecting(Collect):
    """A receiver owner that takes request-limit errors instead of raising them."""

    def __init__(self, limits: fr.Limits) -> None:
        super().__init__()
        self.rejected: list[int] = []
        self.receiver = FrameReceiver(limits, self.on_frame, self.on_done, on_reject=self.on_reject,
                                      control_bytes=256)  # fmt: skip

    def on_reject(self, exc: fr.RequestLimitError) -> None:
        self.rejected.append(exc.request_id)


@pytest.mark.parametrize("step", [1, 13, 1 << 20])
def test_a_rejected_put_has_its_payload_skipped_and_the_stream_goes_on(step: int) -> None:
    payload = b"\xff" * (META.nbytes * 3)
    stream = (
        fr.encode_stats(1) + fr.encode_put(2, H, [fr.PutItem(P, META)] * 3) + payload + fr.encode_stats(3)
        + fr.encode_get(4, H, [P] * 3, 1) + fr.encode_stats(5)
    )  # fmt: skip
    c = Rejecting(fr.Limits(max_batch=2))
    c.feed(stream, step)
    assert c.rejected == [2, 4]
    assert [f.request_id for f in c.frames] == [1, 3, 5]


def test_receiver_gives_back_a_large_body_buffer_and_drops_its_owner_on_close() -> None:
    c = Rejecting(fr.Limits())
    assert c.receiver.buffered_bytes == 256
    big = fr.encode_keys(1, "exists", H, [P] * 2000)  # ~70 KiB body
    c.feed(big + fr.encode_stats(2), 4096)
    assert [f.request_id for f in c.frames] == [1, 2]
    assert c.receiver.buffered_bytes == 256
    c.receiver.close()
    c.feed(fr.encode_stats(3), 4096)  # ignored after close
    assert [f.request_id for f in c.frames] == [1, 2]
    assert c.receiver._on_frame is None and c.receiver._on_payload_done is None


def test_a_deferred_payload_lands_where_resume_says() -> None:
    payload = bytes(range(256)) * (META.nbytes // 256)
    got: list[bytes] = []
    frames: list[fr.Frame] = []
    dest = bytearray(META.nbytes)

    def on_frame(frame: fr.Frame) -> object:
        return DEFER if isinstance(frame, fr.Put) else None

    def on_done(frame: fr.Frame) -> None:
        frames.append(frame)
        if isinstance(frame, fr.Put):
            got.append(bytes(dest))

    r = FrameReceiver(fr.Limits(), on_frame, on_done)  # type: ignore[arg-type]
    stream = fr.encode_put(1, H, [fr.PutItem(P, META)]) + payload[:100]
    buf = r.get_buffer(-1)
    buf[: len(stream)] = stream
    r.buffer_updated(len(stream))
    assert r.deferred and not frames
    rest = payload[100:] + fr.encode_stats(2)
    buf = r.get_buffer(-1)  # bytes that arrive before the owner's pause took effect are kept
    buf[:50] = rest[:50]
    r.buffer_updated(50)
    r.resume([memoryview(dest)])
    assert not r.deferred
    pos = 50
    while pos < len(rest):
        buf = r.get_buffer(-1)
        n = min(len(buf), len(rest) - pos)
        buf[:n] = rest[pos : pos + n]
        r.buffer_updated(n)
        pos += n
    assert got == [payload] and [f.request_id for f in frames] == [1, 2]
