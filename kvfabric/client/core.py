"""What the blocking and the asyncio client hold alike: the endpoint and options they were made with, the
session the first connection learnt (as the :class:`~kvfabric.client.plans.Operations` of that session), the
fast-path reader and the pinned staging buffers. The clients add only their connections and how they drive plans."""

from __future__ import annotations

import ssl

from kvfabric.client.buffers import PinnedStaging
from kvfabric.client.leased import LeasedReader
from kvfabric.client.plans import Operations
from kvfabric.client.session import ClientOptions, parse_url
from kvfabric.errors import ClientError


class ClientCore:
    def __init__(
        self, url: str = "kvfabric://127.0.0.1:9500", *, token: str | None = None, timeout: float = 10.0,
        pool_size: int = 4, shm: bool | None = None, nixl: bool = False, retries: int = 2,
        ssl: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        """A client of the node at ``url`` (``kvfabric://host:port``, or ``kvfabrics://`` for TLS); it connects
        on first use.

        ``token``: the bearer token naming the tenant (none when the node runs without auth). ``timeout``: seconds
        for a connection or one request. ``pool_size``: connections at most. ``shm``: read blocks through the
        node's shared memory when it is on this host (``None``: when offered; ``False``: never). ``nixl``: read
        blocks one-sidedly over NIXL when offered. ``retries``: further attempts of an idempotent call after a
        connection failure. ``ssl``: the TLS context (default: the system's, for ``kvfabrics://``).
        """
        self.endpoint = parse_url(url)
        self.options = ClientOptions(token, timeout, pool_size, shm, nixl, retries, ssl)
        self._ops: Operations | None = None  # set when the first connection has said hello
        self._closed = False
        self._staging = PinnedStaging()  # host buffers for CUDA tensors, reused across calls
        self._open_pool()

    def _open_pool(self) -> None:
        """Set up the (empty) connection pool."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise ClientError("client is closed")

    @property
    def _leased(self) -> LeasedReader | None:
        return self._ops.leased if self._ops is not None else None

    @staticmethod
    def _transport_of(ops: Operations) -> str:
        return ops.leased.kind if ops.leased is not None else "tcp"

    def _close_fast_path(self) -> None:
        self._closed = True
        leased = self._leased
        if leased is not None:
            self._ops = Operations(self._ops.session, None, self._staging)  # type: ignore[union-attr]
            try:
                leased.close()
            except BufferError:
                pass  # a view into the arena is still alive; the mapping goes with it
