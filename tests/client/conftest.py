"""The client tests run against the same live servers as the transport tests: one set of fixtures; ``connect``
makes each test run once with the sync client and once with the asyncio one."""

import pytest

from tests.client.both import CLIENTS, Connect
from tests.transport.conftest import ram, server, store


@pytest.fixture(params=sorted(CLIENTS))
def connect(request: pytest.FixtureRequest) -> Connect:
    return CLIENTS[request.param]


__all__ = ["connect", "ram", "server", "store"]
