"""The kvfabric client SDK: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio)."""

from kvfabric.client.aio import AsyncClient
from kvfabric.client.session import LookupResult
from kvfabric.client.sync import Client

__all__ = ["AsyncClient", "Client", "LookupResult"]
