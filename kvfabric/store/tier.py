"""The one tier contract every storage tier implements, and the plain data it speaks in.

A tier is synchronous: file and network I/O live in small sync methods, and async callers (the server) enter through
``asyncio.to_thread``. A new tier is done when it passes the shared suite in ``tests/store/tier_suite.py``.

Reads never return bad data: a record whose checksum fails is counted in ``stats.corrupt``, removed from the tier,
announced with a ``BlockRemoved`` event, and reported as a miss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvfabric.codec import Codec
from kvfabric.events import BlockRemoved, BlockStored, EventSink, KVEvent
from kvfabric.ids import BlockKey, Namespace, TierId
from kvfabric.record import Block, BlockMeta
from kvfabric.store.counters import stat

if TYPE_CHECKING:  # the tiers' own report types; they import this module, so only the type checker follows back
    from kvfabric.store.disk.recovery import RecoveryReport
    from kvfabric.store.disk.tier import DiskState
    from kvfabric.store.object.tier import ObjectTierStats


@dataclass(frozen=True, slots=True)
class TierCapabilities:
    """What a tier can do; composite stores read these instead of checking classes."""

    persistent: bool
    """Blocks survive a restart of the process (after the tier's durability point)."""
    shared: bool = False
    """Other nodes can read what this tier holds (object storage)."""
    zero_copy_get: bool = False
    """``get`` returns a view of the tier's own memory rather than a copy."""
    evicts: bool = False
    """The tier drops blocks by itself when full (a cache), rather than refusing writes."""
    verifies_reads: bool = False
    """Reads check the stored checksum, so a block changed behind the tier's back is a counted miss (the disk and
    object tiers; the RAM arena is process memory and keeps no checksum)."""
    compacts: bool = False
    """``compact`` reclaims space (the disk tier rewrites segments); otherwise it does nothing."""
    buffers_writes: bool = False
    """``put`` may return before the block reaches the tier's backing store; ``flush`` sends it (object segments)."""
    background: bool = False
    """``start`` starts the tier's own background work (the object uploader); otherwise it does nothing."""


@dataclass(frozen=True, slots=True)
class TierInfo:
    """What a tier reports about itself beyond its counters: the fields a tier has nothing to say about are None."""

    codec: Codec = Codec.RAW
    """How the tier stores payloads."""
    recovery: RecoveryReport | None = None
    """What opening the tier found and repaired (the disk tier)."""
    disk: DiskState | None = None
    """The filesystem's space state and the reserve (the disk tier)."""
    objects: ObjectTierStats | None = None
    """Upload backlog, uploads and outages (the object tier)."""


@dataclass(slots=True)
class TierStats:
    """Counters of one tier; ``bytes`` counts stored (possibly compressed) payload bytes."""

    blocks: int = stat(
        "Blocks held by the tier (object tier: uploaded plus pending upload, see kvfabric_object_*_blocks).",
        metric="kvfabric_tier_blocks", kind="gauge",
    )  # fmt: skip
    bytes: int = stat("Payload bytes held by the tier.", metric="kvfabric_tier_stored_bytes", kind="gauge")
    capacity_bytes: int | None = stat(
        "Capacity of the tier.", metric="kvfabric_tier_capacity_bytes", kind="gauge", default=None
    )
    hits: int = stat(
        "Client reads served by the tier (the store's internal reads not counted).", metric="kvfabric_tier_hits"
    )
    misses: int = stat("Client reads asked of the tier that it could not serve.", metric="kvfabric_tier_misses")
    corrupt: int = stat(
        "Blocks whose checksum failed on read (dropped, never served).", metric="kvfabric_tier_corrupt_blocks"
    )
    puts: int = stat("Blocks written to the tier.", metric="kvfabric_tier_puts")
    deletes: int = stat("Blocks deleted from the tier.", metric="kvfabric_tier_deletes")
    evictions: int = stat("Blocks evicted from the tier for space.", metric="kvfabric_tier_evictions")
    bytes_read: int = stat("Payload bytes read from the tier.", metric="kvfabric_tier_read_bytes")
    bytes_written: int = stat("Payload bytes written to the tier.", metric="kvfabric_tier_written_bytes")


def copy_payload(block: Block, out: memoryview) -> BlockMeta:
    """Copy ``block``'s payload into ``out``, which must be exactly ``meta.nbytes`` long; the block's meta."""
    dst = memoryview(out).cast("B")
    if len(dst) != block.meta.nbytes:
        raise ValueError(f"destination is {len(dst)} bytes, block {block.key} needs {block.meta.nbytes}")
    dst[:] = memoryview(block.payload).cast("B")
    return block.meta


class Tier(ABC):
    """Abstract storage tier keyed by :class:`~kvfabric.ids.BlockKey`.

    Implement ``put``, ``get``, ``head``, ``delete``, ``keys`` and ``close``; the batch forms, ``contains`` and
    ``get_into`` have correct defaults built from them that a tier overrides where it can do better. The optional
    operations (``start``, ``flush``, ``compact``) do nothing by default; a tier that gives one meaning says so in
    its :class:`TierCapabilities`, and ``info`` tells what the tier is beyond its counters. Callers never probe.
    """

    tier_id: TierId
    capabilities: TierCapabilities

    def __init__(self, tier_id: TierId, *, source: str = "local", events: EventSink | None = None) -> None:
        self.tier_id = tier_id
        self.source = source
        self.events = events
        self._stats = TierStats()

    # --- the abstract core -------------------------------------------------------------------------------------
    @abstractmethod
    def put(self, block: Block) -> None:
        """Store ``block`` (last write wins). When this returns the block is as durable as the tier promises."""

    @abstractmethod
    def get(self, key: BlockKey) -> Block | None:
        """The verified block, or ``None`` on a miss (including a corrupt record, which is dropped)."""

    @abstractmethod
    def head(self, key: BlockKey) -> BlockMeta | None:
        """The block's metadata without reading its payload, or ``None``."""

    @abstractmethod
    def delete(self, key: BlockKey) -> bool:
        """Remove the block; ``True`` if it was there."""

    @abstractmethod
    def keys(self, namespace: Namespace | None = None) -> Iterator[BlockKey]:
        """Every key held (in one namespace when given). Safe against concurrent writes; may miss or include
        keys written during the iteration."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources; the tier is unusable afterwards. Idempotent."""

    # --- defaults built on the core ----------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.head(key) is not None

    def get_into(self, key: BlockKey, out: memoryview) -> BlockMeta | None:
        """Copy the block's raw payload into ``out`` (exactly ``meta.nbytes`` long); ``None`` on a miss."""
        block = self.get(key)
        return None if block is None else copy_payload(block, out)

    def put_many(self, blocks: Iterable[Block]) -> None:
        for block in blocks:
            self.put(block)

    def get_many(self, keys: Iterable[BlockKey]) -> list[Block | None]:
        return [self.get(k) for k in keys]

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def delete_many(self, keys: Iterable[BlockKey]) -> int:
        return sum(self.delete(k) for k in keys)

    def condition(self) -> str | None:
        """Why the tier refuses writes right now (a full disk), or ``None`` when it takes them."""
        return None

    def stats(self) -> TierStats:
        """A snapshot of this tier's counters."""
        return replace(self._stats)

    # --- optional operations: no-ops unless the capabilities say otherwise -------------------------------------
    def start(self) -> None:
        """Start the tier's background work (``capabilities.background``). Idempotent."""

    def flush(self) -> None:
        """Send what ``put`` accepted but has not written to the backing store yet (``capabilities.buffers_writes``).
        Raises the tier's error when that is impossible now; what failed stays for the next flush."""

    def compact(self) -> object | None:
        """Reclaim space held by deleted blocks (``capabilities.compacts``); the tier's report, ``None`` if it has
        nothing to compact."""
        return None

    def info(self) -> TierInfo:
        """The codec and the reports this tier keeps (recovery at open, space state, upload backlog)."""
        return TierInfo()

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers for implementations ---------------------------------------------------------------------------
    def _emit(self, event: KVEvent) -> None:
        if self.events is not None:
            self.events.publish(event)

    def _emit_stored(self, meta: BlockMeta) -> None:
        if self.events is None:  # on every put's path: build no event nobody hears
            return
        self._emit(
            BlockStored(
                self.source, self.tier_id, meta.key.namespace, meta.key.model,
                (meta.key.prefix,), meta.parent, meta.token_count,
            )
        )  # fmt: skip

    def _emit_removed(self, key: BlockKey) -> None:
        if self.events is None:
            return
        self._emit(BlockRemoved(self.source, self.tier_id, key.namespace, key.model, (key.prefix,)))
