"""The kvfabric wire protocol: pure encode/parse functions, one type per frame, size limits. No I/O.

Every frame is a fixed 24-byte header, a msgpack body, then ``payload_len`` raw bytes (block payloads)::

    magic "KF" | u8 version | u8 op | u32 body_len | u64 request_id | u64 payload_len     (little-endian)

The body is a msgpack array whose fields are listed per frame below (and in ``docs/wire-protocol.md``). Payload
bytes are never part of an encoded frame: senders write them after the header from their own buffers
(``sendmsg``/``writelines``) and receivers read them straight into their destinations, so no block is copied
to be framed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, Protocol

import msgpack

from kvfabric.errors import FrameTooLargeError, ProtocolError
from kvfabric.ids import HASH_BYTES, ModelFingerprint, PrefixHash, TierId
from kvfabric.spec import DType

MAGIC: Final = b"KF"
PROTOCOL_VERSION: Final = 1
HEADER = struct.Struct("<2sBBIQQ")
HEADER_BYTES: Final = HEADER.size  # 24

MAX_BODY_BYTES: Final = 4 << 20
"""Default limit of a frame's msgpack body (a batch of 4096 block metas is ~400 KiB)."""
MAX_BATCH: Final = 4096
"""Default limit of the number of blocks (hashes, metas, lease ids) in one frame."""
MAX_BLOCK_BYTES: Final = 64 << 20
"""Default limit of one block's payload; servers announce their store's limit at hello."""
MAX_PAYLOAD_BYTES: Final = 1 << 30
"""Default limit of the payload bytes following one frame."""
MAX_REPLY_VIEWS: Final = 1 << 16
"""Default limit of hashes x chunks in one GET: the number of payload views its reply is cut into."""
MAX_NDIM: Final = 6


class ParseError(ProtocolError):
    """Bytes that are not a valid frame: bad magic/version/op, malformed body, inconsistent lengths."""


class OpNotAllowedError(ParseError):
    """A valid op code the receiver does not accept in its current state (``Limits.ops``)."""

    def __init__(self, op: int) -> None:
        super().__init__(f"op 0x{op:02x} is not accepted here")
        self.op = op


class RequestLimitError(FrameTooLargeError):
    """A well-formed frame whose body asks for more than the limits allow (too many blocks, hashes x chunks).

    Raised by :func:`parse_body` after the whole body was read, so the stream is still in step: a receiver can
    answer it with an ERROR frame for ``request_id``, skip ``payload_len`` bytes and go on."""

    def __init__(self, what: str, size: int, limit: int, header: FrameHeader) -> None:
        super().__init__(size, limit, what=what)
        self.request_id = header.request_id
        self.payload_len = header.payload_len


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits a receiver enforces before it allocates or reads anything."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_batch: int = MAX_BATCH
    max_block_bytes: int = MAX_BLOCK_BYTES
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_reply_views: int = MAX_REPLY_VIEWS
    ops: frozenset[int] | None = None
    """The op codes accepted (checked in the header, before the sizes); ``None``: every op."""


# --- op codes (requests < 0x80 <= responses); never renumbered -------------------------------------------------------
OP_HELLO: Final = 0x01
OP_REGISTER_MODEL: Final = 0x02
OP_LOOKUP: Final = 0x03
OP_GET: Final = 0x04
OP_PUT: Final = 0x05
OP_EXISTS: Final = 0x06
OP_DELETE: Final = 0x07
OP_PIN: Final = 0x08
OP_UNPIN: Final = 0x09
OP_STATS: Final = 0x0A
OP_LEASE: Final = 0x0B
OP_RELEASE: Final = 0x0C
OP_NIXL_CONNECT: Final = 0x0D
OP_HELLO_OK: Final = 0x81
OP_MODEL_OK: Final = 0x82
OP_LOOKUP_OK: Final = 0x83
OP_BLOCKS: Final = 0x84
OP_COUNT: Final = 0x85
OP_FLAGS: Final = 0x86
OP_STATS_OK: Final = 0x8A
OP_LEASES: Final = 0x8B
OP_NIXL_OK: Final = 0x8D
OP_ERROR: Final = 0xFF

