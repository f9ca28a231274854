"""Every client call as a plan, free of socket I/O: which frames it sends (split into runs within the server's
limits), where reply payloads land, how replies are checked, decoded and combined.

A plan is a generator that yields :class:`Request` s and is sent each reply; an :class:`Operation` is a call's
independent runs (a plan factory each: a retry starts a fresh plan) and how their results combine. The blocking
client (:mod:`kvfabric.client.sync`) and the asyncio one (:mod:`kvfabric.client.aio`) only drive these plans over
their connections, one run after another or all at once: the sans-I/O pattern of h11 or nats-core's protocol
module, so both clients behave alike by construction.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from kvfabric.client.buffers import KV, Buffer, Destination, PinnedStaging, readable, settle, torch_dtype, writable
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
    put_items,
    session_from,
)
from kvfabric.errors import RemoteError
from kvfabric.hashing import root_hash
from kvfabric.ids import ModelFingerprint, PrefixHash, TierId
from kvfabric.spec import ModelSpec
from kvfabric.transport import frames as fr
from kvfabric.transport import nixl as nixl_transport
from kvfabric.transport.shm import ArenaMap, host_identity

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
R = TypeVar("R")
T = TypeVar("T")
F = TypeVar("F")

Sink = Callable[[fr.Frame], Sequence[memoryview] | None]
"""Given a reply with a payload, the views its payload bytes go into, in order (``None``: discard them)."""
OnSegment = Callable[[fr.Frame, int], None]
"""Called as view ``index`` of a reply's payload fills."""


@dataclass(frozen=True, slots=True)
class Request:
    """One frame to send: ``encode(request_id)`` builds its head, ``payload`` follows it; ``oneway`` frames get
    no reply (the plan is sent ``None``)."""

    what: str
    encode: Callable[[int], bytes]
    payload: Sequence[memoryview] = ()
    sink: Sink | None = None
    on_segment: OnSegment | None = None
    oneway: bool = False


Plan = Generator[Request, fr.Frame | None, R]
"""Yields each request in turn on one connection, is sent its reply, returns the run's result."""


@dataclass(frozen=True, slots=True)
class Operation(Generic[R, T]):
    """One client call: ``runs`` are independent (each retried on its own, by a fresh plan); ``combine`` turns
    their results, in order, into the call's. ``before`` runs first (the model registration a put needs);
    ``after`` runs once every run has ended, however it ended (device copies settled, staging returned)."""

    what: str
    runs: Sequence[Callable[[], Plan[R]]]
    combine: Callable[[list[R]], T]
    idempotent: bool = True
    before: Operation[Any, Any] | None = None
    after: Callable[[], None] | None = None


def advance(plan: Plan[R], reply: fr.Frame | None) -> tuple[Request | None, R | None]:
    """Send ``reply`` into ``plan``: its next request, or ``(None, result)`` when it has finished."""
    try:
        return plan.send(reply), None
    except StopIteration as done:
        return None, done.value


def ask(what: str, encode: Callable[[int], bytes], kind: type[F], payload: Sequence[memoryview] = ()) -> Plan[F]:
    """One request whose reply must be a ``kind`` frame."""
    return expect((yield Request(what, encode, payload)), kind, what)


def hello(options: ClientOptions) -> Plan[SessionInfo]:
    """A new connection's first exchange: authenticate, learn the tenant, its salt and the server's limits."""
    features = options.features()
    reply = yield Request("hello", lambda rid: fr.encode_hello(rid, options.token, host_identity(), features))
    return session_from(reply)


def fast_path(session: SessionInfo, options: ClientOptions, endpoint: Endpoint) -> Plan[LeasedReader | None]:
    """The reader for same-host shared memory or NIXL when asked for and offered (run on the first connection);
    ``None``: blocks travel over TCP."""
    if options.nixl:
        if not session.nixl:
            log.warning("NIXL requested but %s does not offer it; using TCP", endpoint)
            return None
        ep = nixl_transport.client_endpoint()
        if ep is None:
            return None
        try:
            ok = yield from ask("nixl", lambda rid: fr.encode_nixl_connect(rid, ep.metadata), fr.NixlOk)
        except RemoteError as exc:  # the server offered NIXL but could not start its endpoint
            log.warning("NIXL unavailable on %s (%s); using TCP", endpoint, exc)
            ep.close()
            return None
        ep.connect(ok.agent_metadata)
        log.info("reading blocks from %s over NIXL", endpoint)
        return LeasedReader(nixl=ep, base_addr=ok.base_addr)
    if options.shm is False:
        return None
    if session.shm is None:
        if options.shm:
            log.warning("shared memory requested but %s is not on this host; using TCP", endpoint)
        return None
    try:
        arena = ArenaMap(session.shm.path, expect=session.shm)
    except OSError as exc:
        log.warning("cannot map the server's arena %s (%s); using TCP", session.shm.path, exc)
        return None
    log.info("reading blocks from %s through shared memory %s", endpoint, session.shm.path)
    return LeasedReader(arena=arena)


