"""An S3 outage shows as unavailable, in the store's counters and on /metrics: reads of blocks only S3 holds miss
(counted as unavailable, not as plain misses or errors), and they are served again once S3 is back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kvfabric.api.app import create_app
from kvfabric.store.config import StoreConfig
from kvfabric.store.tiered import TieredStore
from tests.api.conftest import bearer, make_settings
from tests.blocks import SPEC, make_chain
from tests.s3server import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.store.object_helpers import object_config
from tests.store.tiered_helpers import BLOCK


@pytest.fixture
def own_server() -> Iterator[SeaweedFS]:
    """A server of this test's own, so stopping it disturbs no other test."""
    with SeaweedFS() as server:
        yield server


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not on /metrics"
    return float(m.group(1))


def test_an_outage_counts_as_unavailable_and_reads_come_back(own_server: SeaweedFS, tmp_path: Path) -> None:
    obj = object_config(own_server, own_server.create_bucket(), access_key_id=ACCESS_KEY,
                        secret_access_key=SECRET_KEY, segment_bytes=1 << 20, backlog_bytes=16 << 20)  # fmt: skip
    store = TieredStore.open(StoreConfig(ram_bytes=4 * BLOCK, object=obj, ram_high_watermark=1.0))
    try:
        store.register_model(SPEC)
        chain = make_chain(8, seed=71)
        store.put_many(chain)
        store.flush()
        only_in_s3 = [b for b in chain if store.lookup([b.key]) == ["object"]]
        assert only_in_s3, "RAM holds 4 of 8 blocks: the others live only in S3"
        with TestClient(create_app(store, make_settings(tmp_path / "settings"))) as admin:
            quiet = _metric(admin.get("/metrics", headers=bearer("admin")).text, "kvfabric_store_unavailable_total")
            assert quiet == 0

            own_server.stop()
            assert all(store.get(b.key) is None for b in only_in_s3)  # a miss, never an error
            down = store.store_stats()
            assert down.unavailable >= len(only_in_s3)
            text = admin.get("/metrics", headers=bearer("admin")).text
            assert _metric(text, "kvfabric_store_unavailable_total") == down.unavailable

            own_server.start()  # same ports, same data
            back = [store.get(b.key) for b in only_in_s3]
            assert all(g is not None and bytes(g.payload) == b.payload for g, b in zip(back, only_in_s3, strict=True))
            assert store.store_stats().unavailable == down.unavailable  # nothing more counted once it is back
    finally:
        store.close()