KeyOp = Literal["lookup", "exists", "delete", "pin", "unpin"]
_KEY_OPS: Final[dict[int, KeyOp]] = {
    OP_LOOKUP: "lookup", OP_EXISTS: "exists", OP_DELETE: "delete", OP_PIN: "pin", OP_UNPIN: "unpin",
}  # fmt: skip
_KEY_OP_CODES: Final = {name: code for code, name in _KEY_OPS.items()}


# --- plain data carried by frames ------------------------------------------------------------------------------------
class WireMeta(NamedTuple):
    """A block's metadata as it travels: everything but the key (the request names the key)."""

    parent: PrefixHash
    dtype: DType
    shape: tuple[int, ...]
    token_count: int
    created_ms: int = 0

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class PutItem(NamedTuple):
    prefix: PrefixHash
    meta: WireMeta


class Lease(NamedTuple):
    """A block the server holds for the client in its shared RAM arena until released."""

    lease_id: int
    offset: int
    meta: WireMeta


class Elsewhere(NamedTuple):
    """The block exists but cannot be leased (not in the RAM arena); fetch it with a GET."""

    meta: WireMeta


LeaseEntry = Lease | Elsewhere | None


class ShmOffer(NamedTuple):
    """The server's RAM arena, offered to a same-host client: path plus identity to check it opened the same file."""

    path: str
    st_dev: int
    st_ino: int
    size: int


class ServerLimits(NamedTuple):
    max_body_bytes: int
    max_batch: int
    max_block_bytes: int
    max_payload_bytes: int
    max_reply_views: int = MAX_REPLY_VIEWS  # absent from servers that predate it


# --- frames: one NamedTuple per op -----------------------------------------------------------------------------------
class Hello(NamedTuple):
    request_id: int
    token: str | None
    client: dict[str, Any]  # host, boot_id, pid: used to decide whether shared memory is possible
    features: tuple[str, ...]  # "shm", "nixl"
    version: int = PROTOCOL_VERSION
    op: Literal["hello"] = "hello"


class RegisterModel(NamedTuple):
    request_id: int
    spec: dict[str, Any]  # ModelSpec.to_dict()
    op: Literal["register_model"] = "register_model"


class KeyRequest(NamedTuple):
    """lookup / exists / delete / pin / unpin: the same body, a model and a run of prefix hashes."""

    request_id: int
    kind: KeyOp
    model: ModelFingerprint
    hashes: tuple[PrefixHash, ...]
    op: Literal["keys"] = "keys"


class Get(NamedTuple):
    request_id: int
    model: ModelFingerprint
    hashes: tuple[PrefixHash, ...]
    chunks: int = 1  # >1: payload is chunk-major (chunk 0 of every block, then chunk 1, ...) for layer streaming
    op: Literal["get"] = "get"


class Put(NamedTuple):
    request_id: int
    model: ModelFingerprint
    items: tuple[PutItem, ...]
    payload_len: int
    op: Literal["put"] = "put"


class Stats(NamedTuple):
    request_id: int
    op: Literal["stats"] = "stats"


class LeaseRequest(NamedTuple):
    request_id: int
    model: ModelFingerprint
    hashes: tuple[PrefixHash, ...]
    op: Literal["lease"] = "lease"


class Release(NamedTuple):
    """One-way: the server sends no reply."""

    request_id: int
    lease_ids: tuple[int, ...]
    op: Literal["release"] = "release"


class NixlConnect(NamedTuple):
    request_id: int
    agent_metadata: bytes
    op: Literal["nixl_connect"] = "nixl_connect"


class HelloOk(NamedTuple):
    request_id: int
    tenant: str
    salt: bytes
    node_id: str
    limits: ServerLimits
    shm: ShmOffer | None
    nixl: bool
    version: int = PROTOCOL_VERSION
    op: Literal["hello_ok"] = "hello_ok"


