"""vLLM event translation, on payloads in vLLM's wire format (built by vLLM's own classes when it is installed)."""

from __future__ import annotations

import importlib.util

import msgpack
import pytest

from kvfabric.errors import EventFormatError
from kvfabric.events import AllCleared, BlockRemoved, BlockStored
from kvfabric.hashing import encode_extra, prefix_hashes, root_hash
from kvfabric.ids import Namespace, TierId
from kvfabric.index.prefix_index import PrefixIndex
from kvfabric.index.vllm_events import (
    VllmEngineBinding,
    VllmEventTranslator,
    chain_tokens,
    decode_vllm_batch,
    raw_key,
)  # fmt: skip
from kvfabric.spec import DType, ModelSpec

SPEC = ModelSpec(model="random-llama", num_layers=4, kv_heads=2, head_dim=64, dtype=DType.FLOAT32, block_size=4)
BINDING = VllmEngineBinding("vllm-0", Namespace("tenant-a"), SPEC, salt=b"salt")
TOKENS = list(range(100, 124))  # 6 blocks of 4


def stored(hashes: list, parent: object, tokens: list[int], **extra: object) -> dict[str, object]:
    ev = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
          "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip
    ev.update(extra)
    return ev


def batch(*events: object, as_map: bool = False) -> bytes:
    if as_map:
        return msgpack.packb({"ts": 1.0, "events": list(events)})
    return msgpack.packb([1.0, list(events), 0])


def test_stored_blocks_are_rekeyed_to_the_kvfabric_chain_across_events() -> None:
    tr = VllmEventTranslator(BINDING)
    first = tr.translate(batch(stored([11, 12], None, TOKENS[:8])))
    second = tr.translate(batch(stored([13, 14, 15], 12, TOKENS[8:20]), as_map=True))
    expected = prefix_hashes(root_hash(SPEC.fingerprint(), b"salt"), TOKENS, 4)
    assert expected == chain_tokens(BINDING, TOKENS)
    [a], [b] = first, second
    assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
    assert a.hashes == tuple(expected[:2]) and b.hashes == tuple(expected[2:5])
    assert b.parent == expected[1] and b.medium == TierId("gpu") and b.tokens_per_block == 4
    assert (a.source, a.namespace, a.model) == ("vllm-0", BINDING.namespace, SPEC.fingerprint())
    assert tr.stats.rekeyed_blocks == 5 and tr.stats.raw_keyed == 0

    idx = PrefixIndex()
    idx.apply_many(first + second)
    assert idx.match(BINDING.namespace, SPEC.fingerprint(), expected)[0].blocks == 5


def test_removals_and_clears_are_translated() -> None:
    tr = VllmEventTranslator(BINDING)
    tr.translate(batch(stored([b"h1", b"h2"], None, TOKENS[:8])))
    [rm] = tr.translate(batch({"type": "BlockRemoved", "block_hashes": [b"h2", b"never"], "medium": "GPU"}))
    expected = chain_tokens(BINDING, TOKENS)
    assert rm == BlockRemoved("vllm-0", TierId("gpu"), BINDING.namespace, SPEC.fingerprint(), (expected[1],))
    assert tr.stats.removed_unknown == 1
    assert tr.translate(batch({"type": "AllBlocksCleared"})) == [AllCleared("vllm-0", None)]


def test_lora_and_extra_keys_enter_the_hash() -> None:
    tr = VllmEventTranslator(BINDING)
    [ev] = tr.translate(batch(stored([1], None, TOKENS[:4], lora_name="ad1", extra_keys=[("ad1",)])))
    root = root_hash(SPEC.fingerprint(), b"salt")
    assert ev.hashes == tuple(prefix_hashes(root, TOKENS[:4], 4, [encode_extra("ad1")]))
    [ev2] = tr.translate(batch(stored([2], None, TOKENS[:4], extra_keys=[("cache-salt-x",)])))
    assert ev2.hashes[0] != prefix_hashes(root, TOKENS[:4], 4)[0]


def test_blocks_that_cannot_be_rekeyed_get_raw_keys() -> None:
    tr = VllmEventTranslator(BINDING)
    [no_tokens] = tr.translate(batch(stored([7], None, [])))
    [orphan] = tr.translate(batch(stored([8], 999, TOKENS[:4])))  # parent never seen
    [other_bs] = tr.translate(batch(stored([9], None, TOKENS[:8], block_size=8)))
    assert no_tokens.hashes == (raw_key(7),) and orphan.hashes == (raw_key(8),) and other_bs.hashes == (raw_key(9),)
    assert tr.stats.raw_keyed == 3


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1.0]), msgpack.packb([1.0, [{"type": "Nope"}]]),
                                     msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": "x"}]])])  # fmt: skip
def test_malformed_vllm_batches_raise(payload: bytes) -> None:
    with pytest.raises(EventFormatError):
        VllmEventTranslator(BINDING).translate(payload)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_payload_encoded_by_vllms_own_classes() -> None:
    try:
        import msgspec
        from vllm.distributed.kv_events import AllBlocksCleared, KVEventBatch
        from vllm.distributed.kv_events import BlockRemoved as VBlockRemoved
        from vllm.distributed.kv_events import BlockStored as VBlockStored
    except Exception as exc:  # noqa: BLE001 - a broken vllm install is a skip, not a failure of ours
        pytest.skip(f"vllm is not importable: {exc}")
    ev = VBlockStored(block_hashes=[b"\x01" * 32, b"\x02" * 32], parent_block_hash=None, token_ids=TOKENS[:8],
                      block_size=4, lora_id=None, medium="GPU", lora_name=None)  # fmt: skip
    rm = VBlockRemoved(block_hashes=[b"\x02" * 32], medium="GPU")
    payload = msgspec.msgpack.Encoder().encode(KVEventBatch(ts=1.0, events=[ev, rm, AllBlocksCleared()]))
    assert [e["type"] for e in decode_vllm_batch(payload).events] == ["BlockStored", "BlockRemoved",
                                                                     "AllBlocksCleared"]  # fmt: skip
    out = VllmEventTranslator(BINDING).translate(payload)
    expected = chain_tokens(BINDING, TOKENS)
    assert out[0].hashes == tuple(expected[:2])
    assert out[1].hashes == (expected[1],)
    assert out[2] == AllCleared("vllm-0", None)
