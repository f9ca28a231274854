"""What both clients share, free of I/O: the URL and options, what the server said at hello, replies -> results or
exceptions, how requests split into batches, where a GET's payload lands, and when a failed call is retried.
The operations built from these are in :mod:`kvfabric.client.plans`."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeAlias, TypeVar
from urllib.parse import urlsplit

import numpy as np

from kvfabric.client.buffers import Destination
from kvfabric.errors import AuthError, ClientError, ConfigError, ProtocolError, RemoteError
from kvfabric.hashing import prefix_hashes, root_hash
from kvfabric.ids import ModelFingerprint, PrefixHash, TierId
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr

DEFAULT_PORT = 9500
CLIENT_LIMITS: Final = fr.Limits(max_body_bytes=64 << 20, max_batch=1 << 20, max_block_bytes=1 << 40,
                                  max_payload_bytes=1 << 44)  # fmt: skip
"""What a client accepts in a reply: it trusts its server's sizes and only guards against absurd values."""
RETRY_BACKOFF_S = 0.05
"""The wait before a call's first retry; it doubles for each one after."""
F = TypeVar("F")
Tokens: TypeAlias = Sequence[int] | np.ndarray
"""Token ids, one-dimensional (a CPU tensor passes as an array)."""


class Endpoint(NamedTuple):
    """Where a client connects; ``tls`` for a ``kvfabrics://`` URL."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'kvfabrics' if self.tls else 'kvfabric'}://{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """``kvfabric://host:port`` (plain TCP) or ``kvfabrics://host:port`` (TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("kvfabric", "kvfabrics", "tcp"):
        raise ConfigError(f"unsupported URL scheme in {url!r}: use kvfabric://host:port or kvfabrics://host:port")
    if not parts.hostname:
        raise ConfigError(f"URL {url!r} names no host")
    return Endpoint(parts.hostname, parts.port or DEFAULT_PORT, parts.scheme == "kvfabrics")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    token: str | None = None
    timeout: float = 10.0
    pool_size: int = 4
    shm: bool | None = None  # None: use shared memory when the server offers it (same host)
    nixl: bool = False  # read blocks one-sidedly over NIXL when the server offers it
    retries: int = 2
    ssl: ssl.SSLContext | None = None

    def features(self) -> tuple[str, ...]:
        return ("shm",) if self.shm is not False else ()

    def retry_delay(self, what: str, endpoint: Endpoint, attempt: int, exc: ClientError, idempotent: bool) -> float:
        """Seconds to wait before retrying ``what`` after ``exc`` ended attempt ``attempt`` (from 0), or raises
        the call's final error: when attempts are spent, the operation is not idempotent, or the server refused
        it (a :class:`RemoteError` answers the request itself; sending it again gets the same answer)."""
        attempts = self.retries + 1 if idempotent else 1
        if isinstance(exc, RemoteError):
            raise exc
        if attempt + 1 >= attempts:
            raise ClientError(f"{what} on {endpoint} failed after {attempt + 1} attempt(s): {exc}") from exc
        return float(RETRY_BACKOFF_S * 2**attempt)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The longest cached prefix: ``blocks`` leading blocks (``tokens`` tokens), and the tier holding each."""

    blocks: int
    tokens: int
    tiers: tuple[TierId, ...]


@dataclass(slots=True)
class SessionInfo:
    """What the server told us at hello (identical for every connection of one client)."""

    tenant: str
    salt: bytes
    node_id: str
    limits: fr.ServerLimits
    shm: fr.ShmOffer | None
    nixl: bool
    registered: set[ModelFingerprint] = field(default_factory=set)
    _fingerprints: dict[ModelSpec, ModelFingerprint] = field(default_factory=dict)

    def fingerprint(self, spec: ModelSpec) -> ModelFingerprint:
        """``spec.fingerprint()``, remembered: it hashes canonical JSON, ~0.1 ms, paid once per spec, not per call."""
        fp = self._fingerprints.get(spec)
        if fp is None:
            fp = self._fingerprints[spec] = spec.fingerprint()
        return fp

    def hashes(self, spec: ModelSpec, tokens: Tokens, extras: Sequence[bytes] | None = None) -> list[PrefixHash]:
        return prefix_hashes(root_hash(self.fingerprint(spec), self.salt), tokens, spec.block_size, extras)


def session_from(reply: fr.Frame | None) -> SessionInfo:
    hello = expect(reply, fr.HelloOk, "hello")
    return SessionInfo(hello.tenant, hello.salt, hello.node_id, hello.limits, hello.shm, hello.nixl)


def expect(reply: fr.Frame | None, kind: type[F], what: str) -> F:
    """``reply`` as ``kind``, or the matching exception for an ERROR frame / unexpected frame / no reply."""
    if isinstance(reply, kind):
        return reply
    if isinstance(reply, fr.Error):
        if reply.code in ("auth", "forbidden"):
            raise AuthError(f"{what} refused: {reply.message}")
        raise RemoteError(reply.code, f"{what} failed: {reply.message}")
    raise ProtocolError(f"{what}: server answered with {f'a {reply.op} frame' if reply is not None else 'nothing'}")


def batches(n: int, per_item: Sequence[int], limits: fr.ServerLimits, views: int = 1) -> list[range]:
    """Split ``n`` items into runs within the server's batch and payload limits and, for a GET whose reply has
    ``views`` views per block (its chunks), its limit of reply views; key operations pass ``views=0``."""
    out, start, size = [], 0, 0
    most = max(1, min(limits.max_batch, limits.max_reply_views // views) if views else limits.max_batch)
    for i in range(n):
        if i > start and (i - start >= most or size + per_item[i] > limits.max_payload_bytes):
            out.append(range(start, i))
            start, size = i, 0
        size += per_item[i]
    if n > start:
        out.append(range(start, n))
    return out


class GetPlan:
    """Destinations for one GET reply: the sink hands the receiver a view per found block (chunk-major when
    streaming layers) and ``on_segment`` reports each finished chunk."""

    def __init__(
        self, dests: Sequence[Destination | None], chunks: int = 1, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        self.dests = dests
        self.chunks = chunks
        self.on_chunk = on_chunk
        self.metas: tuple[fr.WireMeta | None, ...] = ()
        self.error: Exception | None = None
        self._found = 0

    def sink(self, reply: fr.Frame) -> list[memoryview] | None:
        if not isinstance(reply, fr.Blocks):
            return None
        self.metas = reply.metas
        views = []
        for i, meta in enumerate(reply.metas):
            if meta is None:
                continue
            dest = self.dests[i]
            if dest is None or len(dest.view) < meta.nbytes:
                have = len(dest.view) if dest is not None else 0
                self.error = ValueError(f"destination {i} holds {have} bytes, block needs {meta.nbytes}")
                return None
            views.append(dest.view[: meta.nbytes])
        self._found = len(views)
        if self.chunks == 1:
            return views
        return [v[c * (len(v) // self.chunks) : (c + 1) * (len(v) // self.chunks)] for c in range(self.chunks)
                for v in views]  # fmt: skip

    def on_segment(self, reply: fr.Frame, index: int) -> None:
        if self.on_chunk is not None and self.chunks > 1 and (index + 1) % self._found == 0:
            self.on_chunk(index // self._found)

    def finish(self, reply: fr.Blocks) -> list[fr.WireMeta | None]:
        self.metas = reply.metas
        if self.error is not None:
            raise ClientError(str(self.error)) from self.error
        for dest, meta in zip(self.dests, self.metas, strict=False):
            if meta is not None and dest is not None:
                dest.finish()
        if self.on_chunk is not None and self._found == 0:
            for c in range(self.chunks):
                self.on_chunk(c)
        return list(self.metas)


def put_items(
    spec: ModelSpec, hashes: Sequence[PrefixHash], root: PrefixHash, payloads: Sequence[memoryview]
) -> list[fr.PutItem]:
    """Items for consecutive blocks of one chain: block i's parent is block i-1 (the chain root for block 0)."""
    items = []
    for i, (h, payload) in enumerate(zip(hashes, payloads, strict=True)):
        if len(payload) != spec.block_nbytes:
            raise ValueError(f"block {i} holds {len(payload)} bytes, {spec.model} needs {spec.block_nbytes}")
        parent = hashes[i - 1] if i else root
        items.append(fr.PutItem(h, fr.WireMeta(parent, spec.dtype, spec.block_shape, spec.block_size)))
    return items


def leading(metas: Sequence[object | None]) -> int:
    n = 0
    for m in metas:
        if m is None:
            break
        n += 1
    return n


__all__ = [
    "ClientOptions", "Endpoint", "GetPlan", "LookupResult", "SessionInfo", "batches", "expect",
    "leading", "parse_url", "put_items", "session_from",
]  # fmt: skip
