"""Eviction and admission policies for the RAM tier.

A policy only orders keys; the tier decides what may be evicted (pinned and leased blocks are skipped through the
``skip`` predicate) and does the evicting. Policies are not thread-safe; the tier calls them under its lock.

- :class:`LRUPolicy` evicts the least recently used block and admits everything.
- :class:`PrefixCostPolicy` is Greedy-Dual-Size-Frequency with a recompute cost that grows with the block's position
  in its prefix chain: the attention part of prefill costs more per token the deeper the token sits, so a block deep
  in a long prefix saves more GPU time per byte than one near the start and is kept longer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from sortedcontainers import SortedList

from kvfabric.errors import ConfigError
from kvfabric.ids import BlockKey
from kvfabric.record import BlockMeta


class EvictionPolicy(ABC):
    """Orders resident keys for eviction; told of every insert, access and removal by its tier."""

    name: ClassVar[str]

    @abstractmethod
    def inserted(self, meta: BlockMeta, nbytes: int) -> None:
        """A block was stored (or overwritten)."""

    @abstractmethod
    def accessed(self, key: BlockKey) -> None:
        """A resident block was read."""

    @abstractmethod
    def removed(self, key: BlockKey, *, evicted: bool) -> None:
        """A block left the tier: evicted by this policy's choice, or deleted/overwritten."""

    @abstractmethod
    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        """The next key to evict among those ``skip`` rejects not, or ``None`` if there is none."""

    def admits(self, meta: BlockMeta, nbytes: int) -> bool:
        """Whether a block offered for promotion is worth displacing what the policy would evict for it."""
        return True


class LRUPolicy(EvictionPolicy):
    """Least recently used first. An ``OrderedDict`` in access order: oldest at the front."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def inserted(self, meta: BlockMeta, nbytes: int) -> None:
        self._order[meta.key] = None
        self._order.move_to_end(meta.key)

    def accessed(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: BlockKey, *, evicted: bool) -> None:
        self._order.pop(key, None)

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        for key in self._order:
            if not skip(key):
                return key
        return None


@dataclass(slots=True)
class _Scored:
    priority: float  # GDSF H value: clock at last touch + frequency * cost per byte
    seq: int  # tie-breaker (older first) so the sorted list never compares keys
    depth: int  # blocks before this one in its chain, as far as the policy has seen the chain
    cost_per_byte: float
    hits: int


class PrefixCostPolicy(EvictionPolicy):
    """Greedy-Dual-Size-Frequency where a block's cost is the prefill work it saves.

    ``cost = tokens * (1 + position / attention_tokens)``: every token pays the dense (MLP/projection) work once,
    plus attention work proportional to how many tokens precede it; ``attention_tokens`` is the context length at
    which the two are equal. ``position`` is ``depth * tokens``, and depth is learnt from the chain: a block whose
    parent is resident sits one deeper than its parent (a block whose parent the policy has not seen counts as the
    head of its chain, so the estimate is conservative).

    Priority ``H = L + hits * cost / nbytes``; the victim is the lowest H and ``L`` (the clock) rises to it, so blocks
    that stop being read age out however costly they were.
    """

    name = "prefix-cost"

    def __init__(self, attention_tokens: int = 8192, max_hits: int = 16) -> None:
        if attention_tokens <= 0:
            raise ValueError("attention_tokens must be positive")
        self.attention_tokens = attention_tokens
        self.max_hits = max_hits  # caps frequency so a once-hot block cannot outlive the clock for ever
        self._clock = 0.0
        self._seq = 0
        self._scores: dict[BlockKey, _Scored] = {}
        self._order: SortedList = SortedList()  # (priority, seq, key)

    def cost_per_byte(self, meta: BlockMeta, depth: int, nbytes: int) -> float:
        tokens = max(meta.token_count, 1)
        position = depth * tokens + tokens / 2
        return tokens * (1.0 + position / self.attention_tokens) / max(nbytes, 1)

    def depth_of(self, meta: BlockMeta) -> int:
        parent = self._scores.get(BlockKey(meta.key.namespace, meta.key.model, meta.parent))
        return parent.depth + 1 if parent is not None else 0

    def inserted(self, meta: BlockMeta, nbytes: int) -> None:
        self._drop(meta.key)
        depth = self.depth_of(meta)
        cpb = self.cost_per_byte(meta, depth, nbytes)
        self._seq += 1
        scored = _Scored(self._clock + cpb, self._seq, depth, cpb, 1)
        self._scores[meta.key] = scored
        self._order.add((scored.priority, scored.seq, meta.key))

    def accessed(self, key: BlockKey) -> None:
        scored = self._scores.get(key)
        if scored is None:
            return
        self._order.remove((scored.priority, scored.seq, key))
        scored.hits = min(scored.hits + 1, self.max_hits)
        scored.priority = self._clock + scored.hits * scored.cost_per_byte
        self._seq += 1
        scored.seq = self._seq
        self._order.add((scored.priority, scored.seq, key))

    def removed(self, key: BlockKey, *, evicted: bool) -> None:
        scored = self._drop(key)
        if evicted and scored is not None:
            self._clock = max(self._clock, scored.priority)

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        for _, _, key in self._order:
            if not skip(key):
                return key
        return None

    def admits(self, meta: BlockMeta, nbytes: int) -> bool:
        if not self._order:
            return True
        candidate = self._clock + self.cost_per_byte(meta, self.depth_of(meta), nbytes)
        return candidate >= self._order[0][0]

    def priority(self, key: BlockKey) -> float | None:
        scored = self._scores.get(key)
        return scored.priority if scored is not None else None

    def _drop(self, key: BlockKey) -> _Scored | None:
        scored = self._scores.pop(key, None)
        if scored is not None:
            self._order.remove((scored.priority, scored.seq, key))
        return scored


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {LRUPolicy.name: LRUPolicy, PrefixCostPolicy.name: PrefixCostPolicy}
"""Policies by the name a config uses for them."""


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by name; ``ConfigError`` naming the known ones otherwise."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown RAM eviction policy {name!r}; known: {sorted(POLICIES)}") from None
