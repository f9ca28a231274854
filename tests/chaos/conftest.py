from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.harness import Node, raise_own_descriptor_limit, start_node

raise_own_descriptor_limit()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One real ``kvfabric serve`` per test module: each attack runs against a node that already took others."""
    n = start_node(tmp_path_factory.mktemp("chaos-node"))
    try:
        yield n
    finally:
        n.stop()
