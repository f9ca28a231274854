"""The blocking client: a pool of connections, each call's runs one after another (retried on their own when
idempotent), zero-copy gets into caller buffers, and the same-host shared-memory / NIXL paths when available.
What each call sends and how its replies decode is in :mod:`kvfabric.client.plans`; this module only drives it."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Self, TypeVar

from kvfabric.client.buffers import KV, Buffer
from kvfabric.client.core import ClientCore
from kvfabric.client.plans import Operation, Operations, Plan, fast_path
from kvfabric.client.session import LookupResult, SessionInfo, Tokens
from kvfabric.client.sync_conn import SyncConnection
from kvfabric.errors import ClientError
from kvfabric.ids import ModelFingerprint, PrefixHash
from kvfabric.spec import ModelSpec

if TYPE_CHECKING:
    import torch

R = TypeVar("R")
T = TypeVar("T")


class Client(ClientCore):
    """``Client("kvfabric://host:9500", token=...)``; use as a context manager or call :meth:`close`.

    Thread-safe: concurrent calls use different connections of the pool."""

    def _open_pool(self) -> None:
        self._idle: queue.LifoQueue[SyncConnection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.options.pool_size)
        self._lock = threading.Lock()

    # --- connections ---------------------------------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[SyncConnection]:
        self._check_open()
        if not self._slots.acquire(timeout=self.options.timeout):
            raise ClientError(f"no free connection to {self.endpoint} within {self.options.timeout}s")
        conn = None
        try:
            while conn is None:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    conn = SyncConnection(self.endpoint, self.options)
                    break
                if conn.stale():  # closed by the server while idle: a request on it would fail, a PUT unretried
                    conn.close()
                    conn = None
            if self._ops is None:  # the first connection, or the one after a failed first fast-path setup
                self._adopt(conn)
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
            if self._ops is None:
                leased = conn.run(fast_path(conn.session, self.options, self.endpoint))
                self._ops = Operations(conn.session, leased, self._staging)

    @property
    def _operations(self) -> Operations:
        if self._ops is None:
            with self._connection():
                pass
        assert self._ops is not None
        return self._ops

    def _run(self, op: Operation[Any, T]) -> T:
        try:
            if op.before is not None:
                self._run(op.before)
            return op.combine([self._attempt(op, run) for run in op.runs])
        finally:
            if op.after is not None:
                op.after()

    def _attempt(self, op: Operation[R, Any], run: Callable[[], Plan[R]]) -> R:
        attempt = 0
        while True:
            try:
                with self._connection() as conn:
                    return conn.run(run())
            except ClientError as exc:
                time.sleep(self.options.retry_delay(op.what, self.endpoint, attempt, exc,
                                                    op.idempotent and not self._closed))  # fmt: skip
            attempt += 1

    @property
    def session(self) -> SessionInfo:
        """What the server said at hello: tenant, salt, limits, offers (connects if not yet connected)."""
        return self._operations.session

    @property
    def transport(self) -> str:
        """``"shm"``, ``"nixl"`` or ``"tcp"``: how blocks travel for this client."""
        return self._transport_of(self._operations)

    # --- models and hashes ---------------------------------------------------------------------------------------
    def register_model(self, spec: ModelSpec) -> ModelFingerprint:
        """Register ``spec`` with the node (a put does this when needed); returns its fingerprint."""
        return self._run(self._operations.register_model(spec))

    def block_hashes(self, spec: ModelSpec, tokens: Tokens, extras: Sequence[bytes] | None = None) -> list[PrefixHash]:
        """This tenant's chained hashes of every full block of ``tokens`` (``extras``: one per block, mixed in)."""
        return self.session.hashes(spec, tokens, extras)

    # --- key operations ------------------------------------------------------------------------------------------
    def lookup(self, spec: ModelSpec, tokens: Tokens, extras: Sequence[bytes] | None = None) -> LookupResult:
        """The longest prefix of ``tokens`` the fabric holds for this tenant and model."""
        return self._run(self._operations.lookup(spec, self.block_hashes(spec, tokens, extras)))

    def exists(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> list[bool]:
        """Whether each block is held (in any tier)."""
        return self._run(self._operations.exists(spec, hashes))

    def delete(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        """Delete the blocks from every tier; returns how many were held."""
        return self._run(self._operations.count("delete", spec, hashes))

    def pin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        """Keep the blocks from eviction until unpinned; returns how many were pinned."""
        return self._run(self._operations.count("pin", spec, hashes))

    def unpin(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> int:
        """Let pinned blocks be evicted again; returns how many were unpinned."""
        return self._run(self._operations.count("unpin", spec, hashes))

    def stats(self) -> dict[str, Any]:
        """The node's counters and tier totals, as this tenant may see them."""
        return self._run(self._operations.stats())

    # --- get -----------------------------------------------------------------------------------------------------
    def get_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], out: Sequence[Buffer] | None = None, *,
        chunks: int = 1, on_chunk: Callable[[int], None] | None = None,
    ) -> list[Buffer | None]:  # fmt: skip
        """Fetch blocks into ``out`` (one buffer per hash: numpy, torch CPU/CUDA, bytearray) or new uint8 arrays.

        Returns the buffer for each hit and ``None`` for each miss. ``chunks > 1`` streams over TCP chunk-major
        (chunk ``c`` of every block, then ``c + 1``) and calls ``on_chunk(c)`` as each completes: with
        ``chunks = spec.num_layers`` that is layer by layer."""
        return self._run(self._operations.get_blocks(spec, hashes, out, chunks, on_chunk))

    def get(
        self, spec: ModelSpec, tokens: Tokens, out: torch.Tensor | None = None, extras: Sequence[bytes] | None = None
    ) -> torch.Tensor | None:
        """KV of the longest cached prefix of ``tokens`` as a tensor ``[n_blocks, *spec.block_shape]`` (into
        ``out`` when given, which must hold at least as many blocks as ``tokens`` has), or ``None``."""
        return self._run(self._operations.get(spec, self.block_hashes(spec, tokens, extras), out))

    # --- put -----------------------------------------------------------------------------------------------------
    def put_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], blocks: Sequence[Buffer], parent: PrefixHash | None = None
    ) -> int:
        """Store consecutive blocks of one chain (``parent`` precedes ``hashes[0]``; default the chain root);
        returns the node's count of blocks stored."""
        return self._run(self._operations.put_blocks(spec, hashes, blocks, parent))

    def put(self, spec: ModelSpec, tokens: Tokens, kv: KV, extras: Sequence[bytes] | None = None) -> int:
        """Store the full blocks of ``tokens`` from ``kv`` (``[n_blocks, *block_shape]`` or a list of blocks)."""
        return self._run(self._operations.put(spec, self.block_hashes(spec, tokens, extras), kv))

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and the fast path; later calls raise :class:`ClientError`."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self._close_fast_path()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