class ModelOk(NamedTuple):
    request_id: int
    fingerprint: ModelFingerprint
    op: Literal["model_ok"] = "model_ok"


class LookupOk(NamedTuple):
    request_id: int
    tiers: tuple[TierId, ...]  # tier of each block of the leading matched run
    op: Literal["lookup_ok"] = "lookup_ok"


class Blocks(NamedTuple):
    request_id: int
    metas: tuple[WireMeta | None, ...]  # one per requested hash; payload holds the found ones, in order
    chunks: int
    payload_len: int
    op: Literal["blocks"] = "blocks"


class Count(NamedTuple):
    request_id: int
    count: int
    op: Literal["count"] = "count"


class Flags(NamedTuple):
    request_id: int
    flags: tuple[bool, ...]
    op: Literal["flags"] = "flags"


class StatsOk(NamedTuple):
    request_id: int
    stats: dict[str, Any]
    op: Literal["stats_ok"] = "stats_ok"


class Leases(NamedTuple):
    request_id: int
    entries: tuple[LeaseEntry, ...]
    op: Literal["leases"] = "leases"


class NixlOk(NamedTuple):
    request_id: int
    agent_metadata: bytes
    agent_name: str
    base_addr: int
    length: int
    op: Literal["nixl_ok"] = "nixl_ok"


class Error(NamedTuple):
    request_id: int
    code: str
    message: str
    op: Literal["error"] = "error"


Request = Hello | RegisterModel | KeyRequest | Get | Put | Stats | LeaseRequest | Release | NixlConnect
Response = HelloOk | ModelOk | LookupOk | Blocks | Count | Flags | StatsOk | Leases | NixlOk | Error
Frame = Request | Response


class FrameHeader(NamedTuple):
    op: int
    body_len: int
    request_id: int
    payload_len: int


# --- encoding --------------------------------------------------------------------------------------------------------
def _frame(op: int, request_id: int, body: list[Any], payload_len: int = 0) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, op, len(data), request_id, payload_len) + data


def _meta(m: WireMeta) -> list[Any]:
    return [m.parent, int(m.dtype), list(m.shape), m.token_count, m.created_ms]


def encode_hello(request_id: int, token: str | None, client: dict[str, Any], features: Sequence[str] = ()) -> bytes:
    return _frame(OP_HELLO, request_id, [PROTOCOL_VERSION, token, client, list(features)])


def encode_register_model(request_id: int, spec: dict[str, Any]) -> bytes:
    return _frame(OP_REGISTER_MODEL, request_id, [spec])


def encode_keys(request_id: int, kind: KeyOp, model: bytes, hashes: Sequence[bytes]) -> bytes:
    return _frame(_KEY_OP_CODES[kind], request_id, [model, list(hashes)])


def encode_get(request_id: int, model: bytes, hashes: Sequence[bytes], chunks: int = 1) -> bytes:
    return _frame(OP_GET, request_id, [model, list(hashes), chunks])


def encode_put(request_id: int, model: bytes, items: Sequence[PutItem]) -> bytes:
    """Header + body; the caller writes the items' payloads after it, in order."""
    payload_len = sum(it.meta.nbytes for it in items)
    return _frame(OP_PUT, request_id, [model, [[it.prefix, *_meta(it.meta)] for it in items]], payload_len)


def encode_stats(request_id: int) -> bytes:
    return _frame(OP_STATS, request_id, [])


def encode_lease(request_id: int, model: bytes, hashes: Sequence[bytes]) -> bytes:
    return _frame(OP_LEASE, request_id, [model, list(hashes)])


def encode_release(request_id: int, lease_ids: Sequence[int]) -> bytes:
    return _frame(OP_RELEASE, request_id, [list(lease_ids)])


def encode_nixl_connect(request_id: int, agent_metadata: bytes) -> bytes:
    return _frame(OP_NIXL_CONNECT, request_id, [agent_metadata])


