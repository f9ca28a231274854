from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.transport.arena_store import ArenaStore
from tests.transport.servers import ThreadServer, thread_server


@pytest.fixture
def store() -> Iterator[ArenaStore]:
    s = ArenaStore(slots=64, slot_bytes=256 << 10)
    yield s
    s.close()


@pytest.fixture
def server(store: ArenaStore) -> Iterator[ThreadServer]:
    with thread_server(store, nixl=False) as srv:
        yield srv
