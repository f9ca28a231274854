"""Session-wide fixtures. Keep this file tiny: the logic lives in helper modules beside it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3server import SeaweedFS


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedFS]:
    """A real S3 server (SeaweedFS ``weed mini``) on private ports for the whole session; make a bucket per test
    with ``s3_server.create_bucket()``."""
    with SeaweedFS() as server:
        yield server
