"""Crash harness for the disk tier: acknowledged means durable, and nothing corrupt is ever served.

Each round spawns a writer process over one store directory (shared by all rounds, so every round also recovers
from the previous crash). The writer's threads put blocks with fsync "always" or "group" (alternating rounds),
delete some of their own acknowledged blocks, and in some rounds compact concurrently; after each put or delete
*returns*, the thread prints ``P <id>`` / ``D <id>`` to a pipe. At a random moment the harness SIGKILLs the
writer, reopens the store in its own process and checks every acknowledged block byte for byte (a payload is
derived from its id and the seed) and that every acknowledged delete stayed deleted.

    python bench/crash_store.py --rounds 20

Last line: ``rounds=R acked=N lost=L corrupt_served=C``; exit status 1 if anything was lost, served corrupt or
resurrected.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np

from kvfabric.ids import NULL_HASH, BlockKey, ModelFingerprint, Namespace, PrefixHash
from kvfabric.record import Block, BlockMeta
from kvfabric.spec import DType
from kvfabric.store.disk import DiskTier

SEGMENT_BYTES = 4 << 20
PRESENT, EITHER, GONE = "present", "either", "gone"
"""What a block must be after recovery: acked put; delete started but not acked; acked delete."""
MODEL = ModelFingerprint(hashlib.blake2b(b"kvfabric/crash-harness", digest_size=32).digest())
SIZES = (4096, 4096 * 3 + 100, 64 << 10, 256 << 10, 1 << 20, 3 << 20)  # some unaligned, some > 1 MiB


def _digest(seed: int, block_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{block_id}".encode(), digest_size=32).digest()


def make_block(seed: int, block_id: str) -> Block:
    """The block with this id: its key, size and payload all follow from (seed, id)."""
    d = _digest(seed, block_id)
    rng = np.random.default_rng(int.from_bytes(d[:8], "little"))
    size = SIZES[d[8] % len(SIZES)]
    key = BlockKey(Namespace("crash"), MODEL, PrefixHash(d))
    meta = BlockMeta(key, DType.UINT8, (size,), 16, NULL_HASH, 0)
    return Block(meta, rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())


# --- the writer (a child process) --------------------------------------------------------------------------------
def run_writer(args: argparse.Namespace) -> int:
    tier = DiskTier(args.dir, fsync=args.fsync, group_commit_ms=1.0, segment_bytes=SEGMENT_BYTES)
    out_lock = threading.Lock()
    stop = threading.Event()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def worker(w: int) -> None:
        rng = random.Random(f"{args.seed}:{args.round}:{w}")
        acked: list[str] = []
        for i in range(args.max_puts):
            block_id = f"{args.round}-{w}-{i}"
            tier.put(make_block(args.seed, block_id))
            say(f"P {block_id}")
            acked.append(block_id)
            if len(acked) > 4 and rng.random() < 0.3:
                victim = acked.pop(rng.randrange(len(acked) - 1))
                say(f"d {victim}")  # from here on the block may be gone, whether or not the delete is acked
                tier.delete(make_block(args.seed, victim).key)
                say(f"D {victim}")

    def compactor() -> None:
        while not stop.is_set():
            tier.compact(0.7)
            time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.threads)]
    if args.compact:
        threads.append(threading.Thread(target=compactor, daemon=True))
    say("READY")
    for th in threads:
        th.start()
    for th in threads[: args.threads]:
        th.join()
    stop.set()
    say("DONE")
    time.sleep(3600)  # wait to be killed: a clean close() must not hide anything
    return 0


# --- the harness -------------------------------------------------------------------------------------------------
def read_lines(proc: subprocess.Popen[str], lines: list[str], ready: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.endswith("\n"):
            break  # cut off by the kill: not an acknowledgement
        lines.append(line.strip())
        if line.startswith("READY"):
            ready.set()


def run_round(
    args: argparse.Namespace, r: int, store: Path, rng: random.Random, live: dict[str, str], failed: set[str]
) -> dict[str, int]:
    """One writer life and one check; ``live`` (id -> state) carries over rounds, ``failed`` collects the ids
    already counted as lost, corrupt or resurrected."""
    fsync = "always" if r % 2 == 0 else "group"
    threads = 1 if fsync == "always" else rng.choice([2, 4])
    compact = r % 3 == 2
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--writer", "--dir", str(store), "--seed", str(args.seed),
        "--round", str(r), "--fsync", fsync, "--threads", str(threads), "--max-puts", str(args.max_puts),
    ] + (["--compact"] if compact else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    ready = threading.Event()
    reader = threading.Thread(target=read_lines, args=(proc, lines, ready))
    reader.start()
    if not ready.wait(120):
        proc.kill()
        raise RuntimeError(f"round {r}: writer did not start: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(rng.uniform(0.05, args.max_kill_s))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"round {r}: writer exited with {proc.returncode} before the kill:\n{stderr}")
    if "DONE" in lines:
        print(f"round {r}: writer finished before the kill; raise --max-puts for mid-write kills", file=sys.stderr)

    acked = 0
    for line in lines:
        kind, _, block_id = line.partition(" ")
        if kind == "P":
            live[block_id] = PRESENT
            acked += 1
        elif kind == "d":
            live[block_id] = EITHER
        elif kind == "D":
            live[block_id] = GONE

    lost = corrupt = resurrected = 0
    with DiskTier(store, segment_bytes=SEGMENT_BYTES) as tier:
        report = tier.recovery
        for block_id, state in live.items():
            if block_id in failed:
                continue  # counted once, in the round that found it
            want = make_block(args.seed, block_id)
            got = tier.get(want.key)
            before = (lost, corrupt, resurrected)
            if got is None:
                lost += state == PRESENT
            elif state == GONE:
                resurrected += 1
            elif bytes(memoryview(got.payload).cast("B")) != want.payload or got.meta.key != want.key:
                corrupt += 1
            elif state == EITHER:
                live[block_id] = PRESENT  # settled: its delete never happened, so it must stay
            if got is None and state == EITHER:
                live[block_id] = GONE  # settled the other way
            if (lost, corrupt, resurrected) != before:
                failed.add(block_id)
    print(
        f"round {r}: fsync={fsync} threads={threads} compact={compact} acked={acked} "
        f"deleted={sum(1 for line in lines if line.startswith('D '))} checked={len(live)} lost={lost} "
        f"corrupt_served={corrupt} resurrected={resurrected} recovery: truncated={report.truncated_bytes} "
        f"reindexed={report.reindexed} dropped={report.dropped}",
        flush=True,
    )
    return {"acked": acked, "lost": lost, "corrupt": corrupt, "resurrected": resurrected}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="store directory (default: a temporary one, removed)")
    p.add_argument("--max-puts", type=int, default=400, help="puts per writer thread per round")
    p.add_argument("--max-kill-s", type=float, default=1.5, help="kill at a random moment within this many seconds")
    p.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fsync", default="always", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.writer:
        return run_writer(args)

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="kvfabric-crash-")
        args.dir = Path(tmp)
    store = args.dir / "store"
    rng = random.Random(args.seed)
    live: dict[str, str] = {}
    failed: set[str] = set()
    totals = {"acked": 0, "lost": 0, "corrupt": 0, "resurrected": 0}
    try:
        for r in range(args.rounds):
            for k, v in run_round(args, r, store, rng, live, failed).items():
                totals[k] += v
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if totals["resurrected"]:
        print(f"resurrected={totals['resurrected']} (acknowledged deletes undone)")
    print(f"rounds={args.rounds} acked={totals['acked']} lost={totals['lost']} corrupt_served={totals['corrupt']}")
    return 1 if totals["lost"] or totals["corrupt"] or totals["resurrected"] else 0


if __name__ == "__main__":
    sys.exit(main())
