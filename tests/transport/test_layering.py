"""The data plane depends only on kvfabric's core: no module under ``kvfabric/transport/`` imports the store, the
index or the admin API (``kvfabric.node`` wires them together). Read from the source with ``ast``, so imports inside
functions and under ``TYPE_CHECKING`` count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvfabric.transport

TRANSPORT = Path(kvfabric.transport.__file__).parent
FORBIDDEN = ("kvfabric.api", "kvfabric.index", "kvfabric.store")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``source``; ``from kvfabric import store`` names ``kvfabric.store``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def forbidden(modules: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(line, m) for line, m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


@pytest.mark.parametrize("path", sorted(TRANSPORT.glob("*.py")), ids=lambda p: p.name)
def test_transport_module_imports_only_the_core(path: Path) -> None:
    assert forbidden(imported_modules(path.read_text())) == []


def test_the_check_sees_every_form_of_import() -> None:
    source = """
import kvfabric.store.tiered
from kvfabric.index.service import IndexService
from kvfabric import api
def f():
    from kvfabric.store import config
from kvfabric.transport import frames
import kvfabric.storeroom
"""
    assert [m for _, m in forbidden(imported_modules(source))] == [
        "kvfabric.store.tiered", "kvfabric.index.service", "kvfabric.index.service.IndexService", "kvfabric.api",
        "kvfabric.store", "kvfabric.store.config",
    ]  # fmt: skip
