"""The connector's settings (``kv_connector_extra_config``) and the ModelSpec of a vLLM engine's KV."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from kvfabric.client.vllm.describe import FP8_CACHE_DTYPES, kv_quant_name
from kvfabric.errors import ConfigError
from kvfabric.spec import LATENT_LAYOUT, LAYOUTS, DType, ModelSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig

DEFAULT_URL = "kvfabric://127.0.0.1:9500"
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` keys.

    ``tenant``, when given, must be the tenant the token authenticates as (checked before the first fabric call):
    on a mismatch the connector uses no fabric at all and logs why, instead of silently sharing another tenant's
    cache. ``model`` and ``revision``
    override the names taken from vLLM's model config, for weights loaded from paths that differ between hosts.
    """

    url: str = DEFAULT_URL
    token: str | None = None
    tenant: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    model: str | None = None
    revision: str | None = None
    shm: bool | None = None  # None: read through the server's shared memory when on the same host; False: TCP

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}")
        try:
            timeout = float(extra.pop("timeout", DEFAULT_TIMEOUT_S))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"kv_connector_extra_config.timeout must be a number: {exc}") from exc
        if timeout <= 0:
            raise ConfigError("kv_connector_extra_config.timeout must be positive")
        shm = extra.pop("shm", None)
        if isinstance(shm, str):
            shm = {"true": True, "false": False, "auto": None}.get(shm.lower(), shm)
        if shm is not None and not isinstance(shm, bool):
            raise ConfigError(f"kv_connector_extra_config.shm must be true, false or null, got {shm!r}")
        return cls(timeout=timeout, shm=shm, **{k: None if v is None else str(v) for k, v in extra.items()})


def spec_for_vllm(vllm_config: VllmConfig, config: ConnectorConfig, *, tp_rank: int) -> ModelSpec:
    """The ModelSpec of this engine's KV shard: one fabric block per vLLM block, in the canonical layout (the
    latent one for MLA models), whatever the engine's physical layout (that is read at ``register_kv_caches``)."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    if parallel.pipeline_parallel_size != 1:
        raise ConfigError("the kvfabric connector supports pipeline_parallel_size 1 only")
    cache_dtype = str(cache.cache_dtype)
    quant = kv_quant_name(cache_dtype)  # refuses quantisations kvfabric cannot carry, naming them
    dtype = model.dtype if cache_dtype == "auto" else FP8_CACHE_DTYPES.get(cache_dtype, cache_dtype)
    mla = bool(getattr(model, "use_mla", False))
    return ModelSpec(
        model=config.model or str(model.model),
        revision=config.revision or str(model.revision or "main"),
        dtype=DType.parse(str(dtype)),
        num_layers=model.get_num_layers(parallel),
        kv_heads=1 if mla else model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),  # MLA: kv_lora_rank + qk_rope_head_dim, the latent width
        block_size=cache.block_size,
        tp_size=parallel.tensor_parallel_size,
        tp_rank=tp_rank,
        kv_quant=quant,
        layout=LATENT_LAYOUT if mla else LAYOUTS[0],
    )
