"""The data-plane server: one asyncio process serving the frame protocol over TCP (optionally TLS).

Per connection a ``BufferedProtocol`` parses pipelined frames (zero-copy receive into put buffers). GET and LEASE
of blocks in the RAM arena, and puts into a RAM-only store, are answered inside the callback (no I/O involved);
everything that may touch the disk or object tier runs as a task through ``asyncio.to_thread``. Responses go out
with one ``writelines`` from the store's own memory. RAM-arena blocks are sent from a lease, so a block on the wire
is never evicted or overwritten before the kernel has taken every byte: the lease is released once the transport's
write buffer holds only the response's copied tail (see ``TAIL_COPY_BYTES``).

Error handling: a frame that cannot be parsed, is over a size limit in its header, or arrives before a successful
HELLO gets an ERROR frame and the connection is closed (the byte stream cannot be trusted any more). A well-formed
request that fails (unknown model, invalid block, batch too large, store error) gets an ERROR frame with its
request id and the connection carries on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from kvfabric.errors import (
    AuthError,
    BlockTooLargeError,
    FrameTooLargeError,
    InvalidBlockError,
    ProtocolError,
    StoreError,
    TierFullError,
    UnknownModelError,
)
from kvfabric.ids import BlockKey, ModelFingerprint, PrefixHash, TierId
from kvfabric.record import Block, BlockMeta, now_ms
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr
from kvfabric.transport import shm
from kvfabric.transport.auth import Authenticator, Tenant
from kvfabric.transport.nixl import NixlServerEndpoint, load_api, server_endpoint
from kvfabric.transport.receiver import FrameReceiver

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_LEASES_PER_CONNECTION = 65536
TAIL_COPY_BYTES = 64 << 10
"""The last bytes of a leased response are sent from a copy and the write high-water mark is this size, so
whenever the transport holds no more than this many bytes, none of them are in the arena; above it, the transport
calls resume_writing() once everything is sent (low-water mark 0)."""


class StoreLease(Protocol):
    meta: BlockMeta
    offset: int
    nbytes: int


class FabricStore(Protocol):
    """The part of ``kvfabric.store.tiered.TieredStore`` the server uses."""

    @property
    def arena_path(self) -> str | None: ...
    def register_model(self, spec: ModelSpec) -> ModelFingerprint: ...
    def put_many(self, blocks: Sequence[Block]) -> None: ...
    def get(self, key: BlockKey) -> Block | None: ...
    def head(self, key: BlockKey) -> tuple[BlockMeta, TierId] | None: ...
    def lookup(self, keys: Sequence[BlockKey]) -> list[TierId | None]: ...
    def delete_many(self, keys: Sequence[BlockKey]) -> int: ...
    def pin(self, key: BlockKey) -> Any: ...
    def unpin(self, key: BlockKey) -> Any: ...
    def acquire(self, key: BlockKey, *, promote: bool = True) -> StoreLease | None: ...
    def release(self, lease: Any) -> None: ...
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
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> tenant; empty = auth off
    limits: fr.Limits = fr.Limits()
    ssl: ssl.SSLContext | None = None
    node_id: str = "local"
    nixl: bool = True  # register the arena with NIXL when the library is available
    max_leases_per_connection: int = MAX_LEASES_PER_CONNECTION


@dataclass(slots=True)
class ServerCounters:
    connections: int = 0
    connections_open: int = 0
    requests: int = 0
    errors: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    leases_outstanding: int = 0


def _wire(meta: BlockMeta) -> fr.WireMeta:
    return fr.WireMeta(meta.parent, meta.dtype, tuple(meta.shape), meta.token_count, meta.created_ms)


def _error_code(exc: BaseException) -> str:
    match exc:
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
            raise ValueError("ServerConfig.server_secret must be set (see auth.load_or_create_secret)")
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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.config.host, self.config.port, ssl=self.config.ssl, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
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

    async def close(self) -> None:
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
        out: dict[str, Any] = {"tenant": tenant.name, "node_id": self.config.node_id,
                               "server": asdict(self.counters)}  # fmt: skip
        if not self.auth.enabled:  # per-tier totals would let one tenant watch another's activity
            out["tiers"] = {t: asdict(s) if is_dataclass(s) else s for t, s in self.store.tier_stats().items()}
        return out


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: FabricServer) -> None:
        self.server = server
        self.store = server.store
        self.counters = server.counters
        self.transport: asyncio.Transport | None = None
        self.tenant: Tenant | None = None
        self.peer: object = None
        self.receiver = FrameReceiver(server.config.limits, self._on_frame, self._on_payload_done)
        self.closed = False
        self.tls = False
        self._put_buffers: dict[int, list[np.ndarray]] = {}  # request id -> buffers its payload lands in
        self._put_errors: dict[int, Exception] = {}
        self._client_leases: dict[int, StoreLease] = {}  # shm/NIXL leases the client holds
        self._next_lease = 1
        self._sending_leases: list[tuple[int, list[StoreLease]]] = []  # (stream offset of arena end, leases)
        self._written = 0  # bytes handed to the transport
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False

    # --- asyncio callbacks ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TLS encrypts payloads into its own buffers (we hand it copies); for plain TCP the transport sends from our
        # memory, and a high-water mark of 0 makes resume_writing() mean "everything written was sent".
        self.tls = transport.get_extra_info("sslcontext") is not None
        if not self.tls:
            transport.set_write_buffer_limits(high=TAIL_COPY_BYTES, low=0)
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._connections.add(self)
        self.counters.connections += 1
        self.counters.connections_open += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.receiver.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.counters.bytes_received += nbytes
        try:
            self.receiver.buffer_updated(nbytes)
        except AuthError as exc:
            self.counters.auth_failures += 1
            self._fatal("auth", str(exc))
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            self._fatal(_error_code(exc), str(exc))

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()  # backpressure: no new requests while responses are queued

    def resume_writing(self) -> None:
        self._release_sending(everything=True)  # low-water mark 0: the write buffer is empty
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        self.counters.connections_open -= 1
        self._release_sending(everything=True)
        for lease in self._client_leases.values():
            self._release(lease)
        self._client_leases.clear()
        self._put_buffers.clear()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- frames in -----------------------------------------------------------------------------------------------
    def _on_frame(self, frame: fr.Frame) -> list[memoryview] | None:
        if self.tenant is None and not isinstance(frame, fr.Hello):
            raise AuthError("the first frame must be HELLO with a valid token")
        if isinstance(frame, fr.Put):
            try:
                if len(frame.items) > self.server.config.limits.max_batch:
                    raise FrameTooLargeError(len(frame.items), self.server.config.limits.max_batch)
                bufs = [np.empty(it.meta.nbytes, dtype=np.uint8) for it in frame.items]
            except (FrameTooLargeError, MemoryError) as exc:
                self._put_errors[frame.request_id] = exc
                return None
            self._put_buffers[frame.request_id] = bufs
            return [memoryview(b) for b in bufs]
        return None

    def _on_payload_done(self, frame: fr.Frame) -> None:
        self.counters.requests += 1
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
                if error is not None:
                    self._send_error(frame.request_id, error)
                elif self.server.has_lower_tiers:
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
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request_id: int, coro: Any) -> None:
        try:
            await coro
        except Exception as exc:
            if _error_code(exc) == "internal":
                log.exception("request %d from %s failed", request_id, self.peer)
            self._send_error(request_id, exc)

    def _key_list(self, model: ModelFingerprint, hashes: Sequence[PrefixHash]) -> list[BlockKey]:
        assert self.tenant is not None
        ns = self.tenant.name  # the namespace comes from the token, never from the request
        return [BlockKey(ns, model, h) for h in hashes]

    async def _register(self, frame: fr.RegisterModel) -> None:
        try:
            spec = ModelSpec.from_dict(frame.spec)
        except (TypeError, ValueError) as exc:
            raise InvalidBlockError(f"invalid model spec: {exc}") from exc
        fp = await asyncio.to_thread(self.store.register_model, spec)
        self._send(fr.encode_model_ok(frame.request_id, fp))

    def _blocks(self, frame: fr.Put, bufs: list[np.ndarray]) -> list[Block]:
        assert self.tenant is not None
        created = now_ms()
        blocks = []
        for item, buf in zip(frame.items, bufs, strict=True):
            m = item.meta
            key = BlockKey(self.tenant.name, frame.model, item.prefix)
            meta = BlockMeta(key, m.dtype, m.shape, m.token_count, m.parent, m.created_ms or created)
            blocks.append(Block(meta, memoryview(buf)))
        return blocks

    def _put(self, frame: fr.Put, bufs: list[np.ndarray]) -> None:
        """A RAM-only store: the put is one copy into the arena, which would hold the GIL in a thread as well."""
        started = time.perf_counter()
        try:
            blocks = self._blocks(frame, bufs)
            self.store.put_many(blocks)
        except Exception as exc:
            self._send_error(frame.request_id, exc)
            return
        self._observe_put(started)
        self._send(fr.encode_count(frame.request_id, len(blocks)))

    async def _put_below(self, frame: fr.Put, bufs: list[np.ndarray]) -> None:
        """Lower tiers write (disk, network) in a thread."""
        started = time.perf_counter()
        blocks = self._blocks(frame, bufs)
        await asyncio.to_thread(self.store.put_many, blocks)
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
        """RAM hits are answered right here, from the arena; anything else goes to a thread (lower tiers)."""
        started = time.perf_counter()
        keys = self._key_list(frame.model, frame.hashes)
        leases = self._acquire_in_ram(frame.request_id, keys)
        if leases is None:
            return
        final = self.server.arena is not None and not self.server.has_lower_tiers  # a RAM miss is a miss
        if final or all(lease is not None for lease in leases):
            self._reply_get(frame, leases, {}, started, below=False)
        else:
            self._spawn(frame.request_id, self._get_below(frame, keys, leases, started))

    async def _get_below(
        self, frame: fr.Get, keys: list[BlockKey], leases: list[StoreLease | None], started: float
    ) -> None:
        missing = [i for i, lease in enumerate(leases) if lease is None]
        arena = self.server.arena
        store = self.store

        def fetch() -> list[StoreLease | Block | None]:
            out: list[StoreLease | Block | None] = []
            for i in missing:  # promote into the arena and send from there; a copy when RAM has no room
                lease = store.acquire(keys[i]) if arena is not None else None
                out.append(lease if lease is not None else store.get(keys[i]))
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
            arena = self.server.arena
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
                views = [v[c * (len(v) // chunks) : (c + 1) * (len(v) // chunks)] for c in range(chunks)
                         for v in views]  # fmt: skip
        except Exception as exc:
            for lease in held:
                self.store.release(lease)
            self._send_error(frame.request_id, exc)
            return
        self._observe_get(started, found=bool(views), below=below)
        self._send(fr.encode_blocks(frame.request_id, metas, chunks), views, held)

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
        """Leases for a shm / NIXL client: RAM hits inline; misses promoted (or found below) in a thread."""
        started = time.perf_counter()
        keys = self._key_list(frame.model, frame.hashes)
        room = self.server.config.max_leases_per_connection - len(self._client_leases)
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
        promote = self.server.arena is not None and self.server.has_lower_tiers

        def fetch() -> list[StoreLease | BlockMeta | None]:
            out: list[StoreLease | BlockMeta | None] = []
            for n, i in enumerate(missing):
                lease = store.acquire(keys[i]) if promote and n < room else None
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
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            for lease in leases:
                self.store.release(lease)
            return
        if payload and self.tls:
            transport.writelines([head, *(bytes(p) for p in payload)])
            self.counters.bytes_sent += len(head) + sum(len(p) for p in payload)
            for lease in leases:
                self.store.release(lease)
            return
        # One writelines call: uvloop hands the header and every payload view to the kernel in one writev, with
        # no copy (the default asyncio loop of Python 3.11 would join them, so serve runs on uvloop).
        written = len(head)
        total = sum(len(p) for p in payload)
        if leases:  # zero-copy from the arena, except a copied tail (see TAIL_COPY_BYTES)
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
            self._written += written + copy_from
            self._sending_leases.append((self._written, list(leases)))
            self._written += total - copy_from
            transport.writelines(views)
        else:  # payloads not in the arena are objects the transport keeps alive itself
            transport.writelines([head, *payload])
            self._written += written + total
        self.counters.bytes_sent += written + total
        self._release_sending()

    def _send_error(self, request_id: int, exc: BaseException) -> None:
        self.counters.errors += 1
        self._send(fr.encode_error(request_id, _error_code(exc), str(exc)))

    def _fatal(self, code: str, message: str) -> None:
        log.info("closing connection from %s: %s: %s", self.peer, code, message)
        self._send(fr.encode_error(0, code, message))
        self.closed = True
        if self.transport is not None:
            self.transport.close()  # flushes the error frame first

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
