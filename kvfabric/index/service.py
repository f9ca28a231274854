"""The index as a service: one owner for the prefix index, the engines' loads, the routers and the event feeds.

Everything here runs on one asyncio event loop: subscribers apply batches between awaits and HTTP handlers route
synchronously, so the plain :class:`PrefixIndex` is never touched by two things at once and needs no lock. Nothing
in this class blocks for long except :meth:`IndexService.compact`, which sweeps removed locations and is run by the
owner when it chooses (``compact_retired_at`` makes :meth:`remove_engine` do it once enough bits are retired).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvfabric.errors import UnknownModelError
from kvfabric.events import KVEvent, decode_runs
from kvfabric.hashing import prefix_hashes, root_hash, tenant_salt
from kvfabric.ids import ModelFingerprint, Namespace, PrefixHash
from kvfabric.index.local_feed import LoopEventSink
from kvfabric.index.prefix_index import PrefixIndex
from kvfabric.index.router import (
    POLICIES,
    Calibration,
    EngineLoad,
    EngineTable,
    RouteDecision,
    RouteRequest,
    make_policy,
)  # fmt: skip
from kvfabric.index.subscriber import ZmqEventSubscriber
from kvfabric.index.vllm_events import VllmEngineBinding, VllmEventTranslator, vllm_kv_events_config
from kvfabric.spec import ModelSpec

if TYPE_CHECKING:
    from kvfabric.config import IndexSettings, VllmEngineSettings


ROUTE_POLICIES = (*POLICIES, "kvfabric-local")
"""Policies :meth:`IndexService.route` knows: the four of ``router.POLICIES``, and kvfabric's TTFT policy without
the fabric (engine-local prefixes only)."""


class NoEnginesError(LookupError):
    """A route was asked for while no engine is registered."""


@dataclass(frozen=True, slots=True)
class VllmFeed:
    """A subscribed vLLM engine: its subscriber, its translator, and the config to hand the engine."""

    subscriber: ZmqEventSubscriber
    translator: VllmEventTranslator

    @property
    def kv_events_config(self) -> dict[str, object]:
        return vllm_kv_events_config(self.subscriber.endpoint)


class IndexService:
    def __init__(
        self,
        calibration: Calibration | None = None,
        *,
        models: Iterable[ModelSpec] = (),
        model_source: Callable[[ModelFingerprint], ModelSpec | None] | None = None,
        salt_for: Callable[[Namespace], bytes] | None = None,
        overlap_weight: float = 1.0,
        compact_retired_at: int = 64,
    ) -> None:
        """``model_source`` is asked for a fingerprint not registered here (``kvfabric serve`` passes its store's
        model registry, so models registered through the data plane are routable at once); ``salt_for`` gives a
        namespace's tenant salt for hashing token ids."""
        self.index = PrefixIndex()
        self.calibration = calibration or Calibration()
        self._salt_for = salt_for or (lambda ns: b"")
        self._models: dict[ModelFingerprint, ModelSpec] = {}
        self._model_source = model_source
        self._engines: dict[str, EngineLoad] = {}
        self._table: EngineTable | None = None  # columns of _engines for the routers; None after a membership change
        self._policies = {name: make_policy(name, self.index, self.calibration, overlap_weight=overlap_weight)
                          for name in POLICIES}  # fmt: skip
        self._policies["kvfabric-local"] = make_policy("kvfabric", self.index, self.calibration, use_fabric=False)
        self._feeds: list[ZmqEventSubscriber] = []
        self._local: list[LoopEventSink] = []
        self._compact_at = compact_retired_at
        self.events_applied = 0
        for spec in models:
            self.register_model(spec)

    @classmethod
    def for_node(
        cls,
        settings: IndexSettings,
        server_secret: bytes,
        *,
        model_source: Callable[[ModelFingerprint], ModelSpec | None] | None = None,
    ) -> IndexService:
        """The index of one node: calibrated from its ``[index]`` settings, hashing token ids under each tenant's
        salt from the server secret (the same salt the data plane gives that tenant)."""
        if not server_secret:
            raise ValueError("the index needs the server secret to salt tenants' hashes")
        return cls(Calibration.from_settings(settings), model_source=model_source,
                   salt_for=lambda ns: tenant_salt(server_secret, ns))  # fmt: skip

    # --- models and engines ----------------------------------------------------------------------------------------
    def register_model(self, spec: ModelSpec) -> ModelFingerprint:
        fp = spec.fingerprint()
        self._models[fp] = spec
        return fp

    def model(self, fingerprint: ModelFingerprint) -> ModelSpec | None:
        spec = self._models.get(fingerprint)
        if spec is None and self._model_source is not None:
            spec = self._model_source(fingerprint)
        return spec

    def report_load(self, load: EngineLoad) -> None:
        """Register an engine or update its load (in place: O(1) for a known engine)."""
        known = load.engine in self._engines
        self._engines[load.engine] = load
        if self._table is not None and not (known and self._table.update(load)):
            self._table = None

    def engines(self) -> list[EngineLoad]:
        return list(self._engines.values())

    def engine_table(self) -> EngineTable:
        """The registered engines as the routers' columns (kept across decisions, updated as loads come in)."""
        if self._table is None:
            self._table = EngineTable(self._engines.values())
        return self._table

    def remove_engine(self, engine: str) -> int:
        """The engine is gone: forget its load and every block it held (one operation). Returns blocks dropped."""
        if self._engines.pop(engine, None) is not None:
            self._table = None
        held = self.index.remove_location(engine)
        if self.index.stats().retired_bits >= self._compact_at:
            self.index.compact()
        return held

    def compact(self) -> int:
        return self.index.compact()

    # --- events ----------------------------------------------------------------------------------------------------
    def ingest(self, events: Iterable[KVEvent]) -> int:
        n = self.index.apply_many(events)
        self.events_applied += n
        return n

    def ingest_batch(self, payload: bytes) -> int:
        """Apply one kvfabric event batch (``kvfabric.events.encode_batch``), decoded into runs rather than an object
        per event; a malformed batch raises before any of it is applied."""
        batch = decode_runs(payload)
        self.index.apply_runs(batch.runs)
        self.events_applied += batch.events
        return batch.events

    def subscribe_events(self, endpoint: str = "tcp://127.0.0.1:0", *, bind: bool = True) -> ZmqEventSubscriber:
        """Subscribe to kvfabric event batches (call from the running loop); returns the started subscriber."""
        sub = ZmqEventSubscriber(endpoint, self.ingest_batch, bind=bind)
        sub.start()
        self._feeds.append(sub)
        return sub

    def subscribe_vllm(
        self, binding: VllmEngineBinding, endpoint: str = "tcp://127.0.0.1:0", *, bind: bool = True
    ) -> VllmFeed:
        """Subscribe to one vLLM engine's KV events (call from the running loop) and register the engine. With
        ``bind`` (default) the subscriber binds and vLLM, started with ``feed.kv_events_config``, connects to it;
        without, it connects to an engine whose publisher binds (vLLM's own default, ``tcp://*:5557``)."""
        self.register_model(binding.spec)
        translator = VllmEventTranslator(binding)
        sub = ZmqEventSubscriber(endpoint, lambda payload: self.ingest(translator.translate(payload)), bind=bind)
        sub.start()
        self._feeds.append(sub)
        if binding.engine not in self._engines:
            self.report_load(EngineLoad(binding.engine))
        return VllmFeed(sub, translator)

    def subscribe_configured(self, engines: Iterable[VllmEngineSettings]) -> list[VllmFeed]:
        """Subscribe to the vLLM engines of ``[[index.vllm_engines]]`` (call from the running loop); each engine's
        blocks are keyed under its namespace's salt."""
        feeds = []
        for e in engines:
            ns = Namespace(e.namespace)
            binding = VllmEngineBinding(e.engine, ns, ModelSpec.from_dict(e.model), self._salt_for(ns))
            feeds.append(self.subscribe_vllm(binding, e.endpoint, bind=e.bind))
        return feeds

    def feed_local(self, sink: LoopEventSink) -> None:
        """Apply the events published into ``sink`` from any thread (a store's tiers) on the running loop."""
        sink.attach(self.ingest)
        self._local.append(sink)

    async def aclose(self) -> None:
        for sub in self._feeds:
            await sub.aclose()
        self._feeds.clear()
        for sink in self._local:
            sink.detach()
        self._local.clear()

    # --- routing ---------------------------------------------------------------------------------------------------
    def chain_for(self, namespace: Namespace, model: ModelFingerprint, tokens: Sequence[int]) -> list[PrefixHash]:
        """The kvfabric chain of a prompt for a registered model, under the namespace's salt."""
        spec = self.model(model)
        if spec is None:
            raise UnknownModelError(model.hex())
        return prefix_hashes(root_hash(model, self._salt_for(namespace)), tokens, spec.block_size)

    def route(
        self,
        namespace: Namespace,
        model: ModelFingerprint,
        *,
        tokens: Sequence[int] | None = None,
        hashes: Sequence[PrefixHash] | None = None,
        num_tokens: int | None = None,
        block_size: int | None = None,
        policy: str = "kvfabric",
        engines: Sequence[EngineLoad] | None = None,
    ) -> RouteDecision:
        """Pick an engine for a prompt given as ``tokens`` or as its ``hashes`` (then ``num_tokens`` defaults to
        the chain's full blocks, and ``block_size`` to the registered model's). ``engines`` overrides the reported
        loads for this one decision."""
        if (tokens is None) == (hashes is None):
            raise ValueError("give exactly one of tokens or hashes")
        router = self._policies.get(policy)
        if router is None:
            raise ValueError(f"unknown routing policy {policy!r}; known: {', '.join(sorted(self._policies))}")
        candidates = EngineTable(engines) if engines is not None else self.engine_table()
        if not len(candidates):
            raise NoEnginesError("no engines are registered to route to")
        spec = self.model(model)
        if tokens is not None:
            chain = self.chain_for(namespace, model, tokens)
            n = len(tokens)
            block_size = spec.block_size  # type: ignore[union-attr]  # chain_for checked the model
        else:
            assert hashes is not None
            chain = hashes if isinstance(hashes, list) else list(hashes)
            if block_size is None:
                if spec is None:
                    raise UnknownModelError(model.hex())
                block_size = spec.block_size
            n = num_tokens if num_tokens is not None else len(chain) * block_size
        # The model's own block bytes when its spec is known and matches the block size asked for.
        block_bytes = spec.block_nbytes if spec is not None and spec.block_size == block_size else None
        return router.route(RouteRequest(namespace, model, chain, n, block_size, block_bytes), candidates)

    def stats(self) -> dict[str, object]:
        s = self.index.stats()
        return {
            "scopes": s.scopes,
            "blocks": s.blocks,
            "retired_bits": s.retired_bits,
            "events_applied": self.events_applied,
            "locations": [
                {"source": loc.source, "medium": loc.medium, "blocks": n}
                for loc, n in sorted(s.locations.items(), key=lambda kv: (kv[0].source, kv[0].medium))
            ],
            "engines": [
                {
                    "engine": e.engine,
                    "pending_prefill_tokens": e.pending_prefill_tokens,
                    "active_decode_blocks": e.active_decode_blocks,
                }
                for e in self._engines.values()
            ],
            "feeds": [
                {"endpoint": f.endpoint, "batches": f.stats.batches, "gaps": f.stats.gaps, "errors": f.stats.errors}
                for f in self._feeds
            ],
            "local_feeds": [
                {
                    "published": sink.stats.published,
                    "applied": sink.stats.applied,
                    "dropped": sink.stats.dropped,
                    "errors": sink.stats.errors,
                    "pending": sink.pending,
                }
                for sink in self._local
            ],
        }
