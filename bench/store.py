"""Store benchmark: each tier's throughput against the raw system call (or client) it is built on.

    python bench/store.py                 # a table
    python bench/store.py --json          # JSON lines: metric, size, against, value, baseline, ratio (+ unit)
    python bench/store.py --sizes 16MiB,256KiB --count 32 --dir /mnt/nvme/tmp

Rows come from the producers in ``ROW_PRODUCERS``; each measures its own baseline in the same run, on the same
bytes, in the same directory, so ``ratio = value / baseline`` is what the tier's own work costs. Values are GiB/s
of block payload. Each pass alternates the tier and its baseline block by block, so both meet the same device
conditions; passes are repeated ``--repeat`` times and the pass with the median ratio is reported, value and
baseline both from that pass.

Disk rows (this module):
- ``disk_put_durable`` vs ``pwrite_fsync``: DiskTier.put with fsync "always", one block after another, against
  pwrite + fdatasync of the same payload bytes into a plain file.
- ``disk_put_group`` vs ``pwrite_fsync``: 4 threads putting with fsync "group" (group commit), timed as a whole
  right after a sequential pwrite + fdatasync pass of the same bytes.
- ``disk_get`` vs ``preadv``: DiskTier.get (index lookup, preadv into fresh memory, checksum) against preadv of the
  same bytes into fresh memory; the page cache is dropped (POSIX_FADV_DONTNEED) on the segment files and on the
  baseline file before each timed pass.
- ``disk_get_into`` vs ``preadv_into``: the same reading into one caller-owned buffer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np

from kvfabric.ids import NULL_HASH, BlockKey, ModelFingerprint, Namespace, PrefixHash
from kvfabric.record import Block, BlockMeta
from kvfabric.spec import DType
from kvfabric.store.disk import DiskTier

GIB = 1 << 30
DEFAULT_SIZES = (16 << 20, 256 << 10)
DEFAULT_BYTES_PER_PASS = 256 << 20


def _sig(x: float) -> float:
    """Six significant digits: enough that ``ratio == value / baseline`` holds to 1e-5 after rounding."""
    return float(f"{x:.6g}")


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    size: int
    against: str
    value: float
    baseline: float
    unit: str = "GiB/s"

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    def to_json(self) -> str:
        return json.dumps(
            {
                "metric": self.metric, "size": self.size, "against": self.against, "value": _sig(self.value),
                "baseline": _sig(self.baseline), "ratio": _sig(self.ratio), "unit": self.unit,
            }
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class BenchContext:
    """What every row producer gets: the sizes to measure, how many blocks per pass, where to put files."""

    sizes: Sequence[int]
    count: int | None
    directory: Path
    repeat: int

    def count_for(self, size: int) -> int:
        return self.count if self.count is not None else max(8, DEFAULT_BYTES_PER_PASS // size)


RowProducer = Callable[[BenchContext], list[Row]]


# --- helpers ----------------------------------------------------------------------------------------------------
def drop_cache(paths: Sequence[Path]) -> None:
    """Evict the files' (clean) pages from the page cache, so the next read comes from the device."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_blocks(size: int, count: int, tag: str) -> list[Block]:
    """``count`` distinct keys sharing one random payload of ``size`` bytes (so the bytes written are identical
    to the baseline's)."""
    payload = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8)
    model = ModelFingerprint(hashlib.blake2b(b"kvfabric/bench", digest_size=32).digest())
    blocks = []
    for i in range(count):
        prefix = PrefixHash(hashlib.blake2b(f"{tag}:{size}:{i}".encode(), digest_size=32).digest())
        meta = BlockMeta(BlockKey(Namespace("bench"), model, prefix), DType.UINT8, (size,), 16, NULL_HASH, 0)
        blocks.append(Block(meta, memoryview(payload)))
    return blocks


