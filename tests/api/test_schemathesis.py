"""Property-based conformance: schemathesis generates requests (valid and invalid) from the served OpenAPI spec and
checks every response: no 5xx, status codes and bodies as documented, invalid input rejected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from kvfabric.store.tiered import TieredStore
from schemathesis import checks

from kvfabric.api.app import create_app
from kvfabric.api.routes_index import index_router
from kvfabric.index.router import EngineLoad
from kvfabric.index.service import IndexService
from tests.api.conftest import bearer, make_settings
from tests.blocks import SPEC, make_chain

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
]


@pytest.fixture
def api_schema(tmp_path: Path) -> Iterator[schemathesis.BaseSchema]:
    s = make_settings(tmp_path / "data")
    store = TieredStore.open(s.store_config())
    store.register_model(SPEC)
    store.put_many(make_chain(8, namespace="tenant-a", seed=5))
    # the index and router endpoints, as kvfabric serve mounts them (with two engines to route to)
    assert s.server.server_secret is not None
    index = IndexService.for_node(s.index, s.server.server_secret.get_secret_value().encode(), model_source=store.model)
    for name in ("engine-0", "engine-1"):
        index.report_load(EngineLoad(name))
    app = create_app(store, s, extra_routers=[index_router(index)])
    try:
        with TestClient(app):  # runs the app's lifespan (the stats sampler) around the whole run
            yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        store.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_spec(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=bearer("admin"), checks=CHECKS)
