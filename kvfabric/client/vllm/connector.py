"""A vLLM V1 KV connector backed by kvfabric.

Enable it with::

    KVTransferConfig(
        kv_connector="KVFabricConnector",
        kv_connector_module_path="kvfabric.client.vllm",
        kv_role="kv_both",                      # kv_producer: save only; kv_consumer: load only
        kv_load_failure_policy="recompute",     # a block the fabric fails to deliver is recomputed, not an error
        kv_connector_extra_config={"url": "kvfabric://127.0.0.1:9500", "token": "...", "tenant": "..."},
    )

Scheduler side: for each new request, one lookup asks the fabric how many leading prompt blocks it holds; vLLM
allocates blocks for them and :class:`~kvfabric.client.vllm.plan.StepPlanner` hands each step's loads and saves to
the workers in the connector metadata. Worker side: ``start_load_kv`` starts the fetch on a background thread
(streamed layer by layer over TCP; one memcpy per block through shared memory on the same host) and each attention
layer's ``wait_for_layer_load`` waits only for its own layer; ``save_kv_layer`` copies the layer's newly completed
prompt blocks out of the paged cache and ``wait_for_save`` hands the copy to a background thread, so the forward pass
never waits for the network. Any fabric failure is logged with its cause and the affected tokens are recomputed.

Layouts: ``register_kv_caches`` reads the engine's paged layout from vLLM (``describe``) and every copy converts
between it and the one canonical block format (``layouts``), so blocks move between engines whatever their
layouts; a CUDA cache is staged through reused pinned buffers on a side stream (``staging``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvfabric.client import Client
from kvfabric.client.vllm.config import ConnectorConfig, spec_for_vllm
from kvfabric.client.vllm.describe import describe, layer_scales
from kvfabric.client.vllm.layouts import PagedLayout, stack_layers
from kvfabric.client.vllm.plan import LoadSpec, SaveSpec, StepPlan, StepPlanner
from kvfabric.client.vllm.staging import DeviceStaging
from kvfabric.errors import ConfigError, KVFabricError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

MAX_PENDING_SAVES = 4
"""Steps whose saves may be in flight at once; beyond that ``wait_for_save`` waits for the oldest (backpressure)."""
SAVE_BUFFERS = MAX_PENDING_SAVES + 2
"""Reused host staging buffers for saves: one per step in flight, one for the step being gathered, one spare."""

SHUTDOWN_DRAIN_S = 60.0


@dataclass(frozen=True)
class FabricConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step."""

    plan: StepPlan


class _Load:
    """One step's fetch, running on a background thread; layer ``i`` is ready once ``layer_ready[i]`` is set."""

    def __init__(self, specs: tuple[LoadSpec, ...], num_layers: int) -> None:
        self.specs = specs
        self.layer_ready = [threading.Event() for _ in range(num_layers)]
        self.done = threading.Event()
        self.kv: torch.Tensor | None = None  # [n_blocks, layers, 2, block_size, heads, dim], specs concatenated
        self.missing: list[bool] = []
        self.error: BaseException | None = None
        self.scattered: set[int] = set()

    def finish(self) -> None:
        for event in self.layer_ready:
            event.set()
        self.done.set()


@dataclass(slots=True)
class _Staged:
    """One step's saves: the engine blocks' canonical copies in host ``kv`` (``[n, *block_shape]``, specs
    concatenated) and the device events that mark the copies' end (CUDA only)."""

    saves: tuple[SaveSpec, ...]
    kv: torch.Tensor
    events: list[Any] = field(default_factory=list)


