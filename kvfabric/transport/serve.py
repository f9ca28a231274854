"""``kvfabric serve``: one process serving the data plane over TCP for a TieredStore."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from kvfabric.errors import ConfigError
from kvfabric.transport.auth import load_or_create_secret
from kvfabric.transport.frames import Limits
from kvfabric.transport.server import FabricServer, ServerConfig

log = logging.getLogger("kvfabric.serve")
READY_LINE = "kvfabric serve: listening on {host}:{port}"
"""Printed (and flushed) on stdout once the port is bound, so scripts can start the server on port 0."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve the KV data plane (RAM + disk tiers) over TCP")
    p.add_argument("--data-dir", type=Path, default=None, help="persistent state (disk tier, secret); RAM only if unset")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9500, help="TCP port (0 = any free port; see the ready line)")
    p.add_argument("--config", default=None, help="TOML/YAML settings file (kvfabric.config)")
    p.add_argument("--ram-bytes", type=int, default=None, help="RAM arena size in bytes (default 1 GiB)")
    p.add_argument("--token", action="append", default=[], metavar="TOKEN=TENANT",
                   help="accept bearer TOKEN for TENANT (repeatable); without any, auth is off")  # fmt: skip
    p.add_argument("--secret-file", type=Path, default=None,
                   help="server secret salting every tenant's hashes (default: DATA_DIR/server_secret)")  # fmt: skip
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--no-nixl", action="store_true", help="do not register the RAM arena with NIXL")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def _tokens(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        token, sep, tenant = pair.partition("=")
        if not sep or not token or not tenant:
            raise ConfigError(f"--token expects TOKEN=TENANT, got {pair!r}")
        out[token] = tenant
    return out


def _open_store(args: argparse.Namespace) -> Any:
    if importlib.util.find_spec("kvfabric.store.tiered") is None:
        raise ConfigError("this build has no kvfabric.store.tiered (the tiered store); cannot serve")
    from kvfabric.store.config import StoreConfig
    from kvfabric.store.tiered import TieredStore

    fields: dict[str, Any] = {"data_dir": args.data_dir}
    if args.ram_bytes is not None:
        fields["ram_bytes"] = args.ram_bytes
    store = TieredStore.open(StoreConfig(**fields))
    store.start()  # background flusher: write-back queues, RAM watermark, TTL sweeps
    return store


def _server_config(args: argparse.Namespace, store: Any) -> ServerConfig:
    if args.config is not None:
        if importlib.util.find_spec("kvfabric.config") is None:
            raise ConfigError("--config needs kvfabric.config, which this build lacks; use the command-line flags")
        raise ConfigError("--config is not wired into serve yet; use the command-line flags")
    secret = args.secret_file.read_bytes() if args.secret_file else load_or_create_secret(args.data_dir)
    ssl_ctx = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        from kvfabric.transport.tls import server_context

        ssl_ctx = server_context(args.tls_cert, args.tls_key)
    max_block = getattr(getattr(store, "config", None), "max_block_bytes", None)
    limits = Limits(max_block_bytes=max_block) if max_block else Limits()
    return ServerConfig(
        host=args.host, port=args.port, server_secret=secret, tokens=_tokens(args.token), limits=limits,
        ssl=ssl_ctx, nixl=not args.no_nixl,
    )  # fmt: skip


async def _serve(store: Any, config: ServerConfig) -> None:
    server = FabricServer(store, config)
    await server.start()
    print(READY_LINE.format(host=config.host, port=server.port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        store = _open_store(args)
    except ConfigError as exc:
        print(f"kvfabric serve: {exc}", file=sys.stderr)
        return 2
    try:
        config = _server_config(args, store)
        _run_loop(_serve(store, config))
    except ConfigError as exc:
        print(f"kvfabric serve: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def _run_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop not installed; using the default asyncio event loop")
        asyncio.run(coro)
        return
    uvloop.run(coro)