Metas = list[fr.WireMeta | None]


def get_tcp(
    fp: ModelFingerprint, hashes: list[PrefixHash], dests: Sequence[Destination | None], chunks: int = 1,
    on_chunk: Callable[[int], None] | None = None,
) -> Plan[Metas]:  # fmt: skip
    """GET: found blocks' payloads straight into their destinations (chunk-major when ``chunks > 1``)."""
    plan = GetPlan(dests, chunks, on_chunk)
    reply = yield Request("get", lambda rid: fr.encode_get(rid, fp, hashes, chunks), (), plan.sink, plan.on_segment)
    return plan.finish(expect(reply, fr.Blocks, "get"))


def get_leased(
    leased: LeasedReader, fp: ModelFingerprint, hashes: list[PrefixHash], dests: Sequence[Destination | None]
) -> Plan[Metas]:
    """LEASE the blocks, copy them out of the server's arena (or read them over NIXL), RELEASE the leases; blocks
    held only below RAM are then fetched over TCP."""
    reply = yield from ask("lease", lambda rid: fr.encode_lease(rid, fp, hashes), fr.Leases)
    ids = [e.lease_id for e in reply.entries if isinstance(e, fr.Lease)]
    try:
        result = leased.read(reply.entries, dests)
    finally:  # the leases go back even when the copy failed
        if ids:
            yield Request("release", lambda rid: fr.encode_release(rid, ids), oneway=True)
    if result.elsewhere:
        idx = result.elsewhere
        metas = yield from get_tcp(fp, [hashes[i] for i in idx], [dests[i] for i in idx])
        for i, m in zip(idx, metas, strict=True):
            result.metas[i] = m
    return result.metas


