"""The data-plane server: one asyncio process serving the frame protocol over TCP (optionally TLS).

Per connection a ``BufferedProtocol`` parses pipelined frames (zero-copy receive: a PUT's payload lands in RAM
arena extents reserved for it, which the put adopts, or in buffers where RAM has no room). GET and LEASE
of blocks in the RAM arena, and puts into a RAM-only store, are answered inside the callback (no I/O involved);
everything that may touch the disk or object tier runs as a task through ``asyncio.to_thread``. Responses go out
with one ``writelines`` from the store's own memory. RAM-arena blocks are sent from a lease, so a block on the wire
is never evicted or overwritten before the kernel has taken every byte: the lease is released once the transport's
write buffer holds only the response's copied tail (see ``TAIL_COPY_BYTES``).

Error handling: a frame that cannot be parsed, is over a size limit in its header, or arrives before a successful
HELLO gets an ERROR frame and the connection is closed (the byte stream cannot be trusted any more). A well-formed
request that fails (unknown model, invalid block, over a request limit, missing scope, store error) gets an ERROR
frame with its request id and the connection carries on.

Bounded resources: before HELLO a connection may send one small frame (``PRE_AUTH_LIMITS``) into a 4 KiB buffer,
within ``handshake_timeout_s``; connections are limited in total (and below the descriptor limit, keeping
``fd_reserve`` for the store) and per peer address; a started frame that stops arriving is dropped after
``frame_timeout_s``, an idle connection after ``idle_timeout_s``. PUT payload buffers count against a per-connection
and a node-wide budget of bytes in flight: a PUT that does not fit waits (its connection stops reading) until
earlier ones finish. Fairness: work proportional to a request's size (many keys, many reply views, large RAM puts)
runs in a worker thread, each connection has at most ``threads_per_connection`` requests in threads at a time (so
the shared pool serves connections in turn), and a connection with ``max_requests_per_connection`` requests in
progress stops being read until some finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Final, Protocol, TypeVar

import numpy as np

from kvfabric.errors import (
    AuthError,
    BlockTooLargeError,
    FrameTooLargeError,
    InvalidBlockError,
    LimitExceededError,
    ProtocolError,
    ScopeError,
    StoreError,
    TierFullError,
    UnknownModelError,
)
from kvfabric.ids import BlockKey, ModelFingerprint, PrefixHash, TierId
from kvfabric.record import Block, BlockMeta, now_ms
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr
from kvfabric.transport import shm
from kvfabric.transport.budget import ByteBudget
from kvfabric.transport.auth import Authenticator, Scope, Tenant, TokenGrant
from kvfabric.transport.nixl import NixlServerEndpoint, load_api, server_endpoint
from kvfabric.transport.receiver import DEFER, FrameReceiver

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_LEASES_PER_CONNECTION = 65536
TAIL_COPY_BYTES = 64 << 10
"""The last bytes of a leased response are sent from a copy and the write high-water mark is this size, so
whenever the transport holds no more than this many bytes, none of them are in the arena; above it, the transport
calls resume_writing() once everything is sent (low-water mark 0)."""
PRE_AUTH_LIMITS = fr.Limits(max_body_bytes=8 << 10, max_batch=16, max_block_bytes=0, max_payload_bytes=0,
                            max_reply_views=0, ops=frozenset({fr.OP_HELLO}))  # fmt: skip
"""What a connection may send before its HELLO succeeds: one HELLO (token, client info, a few features)."""
PRE_AUTH_CONTROL_BYTES = 4 << 10
CONTROL_BYTES = 64 << 10
"""A connection's receive buffer for headers and bodies once authenticated (payloads bypass it)."""
INLINE_KEYS = 256
"""A GET naming more keys than this is served from a worker thread, not inside the event loop's callback."""
INLINE_VIEWS = 1024
"""Likewise for a GET whose reply is cut into more views (hashes x chunks) than this."""
GATHER_MAX_BYTES = 16 << 20
"""A chunked reply cut into more than ``INLINE_VIEWS`` views and at most this large is copied chunk-major into one
buffer (one strided copy per block) rather than sent as a view per chunk: tens of thousands of small views cost
far more, in CPU held under the GIL, than copying their bytes."""
INLINE_PUT_BYTES = 4 << 20
"""A RAM-only put larger than this copies into the arena in a worker thread."""
FATAL_FLUSH_S = 5.0
"""How long a connection closed for an error may take to read its ERROR frame before it is aborted."""


class StoreLease(Protocol):
    meta: BlockMeta
    offset: int
    nbytes: int


class PutReservation(Protocol):
    """An arena extent a PUT's payload is received into (``kvfabric.store.memory.Reservation``)."""

    view: memoryview


class FabricStore(Protocol):
    """The part of ``kvfabric.store.tiered.TieredStore`` the server uses."""

    @property
    def arena_path(self) -> str | None: ...
    def register_model(
        self, spec: ModelSpec, *, owner: str | None = None, max_per_owner: int | None = None
    ) -> ModelFingerprint: ...
    def model(self, fingerprint: ModelFingerprint) -> ModelSpec | None: ...
    def put_many(self, blocks: Sequence[Block]) -> None: ...
    def get(self, key: BlockKey) -> Block | None: ...
    def head(self, key: BlockKey) -> tuple[BlockMeta, TierId] | None: ...
    def lookup(self, keys: Sequence[BlockKey]) -> list[TierId | None]: ...
    def delete_many(self, keys: Sequence[BlockKey]) -> int: ...
    def pin(self, key: BlockKey) -> Any: ...
    def unpin(self, key: BlockKey) -> Any: ...
    def acquire(self, key: BlockKey, *, promote: bool = True) -> StoreLease | None: ...
    def release(self, lease: Any) -> None: ...
    def reserve_ram(self, nbytes: int) -> PutReservation | None: ...
    def reserve_ram_run(self, sizes: list[int]) -> tuple[memoryview, list[PutReservation]] | None: ...
    def cancel_reservation(self, reservation: Any) -> bool: ...
    def tier_stats(self) -> dict[TierId, Any]: ...
    @property
    def tiers(self) -> list[TierId]: ...


