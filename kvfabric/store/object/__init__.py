"""The S3-compatible object tier: segment objects, Parquet manifests, ranged reads, rebuild from the bucket.

``ObjectTierConfig`` imports without boto3/pyarrow; the tier itself (and ``SegmentEntry``) load on first use, so
configuration code stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvfabric.store.object.config import ObjectTierConfig

if TYPE_CHECKING:
    from kvfabric.store.object.manifest import SegmentEntry
    from kvfabric.store.object.tier import ObjectLocation, ObjectTier, ObjectTierStats

__all__ = ["ObjectLocation", "ObjectTier", "ObjectTierConfig", "ObjectTierStats", "SegmentEntry"]

_LAZY = {
    "ObjectTier": "kvfabric.store.object.tier",
    "ObjectLocation": "kvfabric.store.object.tier",
    "ObjectTierStats": "kvfabric.store.object.tier",
    "SegmentEntry": "kvfabric.store.object.manifest",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
