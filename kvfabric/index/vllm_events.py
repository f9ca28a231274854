"""vLLM's own KV events, translated into kvfabric events so engine caches and fabric tiers share one index.

vLLM (``vllm/distributed/kv_events.py``) publishes ``KVEventBatch`` over ZMQ PUB as msgpack (msgspec): the batch is
an array ``[ts, events, data_parallel_rank?]`` (a map in some releases), each event a map tagged by ``"type"``:
``BlockStored`` (block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys, ...),
``BlockRemoved`` (block_hashes, medium, ...) and ``AllBlocksCleared``. Block hashes are ``bytes`` (sha256) or 64-bit
``int``s, salted per process unless ``PYTHONHASHSEED`` is fixed, so they mean nothing outside that engine.

When a ``BlockStored`` carries its token ids (vLLM does), :class:`VllmEventTranslator` re-keys every block to the
kvfabric chain ``h_i = H(h_{i-1} || tokens_i || extra_i)`` of the engine's ModelSpec and tenant salt, so a request
hashed by kvfabric finds the engine's blocks. It remembers vLLM hash -> kvfabric hash per medium to translate later
removals and children whose parent came in an earlier event. Blocks it cannot re-key (no tokens, another block size,
a parent it never saw) are indexed under a key derived from the raw vLLM hash and counted in ``stats.raw_keyed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack

from kvfabric.errors import EventFormatError
from kvfabric.events import AllCleared, BlockRemoved, BlockStored, KVEvent
from kvfabric.hashing import block_hash, encode_extra, prefix_hashes, root_hash
from kvfabric.ids import HASH_BYTES, NULL_HASH, Namespace, PrefixHash, TierId
from kvfabric.spec import ModelSpec

VllmHash = bytes | int
_BASE_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                    "extra_keys"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}  # fmt: skip
"""Field order of the array-like encoding some vLLM releases use (the leading fields are stable across releases)."""


@dataclass(frozen=True, slots=True)
class VllmEngineBinding:
    """Where one vLLM engine's blocks live in kvfabric's key space."""

    engine: str
    """The engine's name as a routing target (the events' source)."""
    namespace: Namespace
    spec: ModelSpec
    """The engine's model; ``spec.block_size`` must be the engine's block size for blocks to be re-keyed."""
    salt: bytes = b""
    """The tenant salt the fabric uses for this namespace (``kvfabric.hashing.tenant_salt``)."""


@dataclass(slots=True)
class TranslatorStats:
    batches: int = 0
    events: int = 0
    rekeyed_blocks: int = 0
    raw_keyed: int = 0
    removed_unknown: int = 0


@dataclass(frozen=True, slots=True)
class VllmBatch:
    ts: float
    data_parallel_rank: int | None
    events: list[dict[str, object]]


def raw_key(h: VllmHash) -> PrefixHash:
    """A fixed-size index key for a vLLM hash that could not be re-keyed (never equal to a kvfabric chain hash)."""
    data = h if isinstance(h, bytes) else int(h).to_bytes(16, "big", signed=True)
    return PrefixHash(hashlib.blake2b(b"vllm-raw/" + data, digest_size=HASH_BYTES).digest())


def _event_dict(item: object) -> dict[str, object]:
    if isinstance(item, dict):
        kind = item.get("type")
        if kind not in _BASE_FIELDS:
            raise EventFormatError(f"unknown vLLM KV event type {kind!r}")
        return item
    if isinstance(item, list) and item and item[0] in _BASE_FIELDS:
        names = _BASE_FIELDS[item[0]]
        return {"type": item[0], **dict(zip(names, item[1:], strict=False))}
    raise EventFormatError("vLLM KV event is neither a tagged map nor a tagged array")


def decode_vllm_batch(payload: bytes) -> VllmBatch:
    """Parse one ``KVEventBatch`` payload (the third frame of vLLM's ``[topic, seq, payload]`` message)."""
    try:
        top = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventFormatError(f"vLLM KV event batch is not valid msgpack: {exc}") from exc
    if isinstance(top, list) and len(top) in (2, 3):
        ts, events = top[0], top[1]
        rank = top[2] if len(top) == 3 else None
    elif isinstance(top, dict) and "events" in top:
        ts, events, rank = top.get("ts", 0.0), top["events"], top.get("data_parallel_rank")
    else:
        raise EventFormatError("vLLM KV event batch must be [ts, events, rank?] or a map with 'events'")
    if not isinstance(events, list) or not isinstance(ts, int | float):
        raise EventFormatError("vLLM KV event batch has the wrong types")
    return VllmBatch(float(ts), rank if isinstance(rank, int) else None, [_event_dict(e) for e in events])


def _medium(value: object) -> TierId:
    return TierId(str(value).lower()) if value else TierId("gpu")


def _extra(lora_name: object, keys: object) -> bytes:
    """kvfabric's extra bytes for one block from vLLM's lora name and untagged extra keys (mm ids, cache salt...)."""
    lora = lora_name if isinstance(lora_name, str) and lora_name else None
    rest = [k for k in keys if k != lora] if isinstance(keys, list | tuple) else []
    mm = [msgpack.packb(rest, use_bin_type=True)] if rest else []
    return encode_extra(lora, mm)


@dataclass(slots=True)
class VllmEventTranslator:
    """Turns one engine's vLLM event batches into kvfabric events (stateful: it remembers the re-keyed hashes)."""

    binding: VllmEngineBinding
    stats: TranslatorStats = field(default_factory=TranslatorStats)
    _keys: dict[tuple[str, VllmHash], PrefixHash] = field(default_factory=dict)
    _root: PrefixHash = NULL_HASH
    _model: bytes = b""

    def __post_init__(self) -> None:
        self._model = self.binding.spec.fingerprint()
        self._root = root_hash(self.binding.spec.fingerprint(), self.binding.salt)

    def translate(self, payload: bytes) -> list[KVEvent]:
        return self.translate_batch(decode_vllm_batch(payload))

    def translate_batch(self, batch: VllmBatch) -> list[KVEvent]:
        out: list[KVEvent] = []
        self.stats.batches += 1
        for ev in batch.events:
            self.stats.events += 1
            kind = ev["type"]
            if kind == "BlockStored":
                stored = self._stored(ev)
                if stored is not None:
                    out.append(stored)
            elif kind == "BlockRemoved":
                removed = self._removed(ev)
                if removed is not None:
                    out.append(removed)
            else:
                self._keys.clear()
                out.append(AllCleared(self.binding.engine, None))
        return out

    def _hashes(self, ev: dict[str, object]) -> list[VllmHash]:
        hashes = ev.get("block_hashes")
        if not isinstance(hashes, list) or not all(isinstance(h, bytes | int) for h in hashes):
            raise EventFormatError(f"vLLM {ev['type']} block_hashes must be a list of bytes or ints")
        return hashes

    def _stored(self, ev: dict[str, object]) -> BlockStored | None:
        hashes = self._hashes(ev)
        if not hashes:
            return None
        medium = _medium(ev.get("medium"))
        tokens = ev.get("token_ids") or []
        bs = ev.get("block_size")
        parent_v = ev.get("parent_block_hash")
        extras = ev.get("extra_keys") or [None] * len(hashes)
        spec_bs = self.binding.spec.block_size
        parent: PrefixHash | None
        if parent_v is None:
            parent = self._root
        else:
            parent = self._keys.get((medium, parent_v)) or self._keys.get((TierId("gpu"), parent_v))
        ours: list[PrefixHash] = []
        rekey = (
            parent is not None
            and isinstance(tokens, list)
            and bs == spec_bs
            and len(tokens) == len(hashes) * spec_bs
            and isinstance(extras, list)
            and len(extras) == len(hashes)
        )
        if rekey:
            assert parent is not None
            first_parent = parent
            for i, vh in enumerate(hashes):
                parent = block_hash(parent, tokens[i * spec_bs : (i + 1) * spec_bs],
                                    _extra(ev.get("lora_name"), extras[i]))  # fmt: skip
                self._keys[(medium, vh)] = parent
                ours.append(parent)
            self.stats.rekeyed_blocks += len(ours)
        else:
            first_parent = NULL_HASH
            for vh in hashes:
                key = raw_key(vh)
                self._keys[(medium, vh)] = key
                ours.append(key)
            self.stats.raw_keyed += len(ours)
        return BlockStored(self.binding.engine, medium, self.binding.namespace, self._model,  # type: ignore[arg-type]
                           tuple(ours), first_parent, spec_bs if rekey else 0)  # fmt: skip

    def _removed(self, ev: dict[str, object]) -> BlockRemoved | None:
        medium = _medium(ev.get("medium"))
        ours: list[PrefixHash] = []
        for vh in self._hashes(ev):
            key = self._keys.pop((medium, vh), None)
            if key is None:
                self.stats.removed_unknown += 1
            else:
                ours.append(key)
        if not ours:
            return None
        return BlockRemoved(self.binding.engine, medium, self.binding.namespace, self._model,  # type: ignore[arg-type]
                            tuple(ours))  # fmt: skip


def vllm_kv_events_config(endpoint: str, topic: str = "") -> dict[str, object]:
    """The ``kv_events_config`` that makes a vLLM engine publish to a kvfabric subscriber bound at ``endpoint``
    (vLLM connects its PUB socket when the endpoint has no wildcard, so the subscriber may use an ephemeral port)."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": topic}


def chain_tokens(binding: VllmEngineBinding, tokens: Sequence[int]) -> list[PrefixHash]:
    """The kvfabric chain of a prompt as this binding's re-keyed events would name its blocks."""
    return prefix_hashes(root_hash(binding.spec.fingerprint(), binding.salt), tokens, binding.spec.block_size)
