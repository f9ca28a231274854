"""Object-tier read and write bandwidth against raw boto3 on the same S3 server (SeaweedFS ``weed mini``).

    python bench/store_object.py [--json] [--sizes 16MiB,256KiB] [--count N] [--repeat 3]

Rows (GiB/s of block payload; ratio = value / baseline, measured in the same run, best of ``--repeat``):

* ``object_get`` vs ``boto3_range_get``: ``ObjectTier.get`` of every block (ranged GET + header/payload checksum
  verification + decode) against plain ``get_object(Range=...)["Body"].read()`` of the same byte ranges of the same
  segment objects, one after another on one thread, from the same server.
* ``object_get_into`` vs ``boto3_range_get``: the same, streaming into a preallocated buffer.
* ``object_get_many`` vs ``boto3_range_get``: one ``get_many`` of all blocks (coalesced ranges, parallel GETs).
* ``object_put`` vs ``boto3_put_object``: ``put_many`` + ``flush`` (segments and manifests uploaded) against
  ``put_object`` of objects of the same size and count as the tier's segments.

SeaweedFS's PUT path is CPU-bound (~60 MB/s on small machines), so absolute numbers describe the server; the
ratios describe the tier. ``object_rows(sizes, count)`` is what ``bench/store.py`` calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np

from kvfabric.codec import Codec
from kvfabric.ids import NULL_HASH, BlockKey, ModelFingerprint, Namespace, PrefixHash
from kvfabric.record import Block, BlockMeta
from kvfabric.spec import DType
from kvfabric.store.object import ObjectLocation, ObjectTier, ObjectTierConfig
from tests.s3server import SeaweedFS

GIB = 1 << 30
DEFAULT_SIZES = (16 << 20, 256 << 10)
DEFAULT_BYTES_PER_PASS = 256 << 20
SEGMENT_BYTES = 64 << 20


def count_for(size: int, count: int | None) -> int:
    return count if count is not None else max(8, DEFAULT_BYTES_PER_PASS // size)


def make_blocks(size: int, count: int, tag: str) -> list[Block]:
    """``count`` distinct keys, each with its own random payload of ``size`` bytes."""
    rng = np.random.default_rng(size)
    model = ModelFingerprint(hashlib.blake2b(b"kvfabric/bench", digest_size=32).digest())
    blocks = []
    for i in range(count):
        prefix = PrefixHash(hashlib.blake2b(f"{tag}:{size}:{i}".encode(), digest_size=32).digest())
        meta = BlockMeta(BlockKey(Namespace("bench"), model, prefix), DType.UINT8, (size,), 16, NULL_HASH, 0)
        blocks.append(Block(meta, rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()))
    return blocks


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _row(metric: str, size: int, against: str, value: float, baseline: float) -> dict[str, object]:
    return {
        "metric": metric, "size": size, "against": against, "value": round(value, 6), "baseline": round(baseline, 6),
        "ratio": round(value / baseline, 4) if baseline else float("nan"), "unit": "GiB/s",
    }  # fmt: skip


class _SizePass:
    """One block size on one bucket: the blocks uploaded by the tier (and the same volume by raw boto3), then reads
    timed A/B against boto3 on the same segment objects."""

    def __init__(self, server: SeaweedFS, size: int, count: int) -> None:
        self.server = server
        self.size = size
        self.blocks = make_blocks(size, count, "object")
        self.nbytes = size * count
        self.bucket = server.create_bucket()
        self.client = server.client()  # plain boto3, default settings
        # SeaweedFS allocates volumes on a bucket's first write (~1 s): pay it before anything is timed
        self.client.put_object(Bucket=self.bucket, Key="warm-up", Body=b"x")  # type: ignore[attr-defined]
        self.tier: ObjectTier | None = None
        self.locations: list[ObjectLocation] = []
        self.out = np.empty(size, dtype=np.uint8)
        self._round = 0

    def object_put(self) -> float:
        """put_many + flush into a fresh prefix; the tier of the last round serves the reads."""
        self._round += 1
        config = ObjectTierConfig(
            bucket=self.bucket, prefix=f"bench-{self._round}", endpoint_url=self.server.endpoint.endpoint_url,
            region=self.server.endpoint.region, segment_bytes=max(SEGMENT_BYTES, self.size),
            backlog_bytes=max(4 * SEGMENT_BYTES, 4 * self.size), codec=Codec.RAW,  # raw bytes against raw boto3
        )  # fmt: skip
        tier = ObjectTier.open(config, session=self.server.endpoint.session())

        def run() -> None:
            tier.put_many(self.blocks)
            tier.flush()

        seconds = _timed(run)
        if self.tier is not None:
            self.tier.delete_many([b.key for b in self.blocks])  # its segments are collected: keep the disk small
            self.tier.close()
        self.tier = tier
        located = [tier.locate(b.key) for b in self.blocks]
        if any(loc is None for loc in located):
            raise RuntimeError("a block was not uploaded")
        self.locations = [loc for loc in located if loc is not None]
        return seconds

    def boto3_put_object(self) -> float:
        """put_object of as many objects of the same sizes as the tier's segments (after its first round)."""
        keys = sorted({loc.object_key for loc in self.locations})
        sizes = [self.client.head_object(Bucket=self.bucket, Key=k)["ContentLength"] for k in keys]  # type: ignore[attr-defined]
        bodies = [np.random.default_rng(n).integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]

        def run() -> None:
            for i, body in enumerate(bodies):
                self.client.put_object(Bucket=self.bucket, Key=f"raw/{i}.seg", Body=body)  # type: ignore[attr-defined]

        return _timed(run)

    def object_get(self) -> float:
        tier = self._tier()

        def run() -> None:
            for b in self.blocks:
                if tier.get(b.key) is None:
                    raise RuntimeError(f"object tier missed {b.key}")

        return _timed(run)

    def object_get_into(self) -> float:
        tier, view = self._tier(), memoryview(self.out)

        def run() -> None:
            for b in self.blocks:
                if tier.get_into(b.key, view) is None:
                    raise RuntimeError(f"object tier missed {b.key}")

        return _timed(run)

    def object_get_many(self) -> float:
        tier = self._tier()

        def run() -> None:
            if any(g is None for g in tier.get_many([b.key for b in self.blocks])):
                raise RuntimeError("object tier missed a block in get_many")

        return _timed(run)

    def boto3_range_get(self) -> float:
        def run() -> None:
            for loc in self.locations:
                rng = f"bytes={loc.offset}-{loc.offset + loc.record_len - 1}"
                body = self.client.get_object(Bucket=self.bucket, Key=loc.object_key, Range=rng)["Body"].read()  # type: ignore[attr-defined]
                if len(body) != loc.record_len:
                    raise RuntimeError("short ranged GET")

        return _timed(run)

    def _tier(self) -> ObjectTier:
        if self.tier is None:
            raise RuntimeError("object_put runs first")
        return self.tier

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()