class Operations:
    """The public calls of a client as :class:`Operation` s, for one session (what hello said, the fast path)."""

    def __init__(self, session: SessionInfo, leased: LeasedReader | None, staging: PinnedStaging) -> None:
        self.session = session
        self.leased = leased
        self.staging = staging

    # --- models --------------------------------------------------------------------------------------------------
    def register_model(self, spec: ModelSpec) -> Operation[ModelFingerprint, ModelFingerprint]:
        def run() -> Plan[ModelFingerprint]:
            encode = functools.partial(fr.encode_register_model, spec=spec.to_dict())
            ok = yield from ask("register_model", encode, fr.ModelOk)
            return ok.fingerprint

        def remember(fps: list[ModelFingerprint]) -> ModelFingerprint:
            self.session.registered.add(fps[0])
            return fps[0]

        return Operation("register_model", [run], remember)

    def _registration(self, spec: ModelSpec) -> Operation[Any, Any] | None:
        """The registration a put of ``spec`` needs first, unless this session has registered it."""
        return None if self.session.fingerprint(spec) in self.session.registered else self.register_model(spec)

    # --- key operations ------------------------------------------------------------------------------------------
    def _keys(
        self, kind: fr.KeyOp, spec: ModelSpec, hashes: Sequence[PrefixHash], reply: type[F],
        combine: Callable[[list[F]], T], idempotent: bool,
    ) -> Operation[F, T]:  # fmt: skip
        fp = self.session.fingerprint(spec)

        def run(keys: list[PrefixHash]) -> Plan[F]:
            return (yield from ask(kind, lambda rid: fr.encode_keys(rid, kind, fp, keys), reply))

        runs = batches(len(hashes), [0] * len(hashes), self.session.limits, views=0)
        return Operation(kind, [functools.partial(run, [hashes[i] for i in r]) for r in runs], combine, idempotent)

    def lookup(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> Operation[fr.LookupOk, LookupResult]:
        def prefix(replies: list[fr.LookupOk]) -> LookupResult:
            tiers: list[TierId] = []
            for r, reply in zip(runs, replies, strict=True):
                tiers.extend(reply.tiers)
                if len(reply.tiers) < len(r):  # the prefix ends inside this run: later runs are not part of it
                    break
            return LookupResult(len(tiers), len(tiers) * spec.block_size, tuple(tiers))

        runs = batches(len(hashes), [0] * len(hashes), self.session.limits, views=0)
        return self._keys("lookup", spec, hashes, fr.LookupOk, prefix, True)

    def exists(self, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> Operation[fr.Flags, list[bool]]:
        return self._keys("exists", spec, hashes, fr.Flags, lambda rs: [f for r in rs for f in r.flags], True)

    def count(self, kind: fr.KeyOp, spec: ModelSpec, hashes: Sequence[PrefixHash]) -> Operation[fr.Count, int]:
        """``delete``, ``pin`` or ``unpin``: how many blocks it changed. Not retried: a resent delete would
        count 0 for the blocks the first one removed."""
        return self._keys(kind, spec, hashes, fr.Count, lambda rs: sum(r.count for r in rs), False)

    def stats(self) -> Operation[fr.StatsOk, dict[str, Any]]:
        def run() -> Plan[fr.StatsOk]:
            return (yield from ask("stats", fr.encode_stats, fr.StatsOk))

        return Operation("stats", [run], lambda rs: rs[0].stats)

    # --- get -----------------------------------------------------------------------------------------------------
    def get_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], out: Sequence[Buffer] | None = None, chunks: int = 1,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Operation[Metas, list[Buffer | None]]:  # fmt: skip
        if out is None:
            out = [np.empty(spec.block_nbytes, dtype=np.uint8) for _ in hashes]
        if len(out) != len(hashes):
            raise ValueError(f"{len(out)} output buffers for {len(hashes)} hashes")
        dests = [writable(o, self.staging) for o in out]
        for i, d in enumerate(dests):  # a block of ``spec`` is always block_nbytes: refuse before sending anything
            if len(d.view) < spec.block_nbytes:
                raise ValueError(f"destination {i} holds {len(d.view)} bytes, a {spec.model} block {spec.block_nbytes}")
        fp = self.session.fingerprint(spec)
        leased = self.leased if chunks == 1 else None  # layer streaming is TCP's: a lease is read whole

        def run(r: range) -> Plan[Metas]:
            h, d = [hashes[i] for i in r], [dests[i] for i in r]
            return get_leased(leased, fp, h, d) if leased is not None else get_tcp(fp, h, d, chunks, on_chunk)

        def found(metas: list[Metas]) -> list[Buffer | None]:
            flat = [m for ms in metas for m in ms]
            return [o if m is not None else None for o, m in zip(out, flat, strict=True)]

        runs = batches(len(hashes), [spec.block_nbytes] * len(hashes), self.session.limits, chunks)
        after = functools.partial(settle, dests, self.staging)  # device copies done, staging back for the next call
        return Operation("get", [functools.partial(run, r) for r in runs], found, after=after)

    def get(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], out: torch.Tensor | None = None
    ) -> Operation[Metas, torch.Tensor | None]:
        """The leading found blocks as one tensor ``[n, *block_shape]`` (a view of ``out`` when given), or None."""
        if not hashes:
            return Operation("get", [], lambda _: None)
        if out is None:
            import torch

            out = torch.empty((len(hashes), *spec.block_shape), dtype=torch_dtype(spec.dtype))
        op = self.get_blocks(spec, hashes, [out[i] for i in range(len(hashes))])

        def prefix(metas: list[Metas]) -> torch.Tensor | None:
            n = leading(op.combine(metas))
            return out[:n] if n else None

        return Operation(op.what, op.runs, prefix, op.idempotent, op.before, op.after)

    # --- put -----------------------------------------------------------------------------------------------------
    def put_blocks(
        self, spec: ModelSpec, hashes: Sequence[PrefixHash], blocks: Sequence[Buffer], parent: PrefixHash | None = None
    ) -> Operation[int, int]:
        if len(blocks) != len(hashes):
            raise ValueError(f"{len(blocks)} blocks for {len(hashes)} hashes")
        fp = self.session.fingerprint(spec)
        root = parent if parent is not None else root_hash(fp, self.session.salt)
        held: list[Any] = []  # pinned buffers of CUDA sources, released once every run has ended
        try:
            payloads = [readable(b, self.staging, held) for b in blocks]
            items = put_items(spec, hashes, root, payloads)
        except BaseException:
            self.staging.release(held)
            raise

        def run(r: range) -> Plan[int]:
            batch = [items[i] for i in r]
            ok = yield from ask("put", lambda rid: fr.encode_put(rid, fp, batch), fr.Count, [payloads[i] for i in r])
            return ok.count

        runs = batches(len(items), [it.meta.nbytes for it in items], self.session.limits)
        # content-addressed: re-sending the same blocks is harmless, so a put is retried like a read
        return Operation("put", [functools.partial(run, r) for r in runs], sum, True, self._registration(spec),
                         functools.partial(self.staging.release, held))  # fmt: skip

    def put(self, spec: ModelSpec, hashes: Sequence[PrefixHash], kv: KV) -> Operation[int, int]:
        """The leading blocks of ``kv`` (``[n_blocks, *block_shape]`` or a list of blocks) under ``hashes``."""
        n = min(len(hashes), len(kv))
        if not n:
            return Operation("put", [], sum)
        return self.put_blocks(spec, hashes[:n], [kv[i] for i in range(n)])


__all__ = ["Metas", "Operation", "Operations", "Plan", "Request", "advance", "ask", "fast_path", "get_leased", "get_tcp",
           "hello"]  # fmt: skip
