"""RAM tier bandwidth: put (into fresh and into warm shared memory), get (copy out), get_into (copy into the caller's
buffer) and a leased in-place read, each against numpy copying the same blocks into a warm region in the same run
(the ceiling for anything that copies once).

    PYTHONPATH=. python bench/bench_memory.py            # table (from the repo root)
    PYTHONPATH=. python bench/bench_memory.py --json     # one JSON line per measurement
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from kvfabric.hashing import block_hash, root_hash
from kvfabric.ids import BlockKey, Namespace
from kvfabric.record import Block, BlockMeta
from kvfabric.spec import DType, ModelSpec
from kvfabric.store.memory import MemoryTier

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}


def spec_for(nbytes: int) -> ModelSpec:
    # layers x 2 x 16 tokens x 8 heads x head_dim x bf16 = nbytes
    head_dim = nbytes // (2 * 16 * 8 * 2 * 2)
    return ModelSpec(model="bench/ram", num_layers=2, kv_heads=8, head_dim=head_dim, dtype=DType.BFLOAT16)


def blocks_for(spec: ModelSpec, n: int) -> list[Block]:
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size=spec.block_nbytes, dtype=np.uint8).tobytes()
    parent = root_hash(spec.fingerprint())
    out = []
    for i in range(n):
        h = block_hash(parent, list(range(i * 16, i * 16 + 16)))
        meta = BlockMeta(BlockKey(Namespace("bench"), spec.fingerprint(), h), spec.dtype, spec.block_shape, 16, parent)
        out.append(Block(meta, payload))
        parent = h
    return out


def rate(fn: Callable[[], None], nbytes: int, min_s: float = 0.3) -> float:
    """GB/s of ``fn`` (which moves ``nbytes``), best of repeated timings."""
    best = float("inf")
    deadline = time.perf_counter() + min_s
    while True:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return nbytes / best / 1e9


def run(size_name: str, nbytes: int) -> list[dict[str, object]]:
    spec = spec_for(nbytes)
    n = max(8, (256 << 20) // nbytes)  # ~256 MiB per pass
    blocks = blocks_for(spec, n)
    total = n * spec.block_nbytes
    cold = MemoryTier(total + (1 << 20))  # fresh shm pages: the first put of each page faults it in
    t0 = time.perf_counter()
    for b in blocks:
        cold.put(b)
    first_touch = total / (time.perf_counter() - t0) / 1e9
    cold.close()
    tier = MemoryTier(2 * total, prefault=True)  # room for an overwrite's second extent: no eviction in the loop
    src = np.frombuffer(blocks[0].payload, dtype=np.uint8)
    dst = np.empty_like(src)
    region = np.ones(total, dtype=np.uint8)  # touched, like a warm arena
    nb = spec.block_nbytes

    def memcpy() -> None:  # the same bytes into n distinct places: what any store must at least do
        for i in range(n):
            np.copyto(region[i * nb : (i + 1) * nb], src)

    def put() -> None:
        for b in blocks:
            tier.put(b)

    def get() -> None:
        for b in blocks:
            tier.get(b.key)

    def get_into() -> None:
        view = memoryview(dst)
        for b in blocks:
            tier.get_into(b.key, view)

    def lease_read() -> None:  # what a same-host reader does: lease, copy out of the arena, release
        for b in blocks:
            lease = tier.acquire(b.key)
            assert lease is not None
            with tier.lease_view(lease) as view:
                np.copyto(dst, np.frombuffer(view, dtype=np.uint8))
            tier.release(lease)

    baseline = rate(memcpy, total)
    put_rate = rate(put, total)
    rows = []
    for metric, value in (
        ("ram_put_first_touch_gbps", first_touch),
        ("ram_put_gbps", put_rate),
        ("ram_get_gbps", rate(get, total)),
        ("ram_get_into_gbps", rate(get_into, total)),
        ("ram_lease_read_gbps", rate(lease_read, total)),
    ):
        rows.append(
            {"metric": metric, "size": size_name, "against": "memcpy", "value": round(value, 3),
             "baseline": round(baseline, 3), "ratio": round(value / baseline, 3)}
        )  # fmt: skip
    tier.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    rows = [row for name, nbytes in SIZES.items() for row in run(name, nbytes)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'metric':<26}{'size':>7}{'GB/s':>9}{'memcpy':>9}{'ratio':>7}")
    for r in rows:
        print(f"{r['metric']:<26}{r['size']:>7}{r['value']:>9}{r['baseline']:>9}{r['ratio']:>7}")


if __name__ == "__main__":
    main()
