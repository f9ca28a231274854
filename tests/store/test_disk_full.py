"""DiskTier when full: the capacity limit and a real out-of-space error from the OS both leave the tier unchanged
and usable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvfabric.errors import TierFullError
from kvfabric.store.disk import DiskTier
from tests.blocks import make_chain
from tests.store.tier_suite import same

REPO = Path(__file__).resolve().parents[2]
SPAN = 8192  # one 4 KiB test block plus its header, padded


def snapshot(t: DiskTier) -> tuple[object, ...]:
    files = {p.name: p.stat().st_size for p in t.segment_paths()}
    s = t.stats()
    return sorted(k.to_bytes() for k in t.keys()), s.blocks, s.bytes, t.disk_usage(), files


def test_capacity_full_raises_and_changes_nothing(tmp_path: Path) -> None:
    chain = make_chain(12)
    with DiskTier(tmp_path, capacity_bytes=10 * SPAN, segment_bytes=64 << 10) as t:
        t.put_many(chain[:10])
        before = snapshot(t)
        with pytest.raises(TierFullError, match="capacity"):
            t.put(chain[10])
        assert snapshot(t) == before
        assert t.get(chain[10].key) is None
        assert all(same(t.get(b.key), b) for b in chain[:10])
        t.put(chain[0])  # re-putting what is already there needs no room
        # deleting frees index entries, compaction frees the bytes; then there is room again
        t.delete_many([b.key for b in chain[:8]])
        t.compact()
        t.put_many(chain[10:])
        assert all(same(t.get(b.key), b) for b in chain[8:])
    with DiskTier(tmp_path, capacity_bytes=10 * SPAN, segment_bytes=64 << 10) as t:
        assert {k.to_bytes() for k in t.keys()} == {b.key.to_bytes() for b in chain[8:]}


def test_put_many_stores_what_fits_then_raises(tmp_path: Path) -> None:
    chain = make_chain(6)
    with DiskTier(tmp_path, capacity_bytes=4 * SPAN) as t:
        with pytest.raises(TierFullError):
            t.put_many(chain)
        assert [t.contains(b.key) for b in chain] == [True] * 4 + [False] * 2
        assert t.stats().blocks == 4
    with DiskTier(tmp_path, capacity_bytes=4 * SPAN) as t:
        assert all(same(t.get(b.key), b) for b in chain[:4])


_LIMITED_WRITER = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from kvfabric.errors import TierFullError
    from kvfabric.store.disk import DiskTier
    from tests.blocks import make_chain
    from tests.store.tier_suite import same

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    path, fsync = sys.argv[1], sys.argv[2]
    chain = make_chain(40)
    t = DiskTier(path, fsync=fsync, segment_bytes=1 << 20)
    seg = t.segment_paths()[-1]
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, hard))  # the OS refuses to grow any file past 100 KiB
    stored, error = [], None
    for i, b in enumerate(chain):
        size_before = os.path.getsize(seg)
        try:
            t.put(b)
            stored.append(i)
        except TierFullError as exc:
            error = str(exc)
            break
    out = {
        "stored": stored, "error": error, "size_before": size_before, "size_after": os.path.getsize(seg),
        "failed_absent": t.get(chain[i].key) is None, "others_ok": all(same(t.get(chain[j].key), chain[j]) for j in stored),
    }
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    t.put(chain[i])  # usable again once there is room
    out["retry_ok"] = same(t.get(chain[i].key), chain[i])
    t.close()
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("fsync", ["always", "none"])
def test_os_out_of_space_truncates_and_stays_usable(tmp_path: Path, fsync: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_WRITER, str(tmp_path), fsync],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is not None and "File too large" in out["error"]
    assert 0 < len(out["stored"]) < 40
    assert out["size_after"] == out["size_before"]  # the torn bytes were cut
    assert out["size_after"] % 4096 == 0
    assert out["failed_absent"] and out["others_ok"] and out["retry_ok"]
    chain = make_chain(40)
    n = len(out["stored"]) + 1
    with DiskTier(tmp_path) as t:
        assert t.stats().blocks == n
        assert all(bytes(memoryview(t.get(b.key).payload).cast("B")) == b.payload for b in chain[:n])
