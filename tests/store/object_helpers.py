"""Building object tiers against the test S3 server."""

from __future__ import annotations

from typing import Any

from kvfabric.store.object import ObjectTier, ObjectTierConfig
from tests.s3server import SeaweedFS


def object_config(server: SeaweedFS, bucket: str, **overrides: Any) -> ObjectTierConfig:
    """A config for ``bucket`` on ``server`` with quick failure (2 tries, short timeouts) for tests."""
    fields: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "node-a",
        "endpoint_url": server.endpoint.endpoint_url,
        "region": server.endpoint.region,
        "max_attempts": 2,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 10.0,
        "outage_backoff_s": 0.2,
        "outage_backoff_max_s": 1.0,
    }
    fields.update(overrides)
    return ObjectTierConfig(**fields)


def open_tier(server: SeaweedFS, config: ObjectTierConfig, **kwargs: Any) -> ObjectTier:
    """``ObjectTier.open`` with the server's credentials handed to boto3 as a session."""
    return ObjectTier.open(config, session=server.endpoint.session(), **kwargs)