def encode_hello_ok(
    request_id: int, tenant: str, salt: bytes, node_id: str, limits: Limits, shm: ShmOffer | None, nixl: bool
) -> bytes:
    lim = [limits.max_body_bytes, limits.max_batch, limits.max_block_bytes, limits.max_payload_bytes,
           limits.max_reply_views]
    return _frame(
        OP_HELLO_OK, request_id,
        [PROTOCOL_VERSION, tenant, salt, node_id, lim, list(shm) if shm is not None else None, nixl],
    )  # fmt: skip


def encode_model_ok(request_id: int, fingerprint: bytes) -> bytes:
    return _frame(OP_MODEL_OK, request_id, [fingerprint])


def encode_lookup_ok(request_id: int, tiers: Sequence[str]) -> bytes:
    return _frame(OP_LOOKUP_OK, request_id, [list(tiers)])


def encode_blocks(request_id: int, metas: Sequence[WireMeta | None], chunks: int = 1) -> bytes:
    """Header + body; the caller writes the found blocks' payloads after it (chunk-major when ``chunks > 1``)."""
    payload_len = sum(m.nbytes for m in metas if m is not None)
    return _frame(OP_BLOCKS, request_id, [[_meta(m) if m else None for m in metas], chunks], payload_len)


def encode_count(request_id: int, count: int) -> bytes:
    return _frame(OP_COUNT, request_id, [count])


def encode_flags(request_id: int, flags: Sequence[bool]) -> bytes:
    return _frame(OP_FLAGS, request_id, [list(flags)])


def encode_stats_ok(request_id: int, stats: dict[str, Any]) -> bytes:
    return _frame(OP_STATS_OK, request_id, [stats])


def encode_leases(request_id: int, entries: Sequence[LeaseEntry]) -> bytes:
    body: list[Any] = []
    for e in entries:
        if e is None:
            body.append(None)
        elif isinstance(e, Lease):
            body.append([e.lease_id, e.offset, _meta(e.meta)])
        else:
            body.append([0, 0, _meta(e.meta)])
    return _frame(OP_LEASES, request_id, [body])


def encode_nixl_ok(request_id: int, agent_metadata: bytes, agent_name: str, base_addr: int, length: int) -> bytes:
    return _frame(OP_NIXL_OK, request_id, [agent_metadata, agent_name, base_addr, length])


def encode_error(request_id: int, code: str, message: str) -> bytes:
    return _frame(OP_ERROR, request_id, [code, message])


