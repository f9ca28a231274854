"""The blocking client: a pool of connections, retries on idempotent operations, zero-copy gets into caller
buffers, and the same-host shared-memory / NIXL paths when available."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from kvfabric.client.buffers import Destination, PinnedStaging, readable, settle, torch_dtype, writable
from kvfabric.client.leased import LeasedReader
from kvfabric.client.session import (
    ClientOptions,
    GetPlan,
    LookupResult,
    SessionInfo,
    batches,
    expect,
    leading,
    parse_url,
    put_items,
)
from kvfabric.client.sync_conn import SyncConnection
from kvfabric.errors import ClientError, RemoteError
from kvfabric.hashing import root_hash
from kvfabric.ids import ModelFingerprint, PrefixHash
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr
from kvfabric.transport import nixl as nixl_transport
from kvfabric.transport.shm import ArenaMap

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_BACKOFF_S = 0.05


class Client:
    """``Client("kvfabric://host:9500", token=...)``; use as a context manager or call :meth:`close`."""

    def __init__(
        self, url: str = "kvfabric://127.0.0.1:9500", *, token: str | None = None, timeout: float = 10.0,
        pool_size: int = 4, shm: bool | None = None, nixl: bool = False, retries: int = 2, ssl: Any = None,
    ) -> None:  # fmt: skip
        self.endpoint = parse_url(url)
        self.options = ClientOptions(token, timeout, pool_size, shm, nixl, retries, ssl)
        self._idle: queue.LifoQueue[SyncConnection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._session: SessionInfo | None = None
        self._leased: LeasedReader | None = None
        self._closed = False
        self._staging = PinnedStaging()  # host buffers for CUDA tensors, reused across calls

    # --- connections ---------------------------------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[SyncConnection]:
        if self._closed:
            raise ClientError("client is closed")
        if not self._slots.acquire(timeout=self.options.timeout):
            raise ClientError(f"no free connection to {self.endpoint} within {self.options.timeout}s")
        conn = None
        try:
            while conn is None:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    conn = SyncConnection(self.endpoint, self.options)
                    self._adopt(conn)
                    break
                if conn.stale():  # closed by the server while idle: a request on it would fail, a PUT unretried
                    conn.close()
                    conn = None
            yield conn
        finally:
            if conn is not None:
                if conn.broken or self._closed:
                    conn.close()
                else:
                    self._idle.put(conn)
            self._slots.release()

    def _adopt(self, conn: SyncConnection) -> None:
        with self._lock:
            if self._session is None:
                self._session = conn.session
                self._leased = self._open_fast_path(conn)

    def _open_fast_path(self, conn: SyncConnection) -> LeasedReader | None:
        session = conn.session
        if self.options.nixl:
            if not session.nixl:
                log.warning("NIXL requested but %s does not offer it; using TCP", self.endpoint)
                return None
            ep = nixl_transport.client_endpoint()
            if ep is None:
                return None
            try:
                reply = expect(conn.request(fr.encode_nixl_connect(conn.next_id(), ep.metadata)), fr.NixlOk, "nixl")
            except RemoteError as exc:  # the server offered NIXL but could not start its endpoint
                log.warning("NIXL unavailable on %s (%s); using TCP", self.endpoint, exc)
                ep.close()
                return None
            ep.connect(reply.agent_metadata)
            log.info("reading blocks from %s over NIXL", self.endpoint)
            return LeasedReader(nixl=ep, base_addr=reply.base_addr)
        if self.options.shm is False:
            return None
        if session.shm is None:
            if self.options.shm:
                log.warning("shared memory requested but %s is not on this host; using TCP", self.endpoint)
            return None
        try:
            arena = ArenaMap(session.shm.path, expect=session.shm)
        except OSError as exc:
            log.warning("cannot map the server's arena %s (%s); using TCP", session.shm.path, exc)
            return None
        log.info("reading blocks from %s through shared memory %s", self.endpoint, session.shm.path)
        return LeasedReader(arena=arena)

    def _call(self, what: str, fn: Callable[[SyncConnection], T], idempotent: bool = True) -> T:
        attempts = self.options.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                with self._connection() as conn:
                    return fn(conn)
            except RemoteError:
                raise
            except ClientError as exc:
                if attempt + 1 >= attempts or self._closed:
                    raise ClientError(f"{what} on {self.endpoint} failed after {attempt + 1} attempt(s): {exc}") \
                        from exc
                log.info("%s on %s failed (%s); retrying", what, self.endpoint, exc)
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    @property
    def session(self) -> SessionInfo:
        if self._session is None:
            with self._connection():
                pass
        assert self._session is not None
        return self._session

    @property
    def transport(self) -> str:
        """``"shm"``, ``"nixl"`` or ``"tcp"``: how blocks travel for this client."""
        _ = self.session
        return self._leased.kind if self._leased is not None else "tcp"

    # --- models and hashes ---------------------------------------------------------------------------------------
    def register_model(self, spec: ModelSpec) -> ModelFingerprint:
        def op(conn: SyncConnection) -> ModelFingerprint:
            reply = conn.request(fr.encode_register_model(conn.next_id(), spec.to_dict()), what="register_model")
            return expect(reply, fr.ModelOk, "register_model").fingerprint

        fp = self._call("register_model", op)
        self.session.registered.add(fp)
        return fp

    def _ensure_model(self, spec: ModelSpec) -> ModelFingerprint:
        fp = self.session.fingerprint(spec)
        if fp not in self.session.registered:
            self.register_model(spec)
        return fp

    def block_hashes(self, spec: ModelSpec, tokens: Any, extras: Sequence[bytes] | None = None) -> list[PrefixHash]:
        """This tenant's chained hashes of every full block of ``tokens``."""
        return self.session.hashes(spec, tokens, extras)

    # --- key operations ------------------------------------------------------------------------------------------
    def _keys(self, kind: fr.KeyOp, spec: ModelSpec, hashes: Sequence[PrefixHash], idempotent: bool) -> list[Any]:
        fp = self.session.fingerprint(spec)
        out: list[Any] = []
        for run in batches(len(hashes), [0] * len(hashes), self.session.limits):
            def op(conn: SyncConnection, run: range = run) -> fr.Frame:
                return conn.request(fr.encode_keys(conn.next_id(), kind, fp, [hashes[i] for i in run]), what=kind)

            out.append(self._call(kind, op, idempotent))
        return out

    def lookup(self, spec: ModelSpec, tokens: Any, extras: Sequence[bytes] | None = None) -> LookupResult:
        """The longest prefix of ``tokens`` the fabric holds for this tenant and model."""
        hashes = self.block_hashes(spec, tokens, extras)
        tiers: list[Any] = []
        for reply in self._keys("lookup", spec, hashes, True):
            run = expect(reply, fr.LookupOk, "lookup").tiers
            tiers.extend(run)
            if len(run) < min(len(hashes), self.session.limits.max_batch):
                break
        return LookupResult(len(tiers), len(tiers) * spec.block_size, tuple(tiers))

    def exists(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> list[bool]:
        return [f for r in self._keys("exists", spec, hashes, True) for f in expect(r, fr.Flags, "exists").flags]

    def delete(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        return sum(expect(r, fr.Count, "delete").count for r in self._keys("delete", spec, hashes, False))

    def pin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        return sum(expect(r, fr.Count, "pin").count for r in self._keys("pin", spec, hashes, False))

    def unpin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        return sum(expect(r, fr.Count, "unpin").count for r in self._keys("unpin", spec, hashes, False))

    def stats(self) -> dict[str, Any]:
        def op(conn: SyncConnection) -> dict[str, Any]:
            return expect(conn.request(fr.encode_stats(conn.next_id()), what="stats"), fr.StatsOk, "stats").stats

        return self._call("stats", op)

    # --- get -----------------------------------------------------------------------------------------------------
    def get_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], out: Sequence[Any] | None = None, *,
        chunks: int = 1, on_chunk: Callable[[int], None] | None = None,
    ) -> list[Any | None]:  # fmt: skip
        """Fetch blocks into ``out`` (one buffer per hash: numpy, torch CPU/CUDA, bytearray) or new uint8 arrays.

        Returns the buffer for each hit and ``None`` for each miss. ``chunks > 1`` streams over TCP chunk-major
        (chunk ``c`` of every block, then ``c + 1``) and calls ``on_chunk(c)`` as each completes: with
        ``chunks = spec.num_layers`` that is layer by layer."""
        if out is None:
            out = [np.empty(spec.block_nbytes, dtype=np.uint8) for _ in hashes]
        if len(out) != len(hashes):
            raise ValueError(f"{len(out)} output buffers for {len(hashes)} hashes")
        dests = [writable(o, self._staging) for o in out]
        fp = self.session.fingerprint(spec)
        found: list[bool] = []
        try:
            for run in batches(len(hashes), [spec.block_nbytes] * len(hashes), self.session.limits, chunks):
                h = [hashes[i] for i in run]
                d = [dests[i] for i in run]
                if self._leased is not None and chunks == 1:
                    metas = self._call("get", lambda conn: self._get_leased(conn, fp, h, d))
                else:
                    metas = self._call("get", lambda conn: self._get_tcp(conn, fp, h, d, chunks, on_chunk))
                found.extend(m is not None for m in metas)
        finally:
            settle(dests, self._staging)  # device copies done, staging buffers back for the next call
        return [o if f else None for o, f in zip(out, found, strict=True)]

    def _get_tcp(
        self, conn: SyncConnection, fp: bytes, hashes: list[PrefixHash], dests: Sequence[Destination | None],
        chunks: int = 1, on_chunk: Callable[[int], None] | None = None,
    ) -> list[fr.WireMeta | None]:  # fmt: skip
        plan = GetPlan(dests, chunks, on_chunk)
        reply = conn.request(
            fr.encode_get(conn.next_id(), fp, hashes, chunks), sink=plan.sink, on_segment=plan.on_segment, what="get"
        )
        return plan.finish(expect(reply, fr.Blocks, "get"))

    def _get_leased(
        self, conn: SyncConnection, fp: bytes, hashes: list[PrefixHash], dests: Sequence[Destination | None]
    ) -> list[fr.WireMeta | None]:
        assert self._leased is not None
        reply = expect(conn.request(fr.encode_lease(conn.next_id(), fp, hashes), what="lease"), fr.Leases, "lease")
        ids = [e.lease_id for e in reply.entries if isinstance(e, fr.Lease)]
        try:
            result = self._leased.read(reply.entries, dests)
        finally:
            if ids:
                conn.send_oneway(fr.encode_release(conn.next_id(), ids))
        if result.elsewhere:
            metas = self._get_tcp(conn, fp, [hashes[i] for i in result.elsewhere], [dests[i] for i in result.elsewhere])
            for i, m in zip(result.elsewhere, metas, strict=True):
                result.metas[i] = m
        return result.metas

    def get(self, spec: ModelSpec, tokens: Any, out: Any = None, extras: Sequence[bytes] | None = None) -> Any:
        """KV of the longest cached prefix of ``tokens`` as a tensor ``[n_blocks, *spec.block_shape]`` (into
        ``out`` when given, which must hold at least as many blocks as ``tokens`` has), or ``None``."""
        import torch

        hashes = self.block_hashes(spec, tokens, extras)
        if not hashes:
            return None
        if out is None:
            out = torch.empty((len(hashes), *spec.block_shape), dtype=torch_dtype(spec.dtype))
        got = self.get_blocks(spec, hashes, [out[i] for i in range(len(hashes))])
        n = leading(got)
        return out[:n] if n else None

    # --- put -----------------------------------------------------------------------------------------------------
    def put_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], blocks: Sequence[Any], parent: PrefixHash | None = None
    ) -> int:
        """Store consecutive blocks of one chain (``parent`` precedes ``hashes[0]``; default the chain root)."""
        if len(blocks) != len(hashes):
            raise ValueError(f"{len(blocks)} blocks for {len(hashes)} hashes")
        fp = self._ensure_model(spec)
        root = parent if parent is not None else root_hash(fp, self.session.salt)
        held: list[Any] = []  # pinned buffers of CUDA sources, released below
        payloads = [readable(b, self._staging, held) for b in blocks]
        items = put_items(spec, hashes, root, payloads)
        stored = 0
        try:
            for run in batches(len(items), [it.meta.nbytes for it in items], self.session.limits):
                def op(conn: SyncConnection, run: range = run) -> int:
                    head = fr.encode_put(conn.next_id(), fp, [items[i] for i in run])
                    reply = conn.request(head, [payloads[i] for i in run], what="put")
                    return expect(reply, fr.Count, "put").count

                stored += self._call("put", op)  # content-addressed: re-sending the same blocks is harmless
        finally:
            self._staging.release(held)
        return stored

    def put(self, spec: ModelSpec, tokens: Any, kv: Any, extras: Sequence[bytes] | None = None) -> int:
        """Store the full blocks of ``tokens`` from ``kv`` (``[n_blocks, *block_shape]`` or a list of blocks)."""
        hashes = self.block_hashes(spec, tokens, extras)
        n = min(len(hashes), len(kv))
        return self.put_blocks(spec, hashes[:n], [kv[i] for i in range(n)]) if n else 0

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        if self._leased is not None:
            try:
                self._leased.close()
            except BufferError:
                pass  # a view into the arena is still alive; the mapping goes with it
            self._leased = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