def object_rows(
    sizes: Sequence[int] = DEFAULT_SIZES, count: int | None = None, *, repeat: int = 3, server: SeaweedFS | None = None
) -> list[dict[str, object]]:
    """Object-tier rows for each block size (JSON-ready dicts: metric, size, against, value, baseline, ratio, unit).

    ``count`` blocks per size (default: 256 MiB worth, at least 8); starts its own SeaweedFS unless given one.
    """
    if server is None:
        with SeaweedFS() as own:
            return object_rows(sizes, count, repeat=repeat, server=own)
    rows: list[dict[str, object]] = []
    for size in sizes:
        p = _SizePass(server, size, count_for(size, count))
        try:
            best: dict[str, float] = {}
            for _ in range(repeat):  # interleaved, so drift on a shared machine hits both sides alike
                for name in ("object_put", "boto3_put_object", "boto3_range_get", "object_get", "object_get_into",
                             "object_get_many"):  # fmt: skip
                    seconds = getattr(p, name)()
                    best[name] = max(best.get(name, 0.0), p.nbytes / seconds / GIB)
        finally:
            p.close()
        for metric in ("object_get", "object_get_into", "object_get_many"):
            rows.append(_row(metric, size, "boto3_range_get", best[metric], best["boto3_range_get"]))
        rows.append(_row("object_put", size, "boto3_put_object", best["object_put"], best["boto3_put_object"]))
    return rows


# --- command line -------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits) :]
    if not digits or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 16MiB, 256KiB, 4096")
    return int(digits) * _UNITS[unit]


def human(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def print_table(rows: Sequence[dict[str, object]]) -> None:
    print(f"{'metric':<16} {'size':>8} {'value':>10}   {'against':<16} {'baseline':>10} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['metric']:<16} {human(int(r['size'])):>8} {r['value']:>6.3f} {r['unit']}   {r['against']:<16} "  # type: ignore[call-overload]
            f"{r['baseline']:>6.3f} {r['unit']} {r['ratio']:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--sizes", default=",".join(human(s).replace(" ", "") for s in DEFAULT_SIZES))
    p.add_argument("--count", type=int, default=None, help="blocks per size (default: 256 MiB worth, at least 8)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    rows = object_rows(sizes, args.count, repeat=args.repeat)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
