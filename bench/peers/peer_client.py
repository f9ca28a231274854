"""Entry point of a peer's client half; runs in the bench virtualenv (``.bench-venv/bin/python -m ...``).

Prints one JSON line: the :class:`~bench.peers.result.PeerMeasurement` of the rounds it timed.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.peers import lmcache_peer, mooncake_peer, redis_peer

CLIENT_HALVES = {
    redis_peer.PEER: redis_peer.run_client_half,
    mooncake_peer.PEER: mooncake_peer.run_client_half,
    lmcache_peer.PEER: lmcache_peer.run_client_half,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("peer", choices=sorted(CLIENT_HALVES))
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="the peer's client-facing port")
    parser.add_argument("--metadata-port", type=int, help="mooncake: the HTTP metadata server's port")
    args = parser.parse_args(argv)
    extra = {"metadata_port": args.metadata_port} if args.peer == mooncake_peer.PEER else {}
    result = CLIENT_HALVES[args.peer](port=args.port, size=args.size, count=args.count, rounds=args.rounds, **extra)
    print(json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