def gibps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GIB


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- disk rows ----------------------------------------------------------------------------------------------------
class _DiskPass:
    """One repetition over fresh files. The tier and its baseline alternate block by block, so both see the same
    device conditions (on a shared machine, writeback throttling comes and goes within seconds)."""

    def __init__(self, ctx: BenchContext, size: int, rep: int) -> None:
        self.size = size
        self.count = ctx.count_for(size)
        self.root = ctx.directory / f"disk-{size}-{rep}"
        self.root.mkdir(parents=True)
        self.blocks = make_blocks(size, self.count, f"r{rep}")
        self.payload = memoryview(self.blocks[0].payload)
        self.baseline_path = self.root / "baseline.bin"
        self.tier = DiskTier(self.root / "tier", fsync="always")
        self.fd = os.open(self.baseline_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    @property
    def nbytes(self) -> int:
        return self.size * self.count

    def puts(self) -> dict[str, float]:
        """``disk_put_durable`` and ``pwrite_fsync``, block by block."""
        t_tier = t_base = 0.0
        for i, b in enumerate(self.blocks):
            t0 = time.perf_counter()
            os.pwritev(self.fd, [self.payload], i * self.size)
            os.fdatasync(self.fd)
            t1 = time.perf_counter()
            self.tier.put(b)
            t_tier += time.perf_counter() - t1
            t_base += t1 - t0
        return {"disk_put_durable": gibps(self.nbytes, t_tier), "pwrite_fsync": gibps(self.nbytes, t_base)}

    def gets(self, *, into: bool) -> dict[str, float]:
        """``disk_get`` vs ``preadv`` (fresh memory per block), or ``disk_get_into`` vs ``preadv_into`` (one
        caller-owned buffer), block by block, from a cold page cache."""
        drop_cache([self.baseline_path, *self.tier.segment_paths()])
        out = np.empty(self.size, dtype=np.uint8)
        view = memoryview(out)
        t_tier = t_base = 0.0
        for i, b in enumerate(self.blocks):
            t0 = time.perf_counter()
            buf = out if into else np.empty(self.size, dtype=np.uint8)
            if os.preadv(self.fd, [buf], i * self.size) != self.size:
                raise RuntimeError("short read from the baseline file")
            t1 = time.perf_counter()
            got = self.tier.get_into(b.key, view) if into else self.tier.get(b.key)
            t_tier += time.perf_counter() - t1
            t_base += t1 - t0
            if got is None:
                raise RuntimeError(f"block {b.key} missing from the disk tier")
        if into:
            return {"disk_get_into": gibps(self.nbytes, t_tier), "preadv_into": gibps(self.nbytes, t_base)}
        return {"disk_get": gibps(self.nbytes, t_tier), "preadv": gibps(self.nbytes, t_base)}

    def group_puts(self, threads: int = 4) -> dict[str, float]:
        """``disk_put_group``: ``threads`` writers with group commit, timed as a whole, right after a sequential
        pwrite + fdatasync pass over the same bytes (the baseline of this row)."""
        path = self.root / "baseline-group.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            t0 = time.perf_counter()
            for i in range(self.count):
                os.pwritev(fd, [self.payload], i * self.size)
                os.fdatasync(fd)
            t_base = time.perf_counter() - t0
        finally:
            os.close(fd)
        tier = DiskTier(self.root / "tier-group", fsync="group", group_commit_ms=1.0)
        try:
            shards = [self.blocks[w::threads] for w in range(threads)]
            ths = [threading.Thread(target=lambda s=s: [tier.put(b) for b in s]) for s in shards]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            t_tier = time.perf_counter() - t0
        finally:
            tier.close()
        return {"disk_put_group": gibps(self.nbytes, t_tier), "pwrite_fsync_group": gibps(self.nbytes, t_base)}

    def close(self) -> None:
        os.close(self.fd)
        self.tier.close()
        shutil.rmtree(self.root, ignore_errors=True)


DISK_PAIRS = (
    ("disk_put_durable", "pwrite_fsync", "pwrite_fsync"),
    ("disk_put_group", "pwrite_fsync", "pwrite_fsync_group"),
    ("disk_get", "preadv", "preadv"),
    ("disk_get_into", "preadv_into", "preadv_into"),
)
"""(metric, the baseline's name in the output, the key its measurement is kept under)."""


def disk_rows(ctx: BenchContext) -> list[Row]:
    rows = []
    for size in ctx.sizes:
        ratios: dict[str, list[tuple[float, float]]] = {m: [] for m, _, _ in DISK_PAIRS}
        for rep in range(ctx.repeat):
            p = _DiskPass(ctx, size, rep)
            try:
                results = {**p.puts(), **p.gets(into=False), **p.gets(into=True), **p.group_puts()}
            finally:
                p.close()
            for metric, _, key in DISK_PAIRS:
                ratios[metric].append((results[metric], results[key]))
        for metric, against, _ in DISK_PAIRS:
            # the pass with the median ratio, with the baseline measured alongside the tier in that same pass
            passes = sorted(ratios[metric], key=lambda vb: vb[0] / vb[1])
            value, baseline = passes[len(passes) // 2]
            rows.append(Row(metric, size, against, value, baseline))
    return rows


# --- object rows --------------------------------------------------------------------------------------------------
def object_rows_for(ctx: BenchContext) -> list[Row]:
    """``object_get`` (and friends) against raw boto3 ranged GETs on a SeaweedFS started for the run."""
    from bench.store_object import object_rows  # imported here: it starts a SeaweedFS, only wanted for these rows

    return [
        Row(str(r["metric"]), int(r["size"]), str(r["against"]), float(r["value"]), float(r["baseline"]))  # type: ignore[arg-type]
        for r in object_rows(ctx.sizes, ctx.count, repeat=ctx.repeat)
    ]


OBJECT_ROW_PRODUCERS: list[RowProducer] = [object_rows_for]


ROW_PRODUCERS: dict[str, list[RowProducer]] = {"disk": [disk_rows], "object": OBJECT_ROW_PRODUCERS}


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


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'metric':<18} {'size':>8} {'value':>10}   {'against':<14} {'baseline':>10} {'ratio':>7}")
    for r in rows:
        print(
            f"{r.metric:<18} {human(r.size):>8} {r.value:>7.3f} {r.unit:<2}   {r.against:<14} "
            f"{r.baseline:>7.3f} {r.unit:<2} {r.ratio:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--sizes", default=",".join(human(s).replace(" ", "") for s in DEFAULT_SIZES))
    p.add_argument("--count", type=int, default=None, help="blocks per pass (default: 256 MiB worth, at least 8)")
    p.add_argument("--dir", type=Path, default=None, help="where to put files (default: a temporary directory)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiers", default="disk,object", help="which tiers' rows to measure (disk, object)")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvfabric-bench-", dir=args.dir))
    try:
        ctx = BenchContext(sizes, args.count, work, args.repeat)
        tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
        unknown = set(tiers) - set(ROW_PRODUCERS)
        if unknown:
            p.error(f"unknown tiers {sorted(unknown)}; known: {sorted(ROW_PRODUCERS)}")
        rows = [row for t in tiers for produce in ROW_PRODUCERS[t] for row in produce(ctx)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        for row in rows:
            print(row.to_json())
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