# --- parsing ---------------------------------------------------------------------------------------------------------
def parse_header(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> FrameHeader:
    """Check and decode a 24-byte frame header; raises before the receiver allocates anything."""
    if len(data) < HEADER_BYTES:
        raise ParseError(f"frame header needs {HEADER_BYTES} bytes, got {len(data)}")
    magic, version, op, body_len, request_id, payload_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ParseError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ParseError(f"unsupported protocol version {version}, this peer speaks {PROTOCOL_VERSION}")
    if op not in _BODY_PARSERS:
        raise ParseError(f"unknown op code 0x{op:02x}")
    if limits.ops is not None and op not in limits.ops:
        raise OpNotAllowedError(op)
    if body_len > limits.max_body_bytes:
        raise FrameTooLargeError(body_len, limits.max_body_bytes, what="frame body bytes")
    if payload_len > limits.max_payload_bytes:
        raise FrameTooLargeError(payload_len, limits.max_payload_bytes, what="frame payload bytes")
    if payload_len and op not in (OP_PUT, OP_BLOCKS):
        raise ParseError(f"op 0x{op:02x} carries no payload, header says {payload_len} bytes")
    return FrameHeader(op, body_len, request_id, payload_len)


def parse_body(header: FrameHeader, body: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Frame:
    """Decode and validate the body of a frame whose header :func:`parse_header` accepted."""
    if len(body) != header.body_len:
        raise ParseError(f"body is {len(body)} bytes, header says {header.body_len}")
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ParseError(f"malformed msgpack body for op 0x{header.op:02x}: {exc}") from exc
    if not isinstance(fields, list):
        raise ParseError(f"body of op 0x{header.op:02x} must be an array")
    try:
        frame = _BODY_PARSERS[header.op](header, fields, limits)
    except ParseError:
        raise
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ParseError(f"invalid body for op 0x{header.op:02x}: {exc}") from exc
    return frame


class Reader(Protocol):
    """What :func:`read_frame` needs: ``asyncio.StreamReader`` satisfies it."""

    async def readexactly(self, n: int) -> bytes: ...


async def read_frame(reader: Reader, limits: Limits = Limits()) -> Frame:
    """Read one frame's header and body. The caller then consumes ``payload_len`` bytes (Put, Blocks)."""
    header = parse_header(await reader.readexactly(HEADER_BYTES), limits)
    return parse_body(header, await reader.readexactly(header.body_len), limits)


def payload_len(frame: Frame) -> int:
    return frame.payload_len if isinstance(frame, Put | Blocks) else 0


# --- field checkers --------------------------------------------------------------------------------------------------
def _arity(fields: list[Any], n: int, name: str) -> None:
    if len(fields) != n:
        raise ParseError(f"{name} body has {len(fields)} fields, expected {n}")


def _int(v: Any, name: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ParseError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(v: Any, name: str, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise ParseError(f"{name} must be a string")
    return v


def _bin(v: Any, name: str, n: int | None = None) -> bytes:
    if not isinstance(v, bytes) or (n is not None and len(v) != n):
        raise ParseError(f"{name} must be {n if n is not None else 'some'} raw bytes")
    return v


def _map(v: Any, name: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise ParseError(f"{name} must be a map")
    return v


def _list(v: Any, name: str, limits: Limits, header: FrameHeader) -> list[Any]:
    if not isinstance(v, list):
        raise ParseError(f"{name} must be an array")
    if len(v) > limits.max_batch:
        raise RequestLimitError(f"{name} count (max_batch)", len(v), limits.max_batch, header)
    return v


def _hashes(v: Any, limits: Limits, header: FrameHeader) -> tuple[PrefixHash, ...]:
    return tuple(PrefixHash(_bin(h, "prefix hash", HASH_BYTES)) for h in _list(v, "hashes", limits, header))


def _parse_meta(v: Any, limits: Limits, header: FrameHeader) -> WireMeta:
    if not isinstance(v, list) or len(v) != 5:
        raise ParseError("block meta must be [parent, dtype, shape, token_count, created_ms]")
    parent, dtype, shape, tokens, created = v
    try:
        dt = DType(_int(dtype, "dtype", 0, 255))
    except ValueError:
        raise ParseError(f"unknown dtype code {dtype}") from None
    if not isinstance(shape, list) or not 0 < len(shape) <= MAX_NDIM:
        raise ParseError(f"shape must have 1..{MAX_NDIM} dims")
    meta = WireMeta(
        PrefixHash(_bin(parent, "parent hash", HASH_BYTES)), dt,
        tuple(_int(d, "shape dim", 0, 0xFFFFFFFF) for d in shape),
        _int(tokens, "token_count", 0, 0xFFFFFFFF), _int(created, "created_ms"),
    )  # fmt: skip
    if meta.nbytes > limits.max_block_bytes:
        raise RequestLimitError("block bytes (max_block_bytes)", meta.nbytes, limits.max_block_bytes, header)
    return meta


def _check_payload(header: FrameHeader, metas: Sequence[WireMeta | None]) -> None:
    expected = sum(m.nbytes for m in metas if m is not None)
    if expected != header.payload_len:
        raise ParseError(f"payload_len {header.payload_len} does not match the blocks' {expected} bytes")


def _p_hello(h: FrameHeader, f: list[Any], lim: Limits) -> Hello:
    _arity(f, 4, "hello")
    version = _int(f[0], "version")
    if version != PROTOCOL_VERSION:
        raise ParseError(f"client speaks protocol {version}, server {PROTOCOL_VERSION}")
    client = _map(f[2], "hello client info")
    features = tuple(_str(x, "feature") for x in _list(f[3], "features", lim, h))
    return Hello(h.request_id, _str(f[1], "token", optional=True), client, features, version)


def _p_register(h: FrameHeader, f: list[Any], lim: Limits) -> RegisterModel:
    _arity(f, 1, "register_model")
    return RegisterModel(h.request_id, _map(f[0], "model spec"))


def _p_keys(h: FrameHeader, f: list[Any], lim: Limits) -> KeyRequest:
    _arity(f, 2, "key request")
    model = ModelFingerprint(_bin(f[0], "model fingerprint", HASH_BYTES))
    return KeyRequest(h.request_id, _KEY_OPS[h.op], model, _hashes(f[1], lim, h))


def _p_get(h: FrameHeader, f: list[Any], lim: Limits) -> Get:
    _arity(f, 3, "get")
    model = ModelFingerprint(_bin(f[0], "model fingerprint", HASH_BYTES))
    hashes, chunks = _hashes(f[1], lim, h), _int(f[2], "chunks", 1, 1 << 16)
    if len(hashes) * chunks > lim.max_reply_views:  # each (block, chunk) is one view the server cuts and sends
        raise RequestLimitError("hashes x chunks (max_reply_views)", len(hashes) * chunks, lim.max_reply_views, h)
    return Get(h.request_id, model, hashes, chunks)


def _p_put(h: FrameHeader, f: list[Any], lim: Limits) -> Put:
    _arity(f, 2, "put")
    model = ModelFingerprint(_bin(f[0], "model fingerprint", HASH_BYTES))
    items = []
    for it in _list(f[1], "put items", lim, h):
        if not isinstance(it, list) or len(it) != 6:
            raise ParseError("put item must be [prefix, parent, dtype, shape, token_count, created_ms]")
        items.append(PutItem(PrefixHash(_bin(it[0], "prefix hash", HASH_BYTES)), _parse_meta(it[1:], lim, h)))
    _check_payload(h, [it.meta for it in items])
    return Put(h.request_id, model, tuple(items), h.payload_len)


def _p_stats(h: FrameHeader, f: list[Any], lim: Limits) -> Stats:
    _arity(f, 0, "stats")
    return Stats(h.request_id)


def _p_lease(h: FrameHeader, f: list[Any], lim: Limits) -> LeaseRequest:
    _arity(f, 2, "lease")
    model = ModelFingerprint(_bin(f[0], "model fingerprint", HASH_BYTES))
    return LeaseRequest(h.request_id, model, _hashes(f[1], lim, h))


def _p_release(h: FrameHeader, f: list[Any], lim: Limits) -> Release:
    _arity(f, 1, "release")
    return Release(h.request_id, tuple(_int(x, "lease id", 1) for x in _list(f[0], "lease ids", lim, h)))


def _p_nixl_connect(h: FrameHeader, f: list[Any], lim: Limits) -> NixlConnect:
    _arity(f, 1, "nixl_connect")
    return NixlConnect(h.request_id, _bin(f[0], "agent metadata"))


def _p_hello_ok(h: FrameHeader, f: list[Any], lim: Limits) -> HelloOk:
    _arity(f, 7, "hello_ok")
    version, tenant, salt, node, limits, shm, nixl = f
    if not isinstance(limits, list) or len(limits) not in (4, 5):
        raise ParseError("limits must be [max_body, max_batch, max_block, max_payload(, max_reply_views)]")
    server_limits = ServerLimits(*(_int(x, "limit") for x in limits))
    offer = None
    if shm is not None:
        if not isinstance(shm, list) or len(shm) != 4:
            raise ParseError("shm offer must be [path, st_dev, st_ino, size]")
        offer = ShmOffer(_str(shm[0], "shm path"), *(_int(x, "shm identity") for x in shm[1:]))
    return HelloOk(
        h.request_id, _str(tenant, "tenant"), _bin(salt, "salt"), _str(node, "node id"), server_limits, offer,
        bool(nixl), _int(version, "version"),
    )  # fmt: skip


def _p_model_ok(h: FrameHeader, f: list[Any], lim: Limits) -> ModelOk:
    _arity(f, 1, "model_ok")
    return ModelOk(h.request_id, ModelFingerprint(_bin(f[0], "fingerprint", HASH_BYTES)))


def _p_lookup_ok(h: FrameHeader, f: list[Any], lim: Limits) -> LookupOk:
    _arity(f, 1, "lookup_ok")
    return LookupOk(h.request_id, tuple(TierId(_str(t, "tier")) for t in _list(f[0], "tiers", lim, h)))


def _p_blocks(h: FrameHeader, f: list[Any], lim: Limits) -> Blocks:
    _arity(f, 2, "blocks")
    metas = tuple(None if m is None else _parse_meta(m, lim, h) for m in _list(f[0], "block metas", lim, h))
    chunks = _int(f[1], "chunks", 1, 1 << 16)
    if any(m is not None and m.nbytes % chunks for m in metas):
        raise ParseError(f"block sizes are not divisible into {chunks} chunks")
    _check_payload(h, metas)
    return Blocks(h.request_id, metas, chunks, h.payload_len)


def _p_count(h: FrameHeader, f: list[Any], lim: Limits) -> Count:
    _arity(f, 1, "count")
    return Count(h.request_id, _int(f[0], "count"))


def _p_flags(h: FrameHeader, f: list[Any], lim: Limits) -> Flags:
    _arity(f, 1, "flags")
    flags = _list(f[0], "flags", lim, h)
    if not all(isinstance(x, bool) for x in flags):
        raise ParseError("flags must be booleans")
    return Flags(h.request_id, tuple(flags))


def _p_stats_ok(h: FrameHeader, f: list[Any], lim: Limits) -> StatsOk:
    _arity(f, 1, "stats_ok")
    return StatsOk(h.request_id, _map(f[0], "stats"))


def _p_leases(h: FrameHeader, f: list[Any], lim: Limits) -> Leases:
    _arity(f, 1, "leases")
    entries: list[LeaseEntry] = []
    for e in _list(f[0], "lease entries", lim, h):
        if e is None:
            entries.append(None)
            continue
        if not isinstance(e, list) or len(e) != 3:
            raise ParseError("lease entry must be nil or [lease_id, offset, meta]")
        lease_id, offset, meta = _int(e[0], "lease id"), _int(e[1], "offset"), _parse_meta(e[2], lim, h)
        entries.append(Lease(lease_id, offset, meta) if lease_id else Elsewhere(meta))
    return Leases(h.request_id, tuple(entries))


def _p_nixl_ok(h: FrameHeader, f: list[Any], lim: Limits) -> NixlOk:
    _arity(f, 4, "nixl_ok")
    return NixlOk(
        h.request_id, _bin(f[0], "agent metadata"), _str(f[1], "agent name"), _int(f[2], "base address"),
        _int(f[3], "length"),
    )  # fmt: skip


def _p_error(h: FrameHeader, f: list[Any], lim: Limits) -> Error:
    _arity(f, 2, "error")
    return Error(h.request_id, _str(f[0], "error code"), _str(f[1], "error message"))


_BODY_PARSERS: Final[dict[int, Any]] = {
    OP_HELLO: _p_hello, OP_REGISTER_MODEL: _p_register, OP_LOOKUP: _p_keys, OP_GET: _p_get, OP_PUT: _p_put,
    OP_EXISTS: _p_keys, OP_DELETE: _p_keys, OP_PIN: _p_keys, OP_UNPIN: _p_keys, OP_STATS: _p_stats,
    OP_LEASE: _p_lease, OP_RELEASE: _p_release, OP_NIXL_CONNECT: _p_nixl_connect,
    OP_HELLO_OK: _p_hello_ok, OP_MODEL_OK: _p_model_ok, OP_LOOKUP_OK: _p_lookup_ok, OP_BLOCKS: _p_blocks,
    OP_COUNT: _p_count, OP_FLAGS: _p_flags, OP_STATS_OK: _p_stats_ok, OP_LEASES: _p_leases,
    OP_NIXL_OK: _p_nixl_ok, OP_ERROR: _p_error,
}  # fmt: skip
