"""The object-tier benchmark runs and reports well-formed rows (its speed is measured in bench/, not here)."""

from __future__ import annotations

import math

from bench.store_object import object_rows
from tests.s3server import SeaweedFS


def test_object_rows_are_well_formed(s3_server: SeaweedFS) -> None:
    rows = object_rows([64 << 10], 4, repeat=1, server=s3_server)
    assert {r["metric"] for r in rows} == {"object_get", "object_get_into", "object_get_many", "object_put"}
    for r in rows:
        assert set(r) >= {"metric", "size", "against", "value", "baseline", "ratio"}
        assert r["size"] == 64 << 10 and r["value"] > 0 and r["baseline"] > 0  # type: ignore[operator]
        assert math.isclose(r["ratio"], r["value"] / r["baseline"], rel_tol=1e-2)  # type: ignore[operator, arg-type]
