from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from tests.transport.servers import RAM_BYTES, ThreadServer, ram_store, thread_server


@pytest.fixture
def ram() -> MemoryTier:
    return MemoryTier(RAM_BYTES)  # its arena is a /dev/shm file: the shm and NIXL paths are live


@pytest.fixture
def store(ram: MemoryTier) -> Iterator[TieredStore]:
    s = ram_store(ram)
    yield s
    s.close()


@pytest.fixture
def server(store: TieredStore) -> Iterator[ThreadServer]:
    with thread_server(store, nixl=False) as srv:
        yield srv