class LatencyObserver(Protocol):
    """Receives per-request latencies (``kvfabric.api.metrics.Metrics`` is one); the server never imports
    prometheus. ``tier`` is where the request was served: ``ram``, ``lower`` (a tier below RAM), or ``miss``."""

    def observe_get(self, tier: str, seconds: float) -> None: ...

    def observe_put(self, tier: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9500
    server_secret: bytes = b""
    tokens: dict[str, str | TokenGrant] = field(default_factory=dict)  # bearer token -> tenant; empty = auth off
    limits: fr.Limits = fr.Limits()
    ssl: ssl.SSLContext | None = None
    node_id: str = "local"
    nixl: bool = True  # register the arena with NIXL when the library is available
    max_leases_per_connection: int = MAX_LEASES_PER_CONNECTION
    handshake_timeout_s: float = 10.0  # from accept to a successful HELLO; 0 = none
    frame_timeout_s: float = 60.0  # a started frame whose bytes stop arriving for this long is dropped; 0 = none
    idle_timeout_s: float = 900.0  # a connection with nothing in progress and no leases for this long; 0 = none
    max_connections: int = 4096  # further capped by the descriptor limit less fd_reserve
    max_connections_per_peer: int = 512  # per peer address
    fd_reserve: int = 256  # descriptors kept for the store (segments, RocksDB, the arena)
    max_inflight_bytes: int = 2 << 30  # PUT payload buffers held, node-wide
    max_inflight_bytes_per_connection: int = 0  # 0: limits.max_payload_bytes (one largest PUT at a time)
    max_requests_per_connection: int = 64  # requests in progress before the connection stops being read
    threads_per_connection: int = 2  # requests of one connection in worker threads at a time
    max_models_per_tenant: int = 64  # models one tenant may register


@dataclass(slots=True)
class ServerCounters:
    connections: int = 0
    connections_open: int = 0
    requests: int = 0
    errors: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    refused_connections: int = 0
    timeouts: int = 0
    inflight_bytes: int = 0
    put_waits: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    leases_outstanding: int = 0


def _wire(meta: BlockMeta) -> fr.WireMeta:
    return fr.WireMeta(meta.parent, meta.dtype, tuple(meta.shape), meta.token_count, meta.created_ms)


def _error_code(exc: BaseException) -> str:
    match exc:
        case ScopeError():
            return "forbidden"
        case AuthError():
            return "auth"
        case UnknownModelError():
            return "unknown_model"
        case BlockTooLargeError():
            return "block_too_large"
        case InvalidBlockError():
            return "invalid_block"
        case FrameTooLargeError():
            return "frame_too_large"
        case LimitExceededError():
            return "limit"
        case ProtocolError():
            return "protocol"
        case TierFullError():
            return "tier_full"
        case StoreError():
            return "store"
        case _:
            return "internal"


class FabricServer:
    """Serves ``store`` on ``config.host:config.port``; ``start()`` binds, ``close()`` stops and releases leases."""

    def __init__(self, store: FabricStore, config: ServerConfig, *, observer: LatencyObserver | None = None) -> None:
        if not config.server_secret:
            raise ValueError("ServerConfig.server_secret must be set (see kvfabric.keying.resolve_secret)")
        self.store = store
        self.config = config
        self.observer = observer
        self.auth = Authenticator(config.server_secret, config.tokens)
        self.counters = ServerCounters()
        self.arena: shm.ArenaMap | None = None
        self.nixl: NixlServerEndpoint | None = None
        self.nixl_offered = False  # NIXL importable and not failed: HELLO offers it, the endpoint starts on demand
        self.has_lower_tiers = len(store.tiers) > 1  # RAM misses may be found (with I/O) below RAM
        self._nixl_lock = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._per_peer: dict[str, int] = {}
        self.inflight = ByteBudget(config.max_inflight_bytes)
        self.inflight_per_connection = config.max_inflight_bytes_per_connection or config.limits.max_payload_bytes
        if self.inflight_per_connection > config.max_inflight_bytes:
            raise ValueError(
                f"max_inflight_bytes ({config.max_inflight_bytes}) is below one connection's in-flight budget "
                f"({self.inflight_per_connection}): no PUT of that size could ever start"
            )
        self.max_connections = config.max_connections
        self._sweeper: asyncio.Task[None] | None = None
        self.port = config.port

    async def start(self) -> None:
        path = self.store.arena_path
        if path:
            self.arena = shm.ArenaMap(path)
            if self.config.nixl:
                api, why = load_api()
                self.nixl_offered = api is not None
                if api is None:
                    log.info("NIXL transport unavailable (%s); clients will use TCP", why)
        self.max_connections = min(self.config.max_connections, _descriptor_room(self.config.fd_reserve))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.config.host, self.config.port, ssl=self.config.ssl, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep(), name="kvfabric-connection-deadlines")
        log.info(
            "kvfabric data plane on %s:%d (tls %s, auth %s, shm %s, nixl %s)", self.config.host, self.port,
            "on" if self.config.ssl else "off", "on" if self.auth.enabled else "off",
            path or "off", "on demand" if self.nixl_offered else "off",
        )  # fmt: skip

    async def nixl_endpoint(self) -> NixlServerEndpoint | None:
        """The NIXL endpoint, started by the first client that asks: a NIXL agent runs a UCX progress thread that
        polls without pause, which would take CPU from every TCP transfer on a server no NIXL client uses."""
        async with self._nixl_lock:
            if self.nixl is None and self.nixl_offered:
                self.nixl = await asyncio.to_thread(server_endpoint, self.arena)
                self.nixl_offered = self.nixl is not None
            return self.nixl

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    async def _sweep(self) -> None:
        """Enforce the handshake, frame and idle deadlines; one pass over the connections a tick."""
        cfg = self.config
        deadlines = [t for t in (cfg.handshake_timeout_s, cfg.frame_timeout_s, cfg.idle_timeout_s) if t > 0]
        if not deadlines:
            return
        tick = min(1.0, max(0.02, min(deadlines) / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.check_deadlines(now)

    def admit(self, conn: _Connection) -> str | None:
        """Count ``conn`` in; the reason it is refused (too many connections), or None."""
        n_peer = self._per_peer.get(conn.peer_host, 0)
        if len(self._connections) >= self.max_connections:
            return f"the server holds its limit of {self.max_connections} connections; try again later"
        if n_peer >= self.config.max_connections_per_peer:
            return (f"{conn.peer_host} holds its limit of {self.config.max_connections_per_peer} connections; "
                    "close some first")  # fmt: skip
        self._connections.add(conn)
        self._per_peer[conn.peer_host] = n_peer + 1
        return None

    def discharge(self, conn: _Connection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            left = self._per_peer.get(conn.peer_host, 1) - 1
            if left > 0:
                self._per_peer[conn.peer_host] = left
            else:
                self._per_peer.pop(conn.peer_host, None)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)  # let connection_lost callbacks release their leases
        if self.nixl is not None:
            self.nixl.close()
            self.nixl = None
        self.arena = None  # views may still be referenced by in-flight tasks; the GC unmaps it

    def stats(self, tenant: Tenant) -> dict[str, Any]:
        out: dict[str, Any] = {"tenant": tenant.name, "node_id": self.config.node_id}
        if tenant.node_wide:  # node-wide totals would let one tenant watch another's activity: "*" tokens only
            out["server"] = asdict(self.counters)
            out["tiers"] = {t: asdict(s) if is_dataclass(s) else s for t, s in self.store.tier_stats().items()}
        return out


@dataclass(slots=True)
class _Outgoing:
    """A response ready for ``writelines``: header, then payload views (a leased reply's tail as one copy)."""

    views: list[bytes | memoryview]
    head_len: int
    total: int  # payload bytes
    copy_from: int  # payload offset from which the views hold copies, not arena memory


def _plan(head: bytes, payload: Sequence[memoryview], leased: bool) -> _Outgoing:
    """Frame ``payload`` behind ``head``. For a reply from arena leases the last ``TAIL_COPY_BYTES`` are copied, so
    once the transport holds no more than that, no arena byte is still waiting to be sent. Pure: runs in a worker
    thread for a large reply."""
    total = sum(len(p) for p in payload)
    if not leased:
        return _Outgoing([head, *payload], len(head), total, total)
    copy_from = max(0, total - TAIL_COPY_BYTES)
    pos, views, tail = 0, [head], []
    for p in payload:
        cut = min(len(p), max(0, copy_from - pos))
        if cut:
            views.append(p if cut == len(p) else p[:cut])
        if cut < len(p):
            tail.append(p[cut:])
        pos += len(p)
    if tail:
        views.append(b"".join(tail))
    return _Outgoing(views, len(head), total, copy_from)


def _reply_views(
    arena: shm.ArenaMap | None, frame: fr.Get, leases: Sequence[StoreLease | None], blocks: dict[int, Block]
) -> tuple[bytes, list[memoryview], bool]:
    """The BLOCKS reply to ``frame``: its header and body, its payload views (chunk-major when chunked), and whether
    they are a copy (then the blocks' leases may go before it is sent)."""
    views: list[memoryview] = []
    metas: list[fr.WireMeta | None] = []
    for i, lease in enumerate(leases):
        if lease is not None:
            views.append(arena.view(lease.offset, lease.nbytes))  # type: ignore[union-attr]
            metas.append(_wire(lease.meta))
        elif (block := blocks.get(i)) is not None:
            views.append(memoryview(block.payload).cast("B"))
            metas.append(_wire(block.meta))
        else:
            metas.append(None)
    chunks = frame.chunks
    if chunks > 1:
        if any(len(v) % chunks for v in views):
            raise InvalidBlockError(f"a requested block does not split into {chunks} equal chunks")
        views, copied = _chunk_major(views, chunks)
    else:
        copied = False
    return fr.encode_blocks(frame.request_id, metas, chunks), views, copied


def _chunk_major(views: list[memoryview], chunks: int) -> tuple[list[memoryview], bool]:
    """Chunk 0 of every view, then chunk 1, ...: as one gathered copy when there are many small chunks of equal
    blocks (see ``GATHER_MAX_BYTES``), else as views into the blocks."""
    size = len(views[0]) if views else 0
    total = size * len(views)
    if len(views) * chunks > INLINE_VIEWS and total <= GATHER_MAX_BYTES and all(len(v) == size for v in views):
        out = np.empty((chunks, len(views), size // chunks), dtype=np.uint8)
        for i, v in enumerate(views):
            out[:, i, :] = np.frombuffer(v, dtype=np.uint8).reshape(chunks, size // chunks)
        return [memoryview(out.reshape(-1))], True
    return [v[c * (len(v) // chunks) : (c + 1) * (len(v) // chunks)] for c in range(chunks) for v in views], False


def _descriptor_room(reserve: int) -> int:
    """How many more descriptors connections may take, keeping ``reserve`` for the store. Raises the soft limit
    to the hard one first (the usual low default of 1024 is far below what a server needs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64  # not Linux: a guess at what the process holds
    return max(1, soft - open_now - reserve)


_WRITE_OPS: Final = frozenset({"delete", "pin", "unpin"})


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: FabricServer) -> None:
        self.server = server
        self.store = server.store
        self.counters = server.counters
        self.transport: asyncio.Transport | None = None
        self.tenant: Tenant | None = None
        self.peer: object = None
        self.peer_host = "?"
        # Until HELLO succeeds: one small frame into a small buffer (see PRE_AUTH_LIMITS).
        self.receiver = FrameReceiver(
            PRE_AUTH_LIMITS, self._on_frame, self._on_payload_done, on_reject=self._on_reject,
            control_bytes=PRE_AUTH_CONTROL_BYTES,
        )  # fmt: skip
        self.closed = False
        self.tls = False
        self.connected_at = self.last_received = self.last_active = time.monotonic()
        self._put_buffers: dict[int, list[memoryview]] = {}  # request id -> buffers its payload lands in
        self._put_reserved: dict[int, list[PutReservation]] = {}  # request id -> its arena extents (the buffers)
        self._put_errors: dict[int, Exception] = {}
        self._put_bytes: dict[int, int] = {}  # request id -> in-flight bytes it holds of both budgets
        self._own_budget = ByteBudget(server.inflight_per_connection)
        self._waiting_put: tuple[ByteBudget, Any] | None = None  # a PUT's wait for budget: which, and the handle
        self._client_leases: dict[int, StoreLease] = {}  # shm/NIXL leases the client holds
        self._next_lease = 1
        self._sending_leases: list[tuple[int, list[StoreLease]]] = []  # (stream offset of arena end, leases)
        self._written = 0  # bytes handed to the transport
        self._tasks: set[asyncio.Task[None]] = set()
        self._threads = asyncio.Semaphore(server.config.threads_per_connection)
        self._paused_for: set[str] = set()  # why reading is paused: "write", "put", "requests"
        self._drain: memoryview | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TLS encrypts payloads into its own buffers (we hand it copies); for plain TCP the transport sends from our
        # memory, and a high-water mark of 0 makes resume_writing() mean "everything written was sent".
        self.tls = transport.get_extra_info("sslcontext") is not None
        if not self.tls:
            transport.set_write_buffer_limits(high=TAIL_COPY_BYTES, low=0)
        self.peer = transport.get_extra_info("peername")
        self.peer_host = str(self.peer[0]) if isinstance(self.peer, tuple) and self.peer else str(self.peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counters.connections += 1
        refusal = self.server.admit(self)
        if refusal is not None:  # the ERROR, then the descriptor back at once: no lingering while overloaded
            self.counters.refused_connections += 1
            self._fatal("busy", refusal, linger=False)
            return
        self.counters.connections_open += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closed:  # draining what a peer sends after a fatal error
            if self._drain is None:
                self._drain = memoryview(bytearray(PRE_AUTH_CONTROL_BYTES))
            return self._drain
        return self.receiver.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.counters.bytes_received += nbytes
        self.last_received = self.last_active = time.monotonic()
        self._guarded(self.receiver.buffer_updated, nbytes)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run receiver work; a bad stream closes the connection with an ERROR frame."""
        try:
            fn(*args)
        except fr.OpNotAllowedError as exc:  # only HELLO is accepted before a successful HELLO
            self.counters.auth_failures += 1
            self._fatal("auth", f"the first frame must be HELLO with a valid token ({exc})")
        except AuthError as exc:
            self.counters.auth_failures += 1
            self._fatal(_error_code(exc), str(exc))
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            self._fatal(_error_code(exc), str(exc))

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        self._pause("write")  # backpressure: no new requests while responses are queued

    def resume_writing(self) -> None:
        self._release_sending(everything=True)  # low-water mark 0: the write buffer is empty
        self._resume("write")

    def _pause(self, why: str) -> None:
        if not self._paused_for and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused_for.add(why)

    def _resume(self, why: str) -> None:
        if why not in self._paused_for:
            return
        self._paused_for.discard(why)
        if not self._paused_for and self.transport is not None and not self.closed:
            self.last_received = time.monotonic()  # the frame deadline counts from here, not from the pause
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server._connections:
            self.counters.connections_open -= 1
        self.closed = True
        self.server.discharge(self)
        self._release_sending(everything=True)
        for lease in self._client_leases.values():
            self._release(lease)
        self._client_leases.clear()
        if self._waiting_put is not None:
            budget, waiter = self._waiting_put
            budget.cancel(waiter)
            self._waiting_put = None
        for request_id in list(self._put_buffers):  # payloads that were still arriving; running puts give their own
            self._give_put_bytes(request_id)
            self._cancel_reserved(request_id)
        self._put_buffers.clear()
        self._put_errors.clear()
        self.receiver.close()  # no more references from the receiver back to this connection
        if self._abort_timer is not None:  # the timer would keep the transport (and this) alive until it fires
            self._abort_timer.cancel()
            self._abort_timer = None
        self._drain = None
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def check_deadlines(self, now: float) -> None:
        """Called about once a second by the server: drop a connection that overstays a deadline."""
        cfg = self.server.config
        if self.closed or self.transport is None:
            return
        if self.tenant is None:
            if cfg.handshake_timeout_s and now - self.connected_at > cfg.handshake_timeout_s:
                self.counters.timeouts += 1
                self._fatal("timeout", f"no successful HELLO within {cfg.handshake_timeout_s:g} s of connecting")
            return
        receiving = not self.receiver.idle and not self._paused_for  # a stall of our own making does not count
        if receiving and cfg.frame_timeout_s and now - self.last_received > cfg.frame_timeout_s:
            self.counters.timeouts += 1
            self._fatal("timeout", f"a frame was started but no byte of it arrived for {cfg.frame_timeout_s:g} s")
            return
        quiet = (self.receiver.idle and not self._tasks and not self._client_leases and not self._sending_leases
                 and self.transport.get_write_buffer_size() == 0)  # fmt: skip
        if quiet and cfg.idle_timeout_s and now - self.last_active > cfg.idle_timeout_s:
            self.counters.timeouts += 1
            log.info("closing connection from %s: idle for %g s", self.peer, cfg.idle_timeout_s)
            self.closed = True
            self.transport.close()

    # --- frames in -----------------------------------------------------------------------------------------------
    def _on_reject(self, exc: fr.RequestLimitError) -> None:
        """A well-formed request over a limit: an ERROR for it, and its payload skipped by the receiver."""
        if self.tenant is None:
            raise AuthError(f"the first frame must be a HELLO within the pre-authentication limits: {exc}")
        self.counters.requests += 1
        self._send_error(exc.request_id, exc)

    def _on_frame(self, frame: fr.Frame) -> Sequence[memoryview] | object | None:
        if self.tenant is None and not isinstance(frame, fr.Hello):
            raise AuthError("the first frame must be HELLO with a valid token")
        if not isinstance(frame, fr.Put):
            return None
        try:
            self._check_scope("write", "put")
            if frame.payload_len > self.server.inflight_per_connection:
                raise FrameTooLargeError(frame.payload_len, self.server.inflight_per_connection,
                                         what="put payload bytes (in-flight budget of a connection)")  # fmt: skip
        except (ScopeError, FrameTooLargeError) as exc:
            self._put_errors[frame.request_id] = exc
            return None  # the payload is read and dropped; the reply is the error
        if frame.payload_len == 0:
            return self._put_segments(frame)
        granted = [False]

        def own_granted() -> None:
            waiter = self.server.inflight.take(frame.payload_len, global_granted)
            if waiter is None:
                global_granted()
            else:
                self._waiting_put = (self.server.inflight, waiter)

        def global_granted() -> None:
            self._put_bytes[frame.request_id] = frame.payload_len
            self.counters.inflight_bytes = self.server.inflight.used
            if self._waiting_put is None:
                granted[0] = True  # at once: the caller returns the buffers
            else:
                self._waiting_put = None
                self._resume_put(frame)

        waiter = self._own_budget.take(frame.payload_len, own_granted)
        if waiter is None:
            own_granted()
        else:
            self._waiting_put = (self._own_budget, waiter)
        if granted[0]:
            return self._put_segments(frame)
        self.counters.put_waits += 1
        self._pause("put")
        return DEFER

    def _put_segments(self, frame: fr.Put) -> list[memoryview] | None:
        """Where the payload goes: straight into RAM arena extents the put then adopts without a copy, or (where
        RAM has no room, or the blocks are not of a known model's size) buffers the put copies from."""
        reserved = self._put_reserved[frame.request_id] = []
        bufs: list[memoryview] = []
        spec = self.store.model(frame.model) if self.server.arena is not None else None
        sizes = [it.meta.nbytes for it in frame.items]
        if len(sizes) > 1 and spec is not None and all(n == spec.block_nbytes for n in sizes):
            # one run of the arena for the whole put: received in as few reads as the socket allows
            run = self.store.reserve_ram_run(sizes)
            if run is not None:
                whole, parts = run
                reserved.extend(parts)
                self._put_buffers[frame.request_id] = [part.view for part in parts]
                return [whole]
        try:
            for it in frame.items:
                nbytes = it.meta.nbytes
                res = self.store.reserve_ram(nbytes) if spec is not None and nbytes == spec.block_nbytes else None
                if res is not None:
                    reserved.append(res)
                    bufs.append(res.view)
                else:
                    bufs.append(memoryview(np.empty(nbytes, dtype=np.uint8)))
        except MemoryError as exc:
            self._give_put_bytes(frame.request_id)
            self._cancel_reserved(frame.request_id)
            self._put_errors[frame.request_id] = exc
            return None
        self._put_buffers[frame.request_id] = bufs
        return bufs

    def _cancel_reserved(self, request_id: int) -> None:
        """Free the arena extents of a put that no longer needs them (done, failed or never finished): the ones
        the put adopted stay, the others go back to the free space, never having been visible."""
        for res in self._put_reserved.pop(request_id, ()):
            self.store.cancel_reservation(res)

    def _resume_put(self, frame: fr.Put) -> None:
        """The budget a waiting PUT needed is now held for it: receive its payload and read on."""
        if self.closed:
            self._give_put_bytes(frame.request_id)
            return
        self._guarded(self.receiver.resume, self._put_segments(frame))
        self._resume("put")

    def _give_put_bytes(self, request_id: int) -> None:
        nbytes = self._put_bytes.pop(request_id, 0)
        if nbytes:
            self._own_budget.give(nbytes)
            self.server.inflight.give(nbytes)
            self.counters.inflight_bytes = self.server.inflight.used

    def _check_scope(self, scope: Scope, what: str) -> None:
        assert self.tenant is not None
        if not self.tenant.has(scope):
            raise ScopeError(f"{what} needs the '{scope}' scope; this token has '{self.tenant.scope}'")

    def _on_payload_done(self, frame: fr.Frame) -> None:
        self.counters.requests += 1
        if isinstance(frame, fr.KeyRequest) and frame.kind in _WRITE_OPS:
            try:
                self._check_scope("write", frame.kind)
            except ScopeError as exc:
                self._send_error(frame.request_id, exc)
                return
        match frame:
            case fr.Hello():
                self._hello(frame)
            case fr.Release():
                for lease_id in frame.lease_ids:
                    lease = self._client_leases.pop(lease_id, None)
                    if lease is not None:
                        self._release(lease)
            case fr.Put():
                error = self._put_errors.pop(frame.request_id, None)
                bufs = self._put_buffers.pop(frame.request_id, [])
                in_arena = len(self._put_reserved.get(frame.request_id, ())) == len(bufs)  # nothing to copy
                if error is not None:
                    self._send_error(frame.request_id, error)
                elif self.server.has_lower_tiers or (frame.payload_len > INLINE_PUT_BYTES and not in_arena):
                    self._spawn(frame.request_id, self._put_below(frame, bufs))
                else:
                    self._put(frame, bufs)
            case fr.Get():
                self._get(frame)
            case fr.KeyRequest():
                self._spawn(frame.request_id, self._key_request(frame))
            case fr.LeaseRequest():
                self._lease(frame)
            case fr.RegisterModel():
                self._spawn(frame.request_id, self._register(frame))
            case fr.Stats():
                assert self.tenant is not None
                self._send(fr.encode_stats_ok(frame.request_id, self.server.stats(self.tenant)))
            case fr.NixlConnect():
                self._spawn(frame.request_id, self._nixl_connect(frame))
            case _:
                raise fr.ParseError(f"a client may not send {frame.op!r} frames")

    def _hello(self, frame: fr.Hello) -> None:
        if self.tenant is not None:
            raise fr.ParseError("HELLO sent twice on one connection")
        self.tenant = self.server.auth.authenticate(frame.token)
        self.receiver.limits = self.server.config.limits
        self.receiver.control_bytes = CONTROL_BYTES
        offer = None
        path = self.store.arena_path
        if "shm" in frame.features and path and shm.same_host(self.peer, frame.client):
            offer = shm.offer(path)
        self._send(
            fr.encode_hello_ok(
                frame.request_id, self.tenant.name, self.tenant.salt, self.server.config.node_id,
                self.server.config.limits, offer, self.server.nixl_offered,
            )
        )  # fmt: skip

    async def _nixl_connect(self, frame: fr.NixlConnect) -> None:
        nixl = await self.server.nixl_endpoint()
        if nixl is None:
            self._send(fr.encode_error(frame.request_id, "unsupported", "NIXL is not available on this server"))
            return
        self._send(fr.encode_nixl_ok(frame.request_id, nixl.metadata, nixl.name, nixl.base_addr, nixl.length))

    # --- request handlers ----------------------------------------------------------------------------------------
    def _spawn(self, request_id: int, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._run(request_id, coro))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= self.server.config.max_requests_per_connection:
            self._pause("requests")

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) < self.server.config.max_requests_per_connection:
            self._resume("requests")

    async def _run(self, request_id: int, coro: Any) -> None:
        try:
            async with self._threads:  # this connection's share of the worker threads
                await coro
        except Exception as exc:
            if _error_code(exc) == "internal":
                log.exception("request %d from %s failed", request_id, self.peer)
            self._send_error(request_id, exc)
        finally:
            coro.close()  # a request that never ran (the connection went away first) is not left unawaited

    def _key_list(self, model: ModelFingerprint, hashes: Sequence[PrefixHash]) -> list[BlockKey]:
        assert self.tenant is not None
        ns = self.tenant.name  # the namespace comes from the token, never from the request
        return [BlockKey(ns, model, h) for h in hashes]

    async def _register(self, frame: fr.RegisterModel) -> None:
        assert self.tenant is not None
        cfg = self.server.config
        try:
            spec = ModelSpec.from_wire(frame.spec)
        except (TypeError, ValueError) as exc:
            raise InvalidBlockError(f"invalid model spec: {exc}") from exc
        if not self.tenant.has("write"):  # a reader may name a model the node knows, not add one
            known = await asyncio.to_thread(self.store.model, spec.fingerprint())
            if known is None:
                self._check_scope("write", "registering a new model")
            self._send(fr.encode_model_ok(frame.request_id, spec.fingerprint()))
            return
        fp = await asyncio.to_thread(
            self.store.register_model, spec, owner=self.tenant.name, max_per_owner=cfg.max_models_per_tenant
        )
        self._send(fr.encode_model_ok(frame.request_id, fp))

    def _blocks(self, frame: fr.Put, bufs: list[memoryview]) -> list[Block]:
        assert self.tenant is not None
        created = now_ms()
        blocks = []
        for item, buf in zip(frame.items, bufs, strict=True):
            m = item.meta
            key = BlockKey(self.tenant.name, frame.model, item.prefix)
            meta = BlockMeta(key, m.dtype, m.shape, m.token_count, m.parent, m.created_ms or created)
            blocks.append(Block(meta, buf))  # the very view of a reservation, for the RAM tier to adopt it
        return blocks

    def _put(self, frame: fr.Put, bufs: list[memoryview]) -> None:
        """A put into a RAM-only store received into the arena, or small: at most one small copy into the arena,
        which would hold the GIL in a thread too."""
        started = time.perf_counter()
        try:
            blocks = self._blocks(frame, bufs)
            self.store.put_many(blocks)
        except Exception as exc:
            self._send_error(frame.request_id, exc)
            return
        finally:
            self._give_put_bytes(frame.request_id)
            self._cancel_reserved(frame.request_id)
        self._observe_put(started)
        self._send(fr.encode_count(frame.request_id, len(blocks)))

    async def _put_below(self, frame: fr.Put, bufs: list[memoryview]) -> None:
        """Lower tiers write (disk, network) in a thread, and so does a large copy into RAM."""
        started = time.perf_counter()
        try:
            blocks = self._blocks(frame, bufs)
            await asyncio.to_thread(self.store.put_many, blocks)
        finally:
            self._give_put_bytes(frame.request_id)
            self._cancel_reserved(frame.request_id)
        self._observe_put(started)
        self._send(fr.encode_count(frame.request_id, len(blocks)))

    def _observe_put(self, started: float) -> None:
        if self.server.observer is not None:
            self.server.observer.observe_put("ram", time.perf_counter() - started)  # every put lands in RAM first

    def _observe_get(self, started: float, found: bool, below: bool) -> None:
        """A GET or LEASE answered: from a tier below RAM (any block), from RAM, or nothing found."""
        if self.server.observer is not None:
            tier = "lower" if below else "ram" if found else "miss"
            self.server.observer.observe_get(tier, time.perf_counter() - started)

    def _acquire_in_ram(
        self, request_id: int, keys: Sequence[BlockKey], limit: int | None = None
    ) -> list[StoreLease | None] | None:
        """RAM-arena leases for ``keys`` (``None`` where RAM misses): no disk or network I/O, so it runs inline.
        On a store error, what was acquired is released, the client gets an ERROR frame and this returns None."""
        out: list[StoreLease | None] = []
        if self.server.arena is None:
            return [None] * len(keys)
        held = 0
        try:
            for key in keys:
                lease = self.store.acquire(key, promote=False) if limit is None or held < limit else None
                held += lease is not None
                out.append(lease)
        except Exception as exc:
            for lease in out:
                if lease is not None:
                    self.store.release(lease)
            self._send_error(request_id, exc)
            return None
        return out

    def _get(self, frame: fr.Get) -> None:
        """Small GETs of RAM hits are answered right here, from the arena; anything else goes to a thread (lower
        tiers, or work proportional to a large request's size)."""
        started = time.perf_counter()
        keys = self._key_list(frame.model, frame.hashes)
        if len(keys) > INLINE_KEYS or len(keys) * frame.chunks > INLINE_VIEWS:
            self._spawn(frame.request_id, self._get_threaded(frame, keys, started))
            return
        leases = self._acquire_in_ram(frame.request_id, keys)
        if leases is None:
            return
        final = self.server.arena is not None and not self.server.has_lower_tiers  # a RAM miss is a miss
        if final or all(lease is not None for lease in leases):
            self._reply_get(frame, leases, {}, started, below=False)
        else:
            self._spawn(frame.request_id, self._get_below(frame, keys, leases, started))

    async def _get_threaded(self, frame: fr.Get, keys: list[BlockKey], started: float) -> None:
        """The whole GET in a worker thread: leases or copies, the reply's views and its framing."""
        store, arena, lower, leased_send = self.store, self.server.arena, self.server.has_lower_tiers, not self.tls

        def work() -> tuple[list[StoreLease], bool, _Outgoing]:
            leases: list[StoreLease | None] = []
            blocks: dict[int, Block] = {}
            try:
                for i, key in enumerate(keys):
                    lease = store.acquire(key, promote=False) if arena is not None else None
                    if lease is None and lower and arena is not None:
                        lease = store.acquire(key)  # promote into the arena and send from there
                    if lease is None and (lower or arena is None):
                        if (block := store.get(key)) is not None:  # a copy when RAM has no room
                            blocks[i] = block
                    leases.append(lease)
                head, views, copied = _reply_views(arena, frame, leases, blocks)
                held = [lease for lease in leases if lease is not None]
                found = bool(held) or bool(blocks)
                if copied:  # the payload is a gathered copy: the arena is not read any more
                    for lease in held:
                        store.release(lease)
                    held = []
                return held, found, _plan(head, views, leased=leased_send and bool(held))
            except BaseException:
                for lease in leases:
                    if lease is not None:
                        store.release(lease)
                raise

        held, found, out = await asyncio.to_thread(work)
        self._observe_get(started, found=found, below=lower and found)
        self._commit(out, held)

    async def _get_below(
        self, frame: fr.Get, keys: list[BlockKey], leases: list[StoreLease | None], started: float
    ) -> None:
        missing = [i for i, lease in enumerate(leases) if lease is None]
        arena = self.server.arena
        store = self.store

        def fetch() -> list[StoreLease | Block | None]:
            out: list[StoreLease | Block | None] = []
            for i in missing:  # promote into the arena and send from there; a copy when RAM has no room
                out.append(store.acquire_or_get(keys[i]) if arena is not None else store.get(keys[i]))
            return out

        blocks, below = await self._fetch_below(fetch, leases, missing, Block)
        self._reply_get(frame, leases, blocks, started, below=below)

    async def _fetch_below(
        self,
        fetch: Callable[[], list[Any]],
        leases: list[StoreLease | None],
        missing: list[int],
        other: type[T],
    ) -> tuple[dict[int, T], bool]:
        """Run ``fetch`` (lower-tier work for the ``missing`` positions) in a thread; file each result into
        ``leases`` or, when it is an ``other``, into the returned dict. On failure the RAM leases already held are
        released. The flag says whether anything was found below RAM."""
        try:
            found = await asyncio.to_thread(fetch)
        except BaseException:
            for lease in leases:
                if lease is not None:
                    self.store.release(lease)
            raise
        others: dict[int, T] = {}
        for i, item in zip(missing, found, strict=True):
            if isinstance(item, other):
                others[i] = item
            else:
                leases[i] = item
        return others, any(item is not None for item in found)

    def _reply_get(
        self, frame: fr.Get, leases: list[StoreLease | None], blocks: dict[int, Block], started: float, below: bool
    ) -> None:
        """Send the BLOCKS reply: leased blocks from the arena (released once sent), others from their copies."""
        held = [lease for lease in leases if lease is not None]
        try:
            head, views, copied = _reply_views(self.server.arena, frame, leases, blocks)
        except Exception as exc:
            for lease in held:
                self.store.release(lease)
            self._send_error(frame.request_id, exc)
            return
        if copied:
            for lease in held:
                self.store.release(lease)
            held = []
        self._observe_get(started, found=bool(views), below=below)
        self._send(head, views, held)

    async def _key_request(self, frame: fr.KeyRequest) -> None:
        keys = self._key_list(frame.model, frame.hashes)
        store = self.store
        match frame.kind:
            case "lookup":
                tiers = await asyncio.to_thread(store.lookup, keys)
                leading = []
                for tier in tiers:
                    if tier is None:
                        break
                    leading.append(tier)
                self._send(fr.encode_lookup_ok(frame.request_id, leading))
            case "exists":
                tiers = await asyncio.to_thread(store.lookup, keys)
                self._send(fr.encode_flags(frame.request_id, [t is not None for t in tiers]))
            case "delete":
                self._send(fr.encode_count(frame.request_id, await asyncio.to_thread(store.delete_many, keys)))
            case "pin" | "unpin":
                fn = store.pin if frame.kind == "pin" else store.unpin

                def apply() -> int:
                    present = [k for k, t in zip(keys, store.lookup(keys), strict=True) if t is not None]
                    return sum(fn(k) is not False for k in present)

                self._send(fr.encode_count(frame.request_id, await asyncio.to_thread(apply)))

    def _lease(self, frame: fr.LeaseRequest) -> None:
        """Leases for a shm / NIXL client: RAM hits of a small request inline; misses promoted (or found below),
        and every key of a large request, in a thread."""
        started = time.perf_counter()
        keys = self._key_list(frame.model, frame.hashes)
        room = self.server.config.max_leases_per_connection - len(self._client_leases)
        if len(keys) > INLINE_KEYS:
            self._spawn(frame.request_id, self._lease_below(frame, keys, [None] * len(keys), room, started))
            return
        leases = self._acquire_in_ram(frame.request_id, keys, max(0, room))
        if leases is None:
            return
        if all(lease is not None for lease in leases):
            self._reply_leases(frame, leases, {}, started, below=False)
        else:
            self._spawn(frame.request_id, self._lease_below(frame, keys, leases, room, started))

    async def _lease_below(
        self, frame: fr.LeaseRequest, keys: list[BlockKey], leases: list[StoreLease | None], room: int,
        started: float,
    ) -> None:  # fmt: skip
        missing = [i for i, lease in enumerate(leases) if lease is None]
        room -= len(leases) - len(missing)
        store = self.store
        in_arena = self.server.arena is not None
        promote = in_arena and self.server.has_lower_tiers

        def fetch() -> list[StoreLease | BlockMeta | None]:
            out: list[StoreLease | BlockMeta | None] = []
            for n, i in enumerate(missing):
                lease = store.acquire(keys[i], promote=promote) if in_arena and n < room else None
                if lease is None:
                    head = store.head(keys[i])
                    out.append(head[0] if head is not None else None)
                else:
                    out.append(lease)
            return out

        elsewhere, below = await self._fetch_below(fetch, leases, missing, BlockMeta)
        self._reply_leases(frame, leases, elsewhere, started, below=below)

    def _reply_leases(
        self, frame: fr.LeaseRequest, leases: list[StoreLease | None], elsewhere: dict[int, BlockMeta],
        started: float, below: bool,
    ) -> None:  # fmt: skip
        if self.closed:  # the client went away meanwhile; connection_lost has run
            for lease in leases:
                if lease is not None:
                    self.store.release(lease)
            return
        entries: list[fr.LeaseEntry] = []
        for i, lease in enumerate(leases):
            if lease is not None:
                lease_id = self._next_lease
                self._next_lease += 1
                self._client_leases[lease_id] = lease
                self.counters.leases_outstanding += 1
                entries.append(fr.Lease(lease_id, lease.offset, _wire(lease.meta)))
            elif (meta := elsewhere.get(i)) is not None:
                entries.append(fr.Elsewhere(_wire(meta)))
            else:
                entries.append(None)
        self._observe_get(started, found=any(e is not None for e in entries), below=below)  # same-host reads
        self._send(fr.encode_leases(frame.request_id, entries))

    # --- frames out ----------------------------------------------------------------------------------------------
    def _send(self, head: bytes, payload: Sequence[memoryview] = (), leases: Sequence[StoreLease] = ()) -> None:
        self._commit(_plan(head, payload, leased=bool(leases) and not self.tls), leases)

    def _commit(self, out: _Outgoing, leases: Sequence[StoreLease] = ()) -> None:
        """Hand a planned response to the transport; ``leases`` are released once the kernel took their bytes."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            for lease in leases:
                self.store.release(lease)
            return
        self.last_active = time.monotonic()
        self.counters.bytes_sent += out.head_len + out.total
        if out.total and self.tls:
            transport.writelines([bytes(v) for v in out.views])
            for lease in leases:
                self.store.release(lease)
            return
        # One writelines call: uvloop hands the header and every payload view to the kernel in one writev, with
        # no copy (the default asyncio loop of Python 3.11 would join them, so serve runs on uvloop).
        if leases:  # zero-copy from the arena, except a copied tail (see TAIL_COPY_BYTES)
            self._written += out.head_len + out.copy_from
            self._sending_leases.append((self._written, list(leases)))
            self._written += out.total - out.copy_from
        else:  # payloads not in the arena are objects the transport keeps alive itself
            self._written += out.head_len + out.total
        transport.writelines(out.views)
        self._release_sending()

    def _send_error(self, request_id: int, exc: BaseException) -> None:
        self.counters.errors += 1
        self._send(fr.encode_error(request_id, _error_code(exc), str(exc)))

    def _fatal(self, code: str, message: str, linger: bool = True) -> None:
        log.info("closing connection from %s: %s: %s", self.peer, code, message)
        self._send(fr.encode_error(0, code, message))
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        if linger and transport.can_write_eof():
            # Half-close: the ERROR frame goes out, then FIN; what the peer still sends is read and dropped, so
            # closing with unread bytes does not reset the connection and lose the ERROR frame on the way.
            transport.write_eof()
            if self._paused_for:
                self._paused_for.clear()
                transport.resume_reading()
        else:
            transport.close()  # flushes the error frame first
        # a peer that does not read its ERROR frame (or keeps sending) must not keep the connection open
        self._abort_timer = asyncio.get_running_loop().call_later(FATAL_FLUSH_S, transport.abort)

    def _release_sending(self, everything: bool = False) -> None:
        """Release the leases of responses whose arena bytes the kernel has taken."""
        if not self._sending_leases:
            return
        pending = 0 if everything or self.transport is None else self.transport.get_write_buffer_size()
        sent = self._written - pending
        while self._sending_leases and (everything or self._sending_leases[0][0] <= sent or
                                        pending <= TAIL_COPY_BYTES):  # fmt: skip
            for lease in self._sending_leases.pop(0)[1]:
                self.store.release(lease)

    def _release(self, lease: StoreLease) -> None:
        """Release a lease the client held (shm / NIXL)."""
        self.store.release(lease)
        self.counters.leases_outstanding = max(0, self.counters.leases_outstanding - 1)
