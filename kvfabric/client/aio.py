"""The asyncio client: pipelined requests over a few connections (a ``BufferedProtocol`` each, receiving payloads
straight into caller buffers); a call's runs go out at once, each retried on its own when idempotent. What each call
sends and how its replies decode is in :mod:`kvfabric.client.plans`, shared with :class:`kvfabric.client.Client`,
which this client mirrors method for method; this module only drives it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from kvfabric.client.buffers import KV, Buffer
from kvfabric.client.core import ClientCore
from kvfabric.client.plans import OnSegment, Operation, Operations, Plan, Request, Sink, advance, fast_path, hello
from kvfabric.client.session import CLIENT_LIMITS, ClientOptions, Endpoint, LookupResult, SessionInfo, Tokens
from kvfabric.errors import ClientError, KVFabricError
from kvfabric.ids import ModelFingerprint, PrefixHash
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr
from kvfabric.transport.receiver import FrameReceiver

if TYPE_CHECKING:
    import torch

R = TypeVar("R")
T = TypeVar("T")


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
            raise ClientError(f"cannot connect to {endpoint}: {exc or type(exc).__name__}") from exc
        try:
            conn.session = await conn.run(hello(options))
        except BaseException:
            conn.close()
            raise
        return conn

    def next_id(self) -> int:
        return next(self._ids)

    async def run(self, plan: Plan[R]) -> R:
        """Run ``plan`` to its end on this connection (other plans' requests interleave with its own)."""
        try:
            request, result = advance(plan, None)
            while request is not None:
                request, result = advance(plan, await self.exchange(request))
        finally:
            plan.close()  # a plan left mid-way by a failed request ends here, not whenever it is collected
        return cast(R, result)

    async def exchange(self, req: Request) -> fr.Frame | None:
        """Send ``req`` and return its reply (``None`` for a oneway frame)."""
        head = req.encode(self.next_id())
        if req.oneway:
            self.send_oneway(head)
            return None
        return await self.request(head, req.payload, req.sink, req.on_segment, req.what)

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


class AsyncClient(ClientCore):
    """``async with AsyncClient("kvfabric://host:9500") as c: await c.get(...)``; the calls of
    :class:`kvfabric.client.Client`, as coroutines (``session`` and ``transport`` too). Use from one event loop."""

    def _open_pool(self) -> None:
        self._conns: list[AsyncConnection] = []
        self._rr = itertools.count()
        self._lock: asyncio.Lock | None = None

    async def _connection(self) -> AsyncConnection:
        self._check_open()
        self._conns = [c for c in self._conns if not c.broken]
        if len(self._conns) >= self.options.pool_size and self._ops is not None:
            return self._conns[next(self._rr) % len(self._conns)]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if len(self._conns) < self.options.pool_size:
                conn = await AsyncConnection.open(self.endpoint, self.options)
                self._conns.append(conn)
            else:
                conn = self._conns[next(self._rr) % len(self._conns)]
            if self._ops is None:  # the first connection, or the one after a failed first fast-path setup
                assert conn.session is not None
                leased = await conn.run(fast_path(conn.session, self.options, self.endpoint))
                self._ops = Operations(conn.session, leased, self._staging)
            return conn

    async def _operations(self) -> Operations:
        if self._ops is None:
            await self._connection()
        assert self._ops is not None
        return self._ops

    async def _run(self, op: Operation[Any, T]) -> T:
        try:
            if op.before is not None:
                await self._run(op.before)
            # every run ends before ``after`` returns its buffers: no run may still be receiving into them
            results = await asyncio.gather(*(self._attempt(op, run) for run in op.runs), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return op.combine(cast(list[Any], results))
        finally:
            if op.after is not None:
                op.after()

    async def _attempt(self, op: Operation[R, Any], run: Callable[[], Plan[R]]) -> R:
        attempt = 0
        while True:
            try:
                return await (await self._connection()).run(run())
            except ClientError as exc:
                await asyncio.sleep(self.options.retry_delay(op.what, self.endpoint, attempt, exc,
                                                             op.idempotent and not self._closed))  # fmt: skip
            attempt += 1

    async def session(self) -> SessionInfo:
        """What the server said at hello: tenant, salt, limits, offers (connects if not yet connected)."""
        return (await self._operations()).session

    async def transport(self) -> str:
        """``"shm"``, ``"nixl"`` or ``"tcp"``: how blocks travel for this client."""
        return self._transport_of(await self._operations())

    # --- models and hashes ---------------------------------------------------------------------------------------
    async def register_model(self, spec: ModelSpec) -> ModelFingerprint:
        """Register ``spec`` with the node (a put does this when needed); returns its fingerprint."""
        return await self._run((await self._operations()).register_model(spec))

    async def block_hashes(
        self, spec: ModelSpec, tokens: Tokens, extras: Sequence[bytes] | None = None
    ) -> list[PrefixHash]:
        """This tenant's chained hashes of every full block of ``tokens`` (``extras``: one per block, mixed in)."""
        return (await self.session()).hashes(spec, tokens, extras)

    # --- key operations ------------------------------------------------------------------------------------------
    async def lookup(self, spec: ModelSpec, tokens: Tokens, extras: Sequence[bytes] | None = None) -> LookupResult:
        """The longest prefix of ``tokens`` the fabric holds for this tenant and model."""
        hashes = await self.block_hashes(spec, tokens, extras)
        return await self._run((await self._operations()).lookup(spec, hashes))

    async def exists(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> list[bool]:
        """Whether each block is held (in any tier)."""
        return await self._run((await self._operations()).exists(spec, hashes))

    async def delete(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        """Delete the blocks from every tier; returns how many were held."""
        return await self._run((await self._operations()).count("delete", spec, hashes))

    async def pin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        """Keep the blocks from eviction until unpinned; returns how many were pinned."""
        return await self._run((await self._operations()).count("pin", spec, hashes))

    async def unpin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        """Let pinned blocks be evicted again; returns how many were unpinned."""
        return await self._run((await self._operations()).count("unpin", spec, hashes))

    async def stats(self) -> dict[str, Any]:
        """The node's counters and tier totals, as this tenant may see them."""
        return await self._run((await self._operations()).stats())

    # --- get -----------------------------------------------------------------------------------------------------
    async def get_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], out: Sequence[Buffer] | None = None, *,
        chunks: int = 1, on_chunk: Callable[[int], None] | None = None,
    ) -> list[Buffer | None]:  # fmt: skip
        """Fetch blocks into ``out`` (one buffer per hash: numpy, torch CPU/CUDA, bytearray) or new uint8 arrays;
        see :meth:`kvfabric.client.Client.get_blocks`. Batches run concurrently over the pool."""
        return await self._run((await self._operations()).get_blocks(spec, hashes, out, chunks, on_chunk))

    async def get(
        self, spec: ModelSpec, tokens: Tokens, out: torch.Tensor | None = None, extras: Sequence[bytes] | None = None
    ) -> torch.Tensor | None:
        """KV of the longest cached prefix of ``tokens`` as a tensor ``[n_blocks, *spec.block_shape]`` (into
        ``out`` when given, which must hold at least as many blocks as ``tokens`` has), or ``None``."""
        hashes = await self.block_hashes(spec, tokens, extras)
        return await self._run((await self._operations()).get(spec, hashes, out))

    # --- put -----------------------------------------------------------------------------------------------------
    async def put_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], blocks: Sequence[Buffer], parent: PrefixHash | None = None
    ) -> int:
        """Store consecutive blocks of one chain (``parent`` precedes ``hashes[0]``; default the chain root);
        returns the node's count of blocks stored."""
        return await self._run((await self._operations()).put_blocks(spec, hashes, blocks, parent))

    async def put(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        kv: KV,
        extras: Sequence[bytes] | None = None,
    ) -> int:
        """Store the full blocks of ``tokens`` from ``kv`` (``[n_blocks, *block_shape]`` or a list of blocks)."""
        hashes = await self.block_hashes(spec, tokens, extras)
        return await self._run((await self._operations()).put(spec, hashes, kv))

    # --- lifecycle -----------------------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close every connection and the fast path; later calls raise :class:`ClientError`."""
        self._closed = True
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._close_fast_path()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