class KVFabricConnector(KVConnectorBase_V1):
    """kvfabric as vLLM's external prefix cache; see the module docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._config = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        transfer = self._kv_transfer_config
        self._client = Client(
            self._config.url, token=self._config.token, timeout=self._config.timeout, shm=self._config.shm
        )
        self._tenant_checked = False
        self._registered = False
        if role == KVConnectorRole.SCHEDULER:
            self._spec = spec_for_vllm(vllm_config, self._config, tp_rank=0)
            self._planner = StepPlanner(
                self._spec.block_size, load=transfer.is_kv_consumer, save=transfer.is_kv_producer
            )
            if transfer.is_kv_consumer and transfer.kv_load_failure_policy != "recompute":
                log.warning(
                    "kvfabric: kv_load_failure_policy=%r fails a request whose blocks the fabric cannot deliver; "
                    "set kv_load_failure_policy='recompute' to recompute them instead",
                    transfer.kv_load_failure_policy,
                )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._spec = spec_for_vllm(vllm_config, self._config, tp_rank=get_tensor_model_parallel_rank())
            self._layers: list[torch.Tensor] = []
            self._layer_index: dict[str, int] = {}
            self._layout: PagedLayout | None = None
            self._stacked: torch.Tensor | None = None  # all layers as one view, for cross-layer layouts
            self._staging: DeviceStaging | None = None
            self._save_slot = 0
            # Separate threads so a queue of saves never delays a load the forward pass is waiting for.
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfabric-load")
            self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfabric-save")
            self._load: _Load | None = None
            self._failed_block_ids: set[int] = set()
            self._staged: _Staged | None = None
            self._pending_saves: list[Future[None]] = []
        log.info("kvfabric connector (%s) for %s on %s", role.name.lower(), self._spec.model, self._config.url)

    # --- fabric access -------------------------------------------------------------------------------------------
    def _ready(self) -> None:
        """Check the tenant once and register the model spec once (both need the server)."""
        if not self._tenant_checked and self._config.tenant is not None:
            tenant = self._client.session.tenant
            if tenant != self._config.tenant:
                raise ConfigError(
                    f"kv_connector_extra_config.tenant is {self._config.tenant!r} but the token authenticates as "
                    f"tenant {tenant!r}"
                )
            self._tenant_checked = True
        if not self._registered:
            self._client.register_model(self._spec)
            self._registered = True

    # --- scheduler side ------------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        prompt = tuple(request.prompt_token_ids or ())
        fabric_blocks = 0
        if len(prompt) >= self._spec.block_size:
            try:
                self._ready()
                fabric_blocks = self._client.lookup(self._spec, list(prompt)).blocks
            except KVFabricError as exc:
                log.warning(
                    "kvfabric: lookup for request %s failed, computing its %d prompt tokens: %s",
                    request.request_id, len(prompt), exc,
                )  # fmt: skip
        to_load = self._planner.on_lookup(request.request_id, prompt, fabric_blocks, num_computed_tokens)
        usable = min(fabric_blocks, self._planner.usable_blocks(len(prompt))) * self._spec.block_size
        log.info(
            "kvfabric: request %s matched %d of %d prompt tokens (engine cache %d, loading %d)",
            request.request_id, usable, len(prompt), num_computed_tokens, to_load,
        )  # fmt: skip
        return to_load, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._planner.on_alloc(request.request_id, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._planner.on_scheduled(
                new.req_id, list(new.block_ids[0]), replace=True,
                computed_after=new.num_computed_tokens + scheduled.get(new.req_id, 0),
            )  # fmt: skip
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            self._planner.on_scheduled(
                req_id, list(new_ids[0]) if new_ids is not None else None,
                replace=req_id in cached.resumed_req_ids,
                computed_after=cached.num_computed_tokens[i] + scheduled.get(req_id, 0),
            )  # fmt: skip
        return FabricConnectorMetadata(self._planner.take_plan())

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self._planner.on_invalid_blocks(set(connector_output.invalid_block_ids))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._planner.finish(request.request_id)
        return False, None

    # --- worker side: layout -------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Read the engine's layout from vLLM (backend, KVCacheLayout, cache specs) and refuse what kvfabric cannot
        convert to canonical blocks, naming it: nothing is ever stored or loaded in a guessed layout."""
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        if len(names) != self._spec.num_layers:
            raise ConfigError(f"vLLM has {len(names)} KV layers, the kvfabric spec {self._spec.num_layers}")
        layout = describe(self._vllm_config, self._kv_cache_config, kv_caches, names)
        geometry = (layout.kv_heads, layout.block_size, layout.head_dim)
        expected = (self._spec.kv_heads, self._spec.block_size, self._spec.head_dim)
        if geometry != expected:
            raise ConfigError(
                f"vLLM's KV layers have (kv_heads, block_size, head_dim) {geometry}, the kvfabric spec {expected}"
            )
        if self._spec.block_shape != (self._spec.num_layers, *layout.layer_shape):
            raise ConfigError(f"vLLM's KV layout {layout.describe()} does not match spec layout {self._spec.layout}")
        self._layers = [kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._layout = layout
        self._stacked = stack_layers(self._layers) if layout.cross_layer else None
        self._staging = DeviceStaging(self._layers[0].device)
        scales = ""
        if self._spec.kv_quant != "none":
            k_v = sorted(set(layer_scales(self._vllm_config, names)))
            scales = f", per-tensor (k_scale, v_scale) {k_v[:4]}{' ...' if len(k_v) > 4 else ''}"
        log.info(
            "kvfabric: KV layout %s on %s, %d layers of %s, canonical %s%s%s",
            layout.describe(), self._layers[0].device, len(names), tuple(self._layers[0].shape), self._spec.layout,
            " (cross-layer: one copy per step for all layers)" if self._stacked is not None else "", scales,
        )  # fmt: skip

    # --- worker side: loads --------------------------------------------------------------------------------------
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FabricConnectorMetadata)
        if not meta.plan.loads:
            return
        load = _Load(meta.plan.loads, len(self._layers))
        self._load = load
        self._loader.submit(self._fetch, load)

    def _fetch(self, load: _Load) -> None:
        """Background thread: fetch every planned block; layer ``c`` is signalled as soon as it has arrived."""
        started = time.perf_counter()
        try:
            self._ready()
            hashes = []
            for spec in load.specs:
                hashes += self._client.block_hashes(self._spec, list(spec.tokens))[spec.first_block : spec.end_block]
            assert self._staging is not None
            load.kv = self._staging.host("load", (len(hashes), *self._spec.block_shape), self._layers[0].dtype)
            out = [load.kv[i] for i in range(len(hashes))]
            transport = self._client.transport
            if transport == "shm" or self._stacked is not None:  # cross-layer: whole blocks, one copy for all layers
                got = self._client.get_blocks(self._spec, hashes, out)
            else:  # chunk-major over the wire: chunk c of every block is layer c
                got = self._client.get_blocks(
                    self._spec, hashes, out, chunks=self._spec.num_layers, on_chunk=lambda c: load.layer_ready[c].set()
                )
            load.missing = [g is None for g in got]
        except Exception as exc:  # noqa: BLE001 - any failure means "recompute"; reported after the forward
            load.error = exc
        else:
            n = len(hashes)
            log.info(
                "kvfabric: fetched %d blocks (%d tokens) for %d request(s) in %.1f ms over %s (%d missing)",
                n, n * self._spec.block_size, len(load.specs), 1e3 * (time.perf_counter() - started),
                "shared memory" if transport == "shm" else (
                    f"{transport}, whole blocks" if self._stacked is not None else f"{transport}, layer by layer"
                ), sum(load.missing),
            )  # fmt: skip
        finally:
            load.finish()

    def wait_for_layer_load(self, layer_name: str) -> None:
        index = self._layer_index.get(layer_name)
        if self._load is not None and index is not None:
            self._scatter_layer(self._load, index)
            assert self._staging is not None
            self._staging.wait_layer(index if self._stacked is None else -1)

    def _scatter_layer(self, load: _Load, index: int) -> None:
        """Wait for layer ``index`` of ``load`` and copy it into the paged cache (once; for a cross-layer layout
        the first call copies every layer at once)."""
        if index in load.scattered:
            return
        load.layer_ready[index].wait()
        layout, staging = self._layout, self._staging
        assert layout is not None and staging is not None
        if self._stacked is not None:
            load.done.wait()
            load.scattered.update(range(len(self._layers)))
            index = -1  # one event covers every layer
        else:
            load.scattered.add(index)
        if load.error is not None or load.kv is None:
            return
        row = 0
        for spec in load.specs:
            n = len(spec.block_ids)
            ids = spec.block_ids
            if self._stacked is not None:
                stacked = self._stacked
                staging.scatter_async(
                    index, lambda src, ids=ids: layout.scatter_all(stacked, ids, src), load.kv[row : row + n]
                )
            else:
                cache = self._layers[index]
                staging.scatter_async(
                    index, lambda src, ids=ids: layout.scatter(cache, ids, src), load.kv[row : row + n, index]
                )
            row += n

    def _settle_load(self) -> None:
        """After the forward: make sure the load finished and record the engine blocks that did not arrive."""
        load, self._load = self._load, None
        if load is None:
            return
        load.done.wait()
        assert self._staging is not None
        for index in range(len(self._layers)):  # layers the forward did not reach still need their KV
            self._scatter_layer(load, index)
            self._staging.wait_layer(index if self._stacked is None else -1)
        self._staging.synchronize()  # the next step's fetch reuses the pinned load buffer
        row = 0
        for spec in load.specs:
            n = len(spec.block_ids)
            missing = [True] * n if load.error is not None else load.missing[row : row + n]
            row += n
            if not any(missing):
                continue
            first = missing.index(True)
            bad = spec.block_ids[first:]  # a chain is only usable up to its first hole
            self._failed_block_ids.update(bad)
            reason = f"{type(load.error).__name__}: {load.error}" if load.error is not None else (
                f"{sum(missing)} block(s) missing or corrupt in the fabric"
            )  # fmt: skip
            log.warning(
                "kvfabric: request %s: recomputing %d of %d loaded blocks (from block %d): %s",
                spec.req_id, len(bad), n, spec.first_block + first, reason,
            )  # fmt: skip

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._settle_load()
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    # --- worker side: saves --------------------------------------------------------------------------------------
    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        index = self._layer_index.get(layer_name)
        if index is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, FabricConnectorMetadata)
        if not meta.plan.saves:
            return
        self._stage_saves(meta.plan.saves)
        if self._stacked is not None:
            return  # cross-layer: wait_for_save gathers every layer in one copy
        assert self._staged is not None
        for row, spec in self._save_rows():
            self._gather(spec.block_ids, self._staged.kv[row : row + len(spec.block_ids), index], index)

    def _stage_saves(self, saves: tuple[SaveSpec, ...]) -> None:
        """The step's host buffer for its saves (reused from a ring of :data:`SAVE_BUFFERS`)."""
        if self._staged is not None and self._staged.saves is saves:
            return
        assert self._staging is not None
        n = sum(len(s.block_ids) for s in saves)
        self._save_slot = (self._save_slot + 1) % SAVE_BUFFERS
        kv = self._staging.host(f"save-{self._save_slot}", (n, *self._spec.block_shape), self._layers[0].dtype)
        self._staged = _Staged(saves, kv)

    def _save_rows(self) -> list[tuple[int, SaveSpec]]:
        assert self._staged is not None
        rows, row = [], 0
        for spec in self._staged.saves:
            rows.append((row, spec))
            row += len(spec.block_ids)
        return rows

    def _gather(self, block_ids: tuple[int, ...], out: torch.Tensor, index: int) -> None:
        """Copy engine blocks of layer ``index`` (all layers for ``index`` -1, cross-layer) into host ``out``."""
        layout, staging = self._layout, self._staging
        assert layout is not None and staging is not None and self._staged is not None
        if not staging.cuda:  # host cache: straight into the staging buffer
            if index < 0:
                assert self._stacked is not None
                layout.gather_all(self._stacked, block_ids, out)
            else:
                layout.gather(self._layers[index], block_ids, out)
            return

        def on_device() -> torch.Tensor:
            tmp = torch.empty(out.shape, dtype=out.dtype, device=self._layers[0].device)
            if index < 0:
                assert self._stacked is not None
                layout.gather_all(self._stacked, block_ids, tmp)
            else:
                layout.gather(self._layers[index], block_ids, tmp)
            return tmp

        self._staged.events.append(staging.gather_to_host(on_device, out))

    def wait_for_save(self) -> None:
        self._settle_load()
        staged, self._staged = self._staged, None
        if staged is not None:
            if self._stacked is not None:  # cross-layer: the forward is done, gather the step in one copy
                self._staged = staged
                for row, spec in self._save_rows():
                    self._gather(spec.block_ids, staged.kv[row : row + len(spec.block_ids)], -1)
                self._staged = None
            self._pending_saves.append(self._saver.submit(self._store, staged))
        self._reap_saves(block=len(self._pending_saves) > MAX_PENDING_SAVES)

    def _store(self, staged: _Staged) -> None:
        """Background thread: publish one step's newly computed prompt blocks."""
        started = time.perf_counter()
        for event in staged.events:  # device -> host copies of this step, queued on the side stream
            if event is not None:
                event.synchronize()
        self._ready()
        row, stored = 0, 0
        for spec in staged.saves:
            n = len(spec.block_ids)
            hashes = self._client.block_hashes(self._spec, list(spec.tokens))
            parent = hashes[spec.first_block - 1] if spec.first_block > 0 else None
            blocks = [staged.kv[row + i] for i in range(n)]
            stored += self._client.put_blocks(self._spec, hashes[spec.first_block : spec.end_block], blocks, parent)
            row += n
        log.info(
            "kvfabric: stored %d blocks (%d tokens) for %d request(s) in %.1f ms (%d sent)",
            stored, stored * self._spec.block_size, len(staged.saves), 1e3 * (time.perf_counter() - started), row,
        )  # fmt: skip

    def _reap_saves(self, *, block: bool, timeout: float | None = None) -> None:
        """Log finished saves' failures; with ``block``, wait for the oldest (or, at shutdown, all) first."""
        if block and self._pending_saves:
            targets = self._pending_saves if timeout is not None else self._pending_saves[:1]
            wait(targets, timeout=timeout)  # never raises: failures are logged below
        still: list[Future[None]] = []
        for fut in self._pending_saves:
            if not fut.done():
                still.append(fut)
            elif (exc := fut.exception()) is not None:
                log.warning("kvfabric: saving blocks failed; later requests will recompute them: %s", exc)
        self._pending_saves = still

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._role == KVConnectorRole.WORKER:
            self._reap_saves(block=True, timeout=SHUTDOWN_DRAIN_S)
            if self._pending_saves:
                log.warning("kvfabric: %d save(s) still running at shutdown were abandoned", len(self._pending_saves))
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._saver.shutdown(wait=False, cancel_futures=True)
        self._client.close()

