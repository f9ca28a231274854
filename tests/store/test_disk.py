"""DiskTier: the shared tier suite, plus recovery, deletes, compaction, capacity and the sealed-segment hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvfabric.store.disk import DiskTier
from kvfabric.store.tier import Tier
from tests.store.tier_suite import TierSuite


class TestDiskTier(TierSuite):
    @pytest.fixture
    def tier(self, tmp_path: Path) -> Tier:
        t = DiskTier(tmp_path / "disk", fsync="group", segment_bytes=64 << 10)
        yield t
        t.close()

    @pytest.fixture
    def reopen(self, tmp_path: Path) -> Callable[[], Tier]:
        return lambda: DiskTier(tmp_path / "disk", fsync="group", segment_bytes=64 << 10)
