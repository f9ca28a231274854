"""What the tiered store holds, counted once per block whatever the number of tiers holding it.

The catalog answers the questions no single tier can: how many bytes a namespace holds (quotas), which of its blocks
was used least recently (quota eviction), and blocks/bytes per namespace and per model (stats). It is plain data: not
thread-safe, the store guards it with its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from kvfabric.ids import BlockKey, ModelFingerprint, Namespace


@dataclass(frozen=True, slots=True)
class UsageStats:
    """Distinct blocks and their raw payload bytes."""

    blocks: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class NamespaceStats:
    """One namespace's usage, in total and per model fingerprint."""

    blocks: int
    bytes: int
    models: dict[ModelFingerprint, UsageStats]


class Catalog:
    """Every stored key with its raw size, in least-recently-used order per namespace and overall."""

    def __init__(self) -> None:
        self._recency: OrderedDict[BlockKey, None] = OrderedDict()  # all namespaces: lower-tier eviction order
        self._by_namespace: dict[Namespace, OrderedDict[BlockKey, int]] = {}
        self._namespace_bytes: dict[Namespace, int] = {}
        self._model_usage: dict[tuple[Namespace, ModelFingerprint], list[int]] = {}  # [blocks, bytes]

    def __contains__(self, key: BlockKey) -> bool:
        entries = self._by_namespace.get(key.namespace)
        return entries is not None and key in entries

    def __len__(self) -> int:
        return len(self._recency)

    def size_of(self, key: BlockKey) -> int | None:
        entries = self._by_namespace.get(key.namespace)
        return entries.get(key) if entries is not None else None

    def add(self, key: BlockKey, nbytes: int) -> None:
        """Record ``key`` (most recently used) at ``nbytes``; replaces a previous size."""
        self.remove(key)
        self._recency[key] = None
        self._by_namespace.setdefault(key.namespace, OrderedDict())[key] = nbytes
        self._namespace_bytes[key.namespace] = self._namespace_bytes.get(key.namespace, 0) + nbytes
        usage = self._model_usage.setdefault((key.namespace, key.model), [0, 0])
        usage[0] += 1
        usage[1] += nbytes

    def remove(self, key: BlockKey) -> int | None:
        """Forget ``key``; its size, or ``None`` if it was not recorded."""
        entries = self._by_namespace.get(key.namespace)
        if entries is None or key not in entries:
            return None
        nbytes = entries.pop(key)
        del self._recency[key]
        self._namespace_bytes[key.namespace] -= nbytes
        usage = self._model_usage[(key.namespace, key.model)]
        usage[0] -= 1
        usage[1] -= nbytes
        if not usage[0]:
            del self._model_usage[(key.namespace, key.model)]
        if not entries:
            del self._by_namespace[key.namespace]
            del self._namespace_bytes[key.namespace]
        return nbytes

    def touch(self, key: BlockKey) -> None:
        entries = self._by_namespace.get(key.namespace)
        if entries is not None and key in entries:
            entries.move_to_end(key)
            self._recency.move_to_end(key)

    def namespace_bytes(self, namespace: Namespace) -> int:
        return self._namespace_bytes.get(namespace, 0)

    def least_recent(self, namespace: Namespace) -> Iterator[tuple[BlockKey, int]]:
        """The namespace's keys with sizes, least recently used first. Do not mutate while iterating."""
        return iter(self._by_namespace.get(namespace, OrderedDict()).items())

    def least_recent_overall(self) -> list[BlockKey]:
        """Every key, least recently used first (a copy)."""
        return list(self._recency)

    def keys(self, namespace: Namespace | None = None, model: ModelFingerprint | None = None) -> list[BlockKey]:
        spaces = [namespace] if namespace is not None else list(self._by_namespace)
        return [k for ns in spaces for k in self._by_namespace.get(ns, ()) if model is None or k.model == model]

    def stats(self) -> dict[Namespace, NamespaceStats]:
        models: dict[Namespace, dict[ModelFingerprint, UsageStats]] = {}
        for (ns, fp), (blocks, nbytes) in self._model_usage.items():
            models.setdefault(ns, {})[fp] = UsageStats(blocks, nbytes)
        return {
            ns: NamespaceStats(len(entries), self._namespace_bytes[ns], models.get(ns, {}))
            for ns, entries in self._by_namespace.items()
        }
