"""Measure peers from the command line: one JSON line per peer.

    python bench/peers/run_peer.py redis --size 16777216 --count 8
    python bench/peers/run_peer.py redis mooncake lmcache --size 1048576 --count 64 --rounds 3

Runs under any Python 3.11 (the project's); each peer's client half runs in ``.bench-venv/`` by itself. A peer that
cannot run prints ``{"peer": ..., "error": ...}`` and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import lmcache_peer, mooncake_peer, redis_peer
from bench.peers.result import PeerUnavailableError

MEASURES = {
    redis_peer.PEER: redis_peer.measure,
    mooncake_peer.PEER: mooncake_peer.measure,
    lmcache_peer.PEER: lmcache_peer.measure,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure kvfabric's peer systems (put/get GiB/s).")
    parser.add_argument("peers", nargs="+", choices=sorted(MEASURES), metavar="PEER",
                        help=f"one or more of: {', '.join(sorted(MEASURES))}")
    parser.add_argument("--size", type=int, required=True, help="block size in bytes")
    parser.add_argument("--count", type=int, required=True, help="blocks moved per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    args = parser.parse_args(argv)
    status = 0
    for peer in args.peers:
        try:
            line = MEASURES[peer](args.size, args.count, args.rounds).to_dict()
        except PeerUnavailableError as exc:
            line = {"peer": peer, "size": args.size, "count": args.count, "error": exc.reason}
            status = 1
        except ValueError as exc:  # a size, count or rounds this peer cannot measure
            line = {"peer": peer, "size": args.size, "count": args.count, "error": str(exc)}
            status = 1
        print(json.dumps(line), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
