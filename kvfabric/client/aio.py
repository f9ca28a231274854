"""The asyncio client: pipelined requests over a few connections (a ``BufferedProtocol`` each, receiving payloads
straight into caller buffers), mirroring :class:`kvfabric.client.sync.Client` method for method."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from kvfabric.client.buffers import Destination, PinnedStaging, readable, settle, torch_dtype, writable
from kvfabric.client.leased import LeasedReader
from kvfabric.client.session import (
    ClientOptions,
    Endpoint,
    GetPlan,
    LookupResult,
    SessionInfo,
    batches,
    expect,
    leading,
    parse_url,
    put_items,
    session_from,
)
from kvfabric.client.sync_conn import CLIENT_LIMITS
from kvfabric.errors import ClientError, KVFabricError, RemoteError
from kvfabric.hashing import root_hash
from kvfabric.ids import ModelFingerprint, PrefixHash
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr
from kvfabric.transport import nixl as nixl_transport
from kvfabric.transport.receiver import FrameReceiver
from kvfabric.transport.shm import ArenaMap, host_identity

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_BACKOFF_S = 0.05

Sink = Callable[[fr.Frame], Sequence[memoryview] | None]
OnSegment = Callable[[fr.Frame, int], None]


class _Pending:
    __slots__ = ("future", "on_segment", "sink")

    def __init__(self, future: asyncio.Future[fr.Frame], sink: Sink | None, on_segment: OnSegment | None) -> None:
        self.future = future
        self.sink = sink
        self.on_segment = on_segment


class AsyncConnection(asyncio.BufferedProtocol):
    """One pipelined connection: any number of requests in flight, replies matched by request id."""

    def __init__(self, endpoint: Endpoint, options: ClientOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.transport: asyncio.Transport | None = None
        self.broken = False
        self.session: SessionInfo | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._receiver = FrameReceiver(CLIENT_LIMITS, self._on_frame, self._on_done, self._on_segment)

    @classmethod
    async def open(cls, endpoint: Endpoint, options: ClientOptions) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        ssl_ctx = options.ssl
        if ssl_ctx is None and endpoint.tls:
            import ssl

            ssl_ctx = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(endpoint, options), endpoint.host, endpoint.port, ssl=ssl_ctx),
                options.timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise ClientError(f"cannot connect to {endpoint}: {exc!r}") from exc
        try:
            rid = conn.next_id()
            reply = await conn.request(fr.encode_hello(rid, options.token, host_identity(), options.features()))
            conn.session = session_from(reply)
        except BaseException:
            conn.close()
            raise
        return conn

    def next_id(self) -> int:
        return next(self._ids)

    async def request(
        self, head: bytes, payload: Sequence[memoryview] = (), sink: Sink | None = None,
        on_segment: OnSegment | None = None, what: str = "request",
    ) -> fr.Frame:  # fmt: skip
        if self.broken or self.transport is None:
            raise ClientError(f"connection to {self.endpoint} is broken")
        rid = fr.HEADER.unpack_from(head)[4]
        future: asyncio.Future[fr.Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, sink, on_segment)
        if payload:
            self.transport.writelines([head, *payload])
        else:
            self.transport.write(head)
        try:
            return await asyncio.wait_for(future, self.options.timeout)
        except TimeoutError as exc:
            self._fail(ClientError(f"{what} to {self.endpoint} timed out after {self.options.timeout}s"))
            raise ClientError(f"{what} to {self.endpoint} timed out after {self.options.timeout}s") from exc
        finally:
            self._pending.pop(rid, None)

    def send_oneway(self, head: bytes) -> None:
        if self.transport is not None and not self.broken:
            self.transport.write(head)

    # --- protocol callbacks --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receiver.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._receiver.buffer_updated(nbytes)
        except KVFabricError as exc:
            self._fail(exc)
            self.close()

    def _on_frame(self, frame: fr.Frame) -> Sequence[memoryview] | None:
        p = self._pending.get(frame.request_id)
        return p.sink(frame) if p is not None and p.sink is not None else None

    def _on_segment(self, frame: fr.Frame, index: int) -> None:
        p = self._pending.get(frame.request_id)
        if p is not None and p.on_segment is not None:
            p.on_segment(frame, index)

    def _on_done(self, frame: fr.Frame) -> None:
        if isinstance(frame, fr.Error) and frame.request_id == 0:  # connection-level: the server is closing
            self.broken = True
            for p in list(self._pending.values()):
                if not p.future.done():
                    p.future.set_result(frame)
            return
        p = self._pending.get(frame.request_id)
        if p is not None and not p.future.done():
            p.future.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ClientError(f"connection to {self.endpoint} lost" + (f": {exc}" if exc else "")))

    def _fail(self, exc: Exception) -> None:
        self.broken = True
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(exc)

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()


class AsyncClient:
    """``async with AsyncClient("kvfabric://host:9500") as c: await c.get(...)``."""

    def __init__(
        self, url: str = "kvfabric://127.0.0.1:9500", *, token: str | None = None, timeout: float = 10.0,
        pool_size: int = 4, shm: bool | None = None, nixl: bool = False, retries: int = 2, ssl: Any = None,
    ) -> None:  # fmt: skip
        self.endpoint = parse_url(url)
        self.options = ClientOptions(token, timeout, pool_size, shm, nixl, retries, ssl)
        self._conns: list[AsyncConnection] = []
        self._rr = itertools.count()
        self._lock: asyncio.Lock | None = None
        self._session: SessionInfo | None = None
        self._leased: LeasedReader | None = None
        self._closed = False
        self._staging = PinnedStaging()  # host buffers for CUDA tensors, reused across calls

    async def _connection(self) -> AsyncConnection:
        if self._closed:
            raise ClientError("client is closed")
        self._conns = [c for c in self._conns if not c.broken]
        if len(self._conns) >= self.options.pool_size:
            return self._conns[next(self._rr) % len(self._conns)]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if len(self._conns) < self.options.pool_size:
                conn = await AsyncConnection.open(self.endpoint, self.options)
                self._conns.append(conn)
                if self._session is None:
                    assert conn.session is not None
                    self._session = conn.session
                    self._leased = await self._open_fast_path(conn)
                return conn
        return self._conns[next(self._rr) % len(self._conns)]

    async def _open_fast_path(self, conn: AsyncConnection) -> LeasedReader | None:
        session = conn.session
        assert session is not None
        if self.options.nixl:
            if not session.nixl:
                log.warning("NIXL requested but %s does not offer it; using TCP", self.endpoint)
                return None
            ep = nixl_transport.client_endpoint()
            if ep is None:
                return None
            try:
                reply = await conn.request(fr.encode_nixl_connect(conn.next_id(), ep.metadata))
                reply = expect(reply, fr.NixlOk, "nixl")
            except RemoteError as exc:  # the server offered NIXL but could not start its endpoint
                log.warning("NIXL unavailable on %s (%s); using TCP", self.endpoint, exc)
                ep.close()
                return None
            ep.connect(reply.agent_metadata)
            return LeasedReader(nixl=ep, base_addr=reply.base_addr)
        if self.options.shm is False or session.shm is None:
            if self.options.shm and session.shm is None:
                log.warning("shared memory requested but %s is not on this host; using TCP", self.endpoint)
            return None
        try:
            return LeasedReader(arena=ArenaMap(session.shm.path, expect=session.shm))
        except OSError as exc:
            log.warning("cannot map the server's arena %s (%s); using TCP", session.shm.path, exc)
            return None

    async def _call(self, what: str, fn: Callable[[AsyncConnection], Awaitable[T]], idempotent: bool = True) -> T:
        attempts = self.options.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                return await fn(await self._connection())
            except RemoteError:
                raise
            except ClientError as exc:
                if attempt + 1 >= attempts or self._closed:
                    raise ClientError(f"{what} on {self.endpoint} failed after {attempt + 1} attempt(s): {exc}") \
                        from exc
                log.info("%s on %s failed (%s); retrying", what, self.endpoint, exc)
                await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    async def session(self) -> SessionInfo:
        if self._session is None:
            await self._connection()
        assert self._session is not None
        return self._session

    async def transport(self) -> str:
        await self.session()
        return self._leased.kind if self._leased is not None else "tcp"

    async def register_model(self, spec: ModelSpec) -> ModelFingerprint:
        async def op(conn: AsyncConnection) -> ModelFingerprint:
            reply = await conn.request(fr.encode_register_model(conn.next_id(), spec.to_dict()), what="register")
            return expect(reply, fr.ModelOk, "register_model").fingerprint

        fp = await self._call("register_model", op)
        (await self.session()).registered.add(fp)
        return fp

    async def block_hashes(
        self, spec: ModelSpec, tokens: Any, extras: Sequence[bytes] | None = None
    ) -> list[PrefixHash]:
        return (await self.session()).hashes(spec, tokens, extras)

    async def _keys(self, kind: fr.KeyOp, spec: ModelSpec, hashes: Sequence[PrefixHash], idem: bool) -> list[Any]:
        session = await self.session()
        fp = session.fingerprint(spec)

        async def one(run: range) -> fr.Frame:
            async def op(conn: AsyncConnection) -> fr.Frame:
                return await conn.request(fr.encode_keys(conn.next_id(), kind, fp, [hashes[i] for i in run]), what=kind)

            return await self._call(kind, op, idem)

        return list(await asyncio.gather(*(one(r) for r in batches(len(hashes), [0] * len(hashes), session.limits))))

    async def lookup(self, spec: ModelSpec, tokens: Any, extras: Sequence[bytes] | None = None) -> LookupResult:
        hashes = await self.block_hashes(spec, tokens, extras)
        tiers: list[Any] = []
        for reply in await self._keys("lookup", spec, hashes, True):
            run = expect(reply, fr.LookupOk, "lookup").tiers
            tiers.extend(run)
            if len(run) < min(len(hashes), (await self.session()).limits.max_batch):
                break
        return LookupResult(len(tiers), len(tiers) * spec.block_size, tuple(tiers))

    async def exists(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> list[bool]:
        replies = await self._keys("exists", spec, hashes, True)
        return [f for r in replies for f in expect(r, fr.Flags, "exists").flags]

    async def delete(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        return sum(expect(r, fr.Count, "delete").count for r in await self._keys("delete", spec, hashes, False))

    async def pin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        return sum(expect(r, fr.Count, "pin").count for r in await self._keys("pin", spec, hashes, False))

    async def unpin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        return sum(expect(r, fr.Count, "unpin").count for r in await self._keys("unpin", spec, hashes, False))

    async def stats(self) -> dict[str, Any]:
        async def op(conn: AsyncConnection) -> dict[str, Any]:
            return expect(await conn.request(fr.encode_stats(conn.next_id())), fr.StatsOk, "stats").stats

        return await self._call("stats", op)

    async def get_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], out: Sequence[Any] | None = None, *,
        chunks: int = 1, on_chunk: Callable[[int], None] | None = None,
    ) -> list[Any | None]:  # fmt: skip
        """See :meth:`kvfabric.client.sync.Client.get_blocks`; batches run concurrently over the pool."""
        if out is None:
            out = [np.empty(spec.block_nbytes, dtype=np.uint8) for _ in hashes]
        if len(out) != len(hashes):
            raise ValueError(f"{len(out)} output buffers for {len(hashes)} hashes")
        dests = [writable(o, self._staging) for o in out]
        session = await self.session()
        fp = session.fingerprint(spec)

        async def one(run: range) -> list[fr.WireMeta | None]:
            h, d = [hashes[i] for i in run], [dests[i] for i in run]
            if self._leased is not None and chunks == 1:
                return await self._call("get", lambda conn: self._get_leased(conn, fp, h, d))
            return await self._call("get", lambda conn: self._get_tcp(conn, fp, h, d, chunks, on_chunk))

        runs = batches(len(hashes), [spec.block_nbytes] * len(hashes), session.limits, chunks)
        try:
            metas = [m for ms in await asyncio.gather(*(one(r) for r in runs)) for m in ms]
        finally:
            settle(dests, self._staging)
        return [o if m is not None else None for o, m in zip(out, metas, strict=True)]

    async def _get_tcp(
        self, conn: AsyncConnection, fp: bytes, hashes: list[PrefixHash], dests: Sequence[Destination | None],
        chunks: int = 1, on_chunk: Callable[[int], None] | None = None,
    ) -> list[fr.WireMeta | None]:  # fmt: skip
        plan = GetPlan(dests, chunks, on_chunk)
        reply = await conn.request(
            fr.encode_get(conn.next_id(), fp, hashes, chunks), sink=plan.sink, on_segment=plan.on_segment, what="get"
        )
        return plan.finish(expect(reply, fr.Blocks, "get"))

    async def _get_leased(
        self, conn: AsyncConnection, fp: bytes, hashes: list[PrefixHash], dests: Sequence[Destination | None]
    ) -> list[fr.WireMeta | None]:
        assert self._leased is not None
        reply = expect(await conn.request(fr.encode_lease(conn.next_id(), fp, hashes)), fr.Leases, "lease")
        ids = [e.lease_id for e in reply.entries if isinstance(e, fr.Lease)]
        try:
            result = self._leased.read(reply.entries, dests)
        finally:
            if ids:
                conn.send_oneway(fr.encode_release(conn.next_id(), ids))
        if result.elsewhere:
            idx = result.elsewhere
            metas = await self._get_tcp(conn, fp, [hashes[i] for i in idx], [dests[i] for i in idx])
            for i, m in zip(idx, metas, strict=True):
                result.metas[i] = m
        return result.metas

    async def get(self, spec: ModelSpec, tokens: Any, out: Any = None, extras: Sequence[bytes] | None = None) -> Any:
        import torch

        hashes = await self.block_hashes(spec, tokens, extras)
        if not hashes:
            return None
        if out is None:
            out = torch.empty((len(hashes), *spec.block_shape), dtype=torch_dtype(spec.dtype))
        got = await self.get_blocks(spec, hashes, [out[i] for i in range(len(hashes))])
        n = leading(got)
        return out[:n] if n else None

    async def put_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], blocks: Sequence[Any], parent: PrefixHash | None = None
    ) -> int:
        if len(blocks) != len(hashes):
            raise ValueError(f"{len(blocks)} blocks for {len(hashes)} hashes")
        session = await self.session()
        fp = session.fingerprint(spec)
        if fp not in session.registered:
            await self.register_model(spec)
        root = parent if parent is not None else root_hash(fp, session.salt)
        held: list[Any] = []  # pinned buffers of CUDA sources, released below
        payloads = [readable(b, self._staging, held) for b in blocks]
        items = put_items(spec, hashes, root, payloads)

        async def one(run: range) -> int:
            async def op(conn: AsyncConnection) -> int:
                head = fr.encode_put(conn.next_id(), fp, [items[i] for i in run])
                reply = await conn.request(head, [payloads[i] for i in run], what="put")
                return expect(reply, fr.Count, "put").count

            return await self._call("put", op)

        runs = batches(len(items), [it.meta.nbytes for it in items], session.limits)
        try:
            return sum(await asyncio.gather(*(one(r) for r in runs)))
        finally:
            self._staging.release(held)

    async def put(self, spec: ModelSpec, tokens: Any, kv: Any, extras: Sequence[bytes] | None = None) -> int:
        hashes = await self.block_hashes(spec, tokens, extras)
        n = min(len(hashes), len(kv))
        return await self.put_blocks(spec, hashes[:n], [kv[i] for i in range(n)]) if n else 0

    async def close(self) -> None:
        self._closed = True
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        if self._leased is not None:
            try:
                self._leased.close()
            except BufferError:
                pass
            self._leased = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
