"""Test helper process: ``python -m tests.transport.serve_arena`` serves an in-test ArenaStore with the real
FabricServer and prints the ready line, so tests can put clients in other processes and kill them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from kvfabric.transport.serve import READY_LINE
from kvfabric.transport.server import FabricServer, ServerConfig
from tests.transport.arena_store import ArenaStore


async def main(args: argparse.Namespace) -> None:
    store = ArenaStore(slots=args.slots, slot_bytes=args.slot_bytes)
    tokens = dict(pair.split("=", 1) for pair in args.token)
    config = ServerConfig(port=0, server_secret=b"test-secret" * 3, tokens=tokens, nixl=args.nixl)
    server = FabricServer(store, config)
    await server.start()
    print(READY_LINE.format(host="127.0.0.1", port=server.port), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--slot-bytes", type=int, default=1 << 20)
    parser.add_argument("--token", action="append", default=[])
    parser.add_argument("--nixl", action="store_true")
    logging.basicConfig(level=logging.WARNING)
    import uvloop

    uvloop.run(main(parser.parse_args()))
