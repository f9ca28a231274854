"""The index and router endpoints (``kvfabric.index.http``) in the admin app, behind its bearer tokens.

| endpoint | needs |
|---|---|
| ``POST /v1/route``, ``POST /v1/index/match`` | ``read``, and the chain's namespace among the token's namespaces |
| ``GET /v1/index/stats`` | ``read`` on all namespaces (``"*"``): it counts every tenant's blocks and every engine |
| ``PUT /v1/engines/{engine}/load`` | ``write`` on all namespaces: an engine's load steers every tenant's requests |
| ``DELETE /v1/engines/{engine}`` | ``admin`` on all namespaces: it drops everything the engine held |

With auth disabled every request is the operator, as everywhere in the admin app.
"""

from __future__ import annotations

from fastapi import APIRouter

from kvfabric.api.auth import require
from kvfabric.index.http import IndexAccess, create_index_router
from kvfabric.index.service import IndexService

INDEX_ACCESS = IndexAccess(
    query=require("read"),
    stats=require("read", node_wide=True),
    report=require("write", node_wide=True),
    remove=require("admin", node_wide=True),
)


def index_router(service: IndexService) -> APIRouter:
    """The index's router with the admin app's authentication; mount it with ``create_app(extra_routers=...)``."""
    return create_index_router(service, INDEX_ACCESS)
