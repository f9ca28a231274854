"""vLLM integration: :class:`KVFabricConnector`, a V1 KV connector backed by kvfabric.

``kv_connector="KVFabricConnector", kv_connector_module_path="kvfabric.client.vllm"``. The connector class is
imported on first access, so the vLLM-free parts (``layouts``, ``plan``, ``staging``) load without vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvfabric.client.vllm.connector import KVFabricConnector

__all__ = ["KVFabricConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVFabricConnector":
        from kvfabric.client.vllm.connector import KVFabricConnector

        return KVFabricConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
