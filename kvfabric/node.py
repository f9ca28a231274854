"""A kvfabric node, the composition root: the TieredStore, the data-plane server over it, and with an admin port the
index fed by the store's tiers and the admin app (REST API, ``/metrics``, dashboard); and ``kvfabric serve``, which
runs one.

This is the one module that wires the layers together, so ``transport/``, ``store/``, ``index/`` and ``api/`` need
not know of one another. Settings come from ``--config`` (or ``$KVFABRIC_CONFIG``) and ``KVFABRIC_*`` environment
variables (``kvfabric.config``); command-line flags given explicitly override them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvfabric.config import CONFIG_PATH_ENV, Settings, load_settings
from kvfabric.errors import ConfigError, KVFabricError
from kvfabric.index.local_feed import LoopEventSink, announce_held
from kvfabric.keying import DataDir, KeyingSecret, MetaStore, resolve_secret, verify
from kvfabric.startup import capacity_warnings, placeholder_warnings, probe_object_store
from kvfabric.store.config import StoreConfig
from kvfabric.store.tiered import TieredStore
from kvfabric.transport.auth import TokenGrant
from kvfabric.transport.frames import Limits
from kvfabric.transport.server import FabricServer, ServerConfig

if TYPE_CHECKING:
    from kvfabric.api.metrics import Metrics
    from kvfabric.index.service import IndexService

log = logging.getLogger("kvfabric.serve")
READY_LINE = "kvfabric serve: listening on {host}:{port}"
"""Printed (and flushed) on stdout once the port is bound, so scripts can start the server on port 0."""
ADMIN_READY_LINE = "kvfabric serve: admin API on http://{host}:{port}"
"""Printed before READY_LINE when the admin app is bound."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve the KV data plane (RAM + disk tiers) over TCP")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="persistent state (disk tier, secret); RAM only if unset"
    )
    p.add_argument("--host", default=None, help="address to bind (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (default: server.port, 9500; 0 = any free port; see the ready line)")  # fmt: skip
    p.add_argument("--admin-port", type=int, default=None,
                   help="admin REST API, /metrics and dashboard port (default: server.admin_port when a config file "
                        "is used, else no admin app; 0 = any free port)")  # fmt: skip
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
    p.add_argument("--debug", action="store_true", help="on a start-up error, show the traceback, not one line")
    p.set_defaults(func=run)


def _tokens(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        token, sep, tenant = pair.partition("=")
        if not sep or not token or not tenant:
            raise ConfigError(f"--token expects TOKEN=TENANT, got {pair!r}")
        out[token] = tenant
    return out


def _keying_secret(args: argparse.Namespace, settings: Settings) -> KeyingSecret:
    srv = settings.server
    obj = settings.object
    return resolve_secret(
        secret_file=args.secret_file or srv.secret_file,
        configured=srv.server_secret.get_secret_value() if srv.server_secret is not None else None,
        data_dir=settings.store.data_dir,
        shared=f"s3://{obj.bucket}/{obj.prefix}" if obj.enabled else None,
    )


def _verify_keying(place: MetaStore, keying: KeyingSecret) -> None:
    """Refuse to serve over blocks keyed with another secret (they would all miss, silently)."""
    if verify(place, keying) == "recorded over existing blocks":
        log.warning("%s held blocks but no keying check; recorded this node's (%s)", place.describe(), keying.origin)


def _server_config(args: argparse.Namespace, settings: Settings, keying: KeyingSecret) -> ServerConfig:
    srv = settings.server
    tokens: dict[str, str | TokenGrant] = dict(_tokens(args.token))  # --token: every scope in its tenant
    if not tokens and srv.auth.enabled:
        tokens = {t.token.get_secret_value(): TokenGrant.of(t.tenant, t.scopes, t.namespaces) for t in srv.auth.tokens}
    cert = args.tls_cert or (str(srv.tls.cert) if srv.tls.cert else None)
    key = args.tls_key or (str(srv.tls.key) if srv.tls.key else None)
    ssl_ctx = None
    if cert or key:
        if not (cert and key):
            raise ConfigError("--tls-cert and --tls-key go together")
        from kvfabric.transport.tls import server_context

        ssl_ctx = server_context(cert, key)
    limits = Limits(max_batch=srv.max_batch, max_payload_bytes=srv.max_frame_bytes,
                    max_block_bytes=min(settings.store.max_block_bytes, srv.max_frame_bytes))  # fmt: skip
    return ServerConfig(
        host=args.host or srv.host, port=srv.port if args.port is None else args.port, server_secret=keying.secret,
        tokens=tokens, limits=limits, ssl=ssl_ctx, nixl=not args.no_nixl, node_id=settings.store.node_id,
        max_connections=srv.max_connections, max_connections_per_peer=srv.max_connections_per_peer,
        fd_reserve=srv.fd_reserve,
        handshake_timeout_s=srv.handshake_timeout_s, frame_timeout_s=srv.frame_timeout_s,
        idle_timeout_s=srv.idle_timeout_s, max_inflight_bytes=srv.max_inflight_bytes,
        max_models_per_tenant=srv.max_models_per_tenant,
    )  # fmt: skip


def _effective(args: argparse.Namespace, settings: Settings) -> Settings:
    """The settings with the flags given on the command line in them: what the node runs on and ``/v1/config``
    shows."""
    return settings.overridden(
        store={"data_dir": args.data_dir, "ram_bytes": args.ram_bytes},
        server={"host": args.host, "port": args.port, "admin_port": args.admin_port},
    )


def _admin_port(args: argparse.Namespace, settings: Settings) -> int | None:
    """Where the admin app listens: ``--admin-port``, else ``server.admin_port`` when a config file is in use."""
    if args.admin_port is not None:
        return int(args.admin_port)
    if args.config is not None or os.environ.get(CONFIG_PATH_ENV):
        return settings.server.admin_port
    return None


def _check_admin_auth(args: argparse.Namespace, settings: Settings) -> None:
    # Data-plane tokens from --token carry no scopes; an admin API left open beside them would let anyone delete.
    if args.token and not settings.server.auth.enabled:
        raise ConfigError(
            "the admin API needs its tokens with scopes in the config (server.auth.tokens) when the data plane "
            "uses --token; set them there, or leave out --admin-port"
        )


class _NodeIndex:
    """The node's index on the serving loop: fed by the store's tiers (through ``events``), by what the tiers held
    at start (announced from a worker thread), and by the vLLM engines in ``[[index.vllm_engines]]``."""

    def __init__(self, service: IndexService, store: TieredStore, node_id: str, events: LoopEventSink) -> None:
        self.service = service
        self._stop = threading.Event()
        held = ((tier, store.tier(tier).keys()) for tier in store.tiers)
        self._announcer = asyncio.create_task(self._announce(events, node_id, held), name="kvfabric-index-announce")

    @classmethod
    async def start(
        cls, store: TieredStore, config: ServerConfig, settings: Settings, events: LoopEventSink
    ) -> _NodeIndex:
        from kvfabric.index.service import IndexService  # zmq and the routers: only when serving an index

        service = IndexService.for_node(settings.index, config.server_secret, model_source=store.model)
        service.feed_local(events)
        try:
            service.subscribe_configured(settings.index.vllm_engines)
        except OSError as exc:
            await service.aclose()
            raise ConfigError(f"index.vllm_engines: {exc}") from exc
        return cls(service, store, config.node_id, events)

    async def _announce(self, *args: Any) -> None:
        try:
            n = await asyncio.to_thread(announce_held, *args, self._stop)
        except Exception:  # the index then lacks what the tiers held at start; serving goes on
            log.exception("announcing the blocks the store held at start to the index failed")
        else:
            log.info("announced %d blocks the store held at start to the index", n)

    async def aclose(self) -> None:
        self._stop.set()
        await self._announcer
        await self.service.aclose()


class Node:
    """One node: it owns the store, the data-plane server over it and, with an admin port, the index and the admin
    app. :meth:`open` checks the settings and opens the store (no event loop yet); :meth:`start` starts the server,
    the index and the admin app in that order on the running loop; :meth:`stop` stops what started, last first;
    :meth:`close` closes the store (flush, unlink the arena)."""

    def __init__(
        self,
        settings: Settings,
        store: TieredStore,
        config: ServerConfig,
        admin_port: int | None,
        events: LoopEventSink | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.config = config
        self.admin_port = admin_port
        self._events = events
        self._stops: list[Callable[[], Awaitable[None]]] = []
        self.server: FabricServer | None = None

    @classmethod
    def open(cls, args: argparse.Namespace, settings: Settings) -> Node:
        """Check ``settings`` (the effective ones, flags in them) and open the store; :class:`ConfigError` (or the
        store's own error) names what is wrong, and nothing is left open."""
        admin_port = _admin_port(args, settings)
        if admin_port is not None:
            _check_admin_auth(args, settings)
        else:
            _say("the admin API, /metrics and the dashboard are off: start with --admin-port PORT to serve them")
        keying = _keying_secret(args, settings)
        store_config = settings.store_config()
        _warn_at_start(settings, store_config, keying)
        probe_object_store(settings, wait_s=settings.object.startup_wait_s, say=_say)
        # The index comes with the admin app (its HTTP face); the tiers' events wait in this sink for its loop.
        events = LoopEventSink() if admin_port is not None else None
        if store_config.data_dir is not None:
            _verify_keying(DataDir(Path(store_config.data_dir)), keying)
        store = TieredStore.open(store_config, events=events)
        try:
            if "object" in store.tiers:
                _verify_keying(store.tier("object"), keying)
            config = _server_config(args, settings, keying)
            store.start()  # background flusher: write-back queues, RAM watermark, TTL sweeps
        except BaseException:
            store.close()
            raise
        return cls(settings, store, config, admin_port, events)

    async def start(self) -> None:
        """Listen: the data plane, then the index and the admin app; prints the ready lines. On a failure what
        started stays for :meth:`stop`."""
        metrics = self._metrics()
        self.server = FabricServer(self.store, self.config, observer=metrics)
        with _listening(self.config.host, self.config.port, "the data plane", "--port"):
            await self.server.start()
        self._stops.append(self.server.close)
        if self.admin_port is not None:
            assert self._events is not None and metrics is not None
            await self._start_admin(metrics, self._events, self.admin_port)
        print(READY_LINE.format(host=self.config.host, port=self.server.port), flush=True)

    def _metrics(self) -> Metrics | None:
        if self.admin_port is None:
            return None
        from kvfabric.api.metrics import Metrics  # FastAPI and prometheus: only with the admin app

        return Metrics()  # the data plane records latencies into it; the admin app serves it on /metrics

    async def _start_admin(self, metrics: Metrics, events: LoopEventSink, port: int) -> None:
        from kvfabric.api.app import create_app
        from kvfabric.api.routes_index import index_router
        from kvfabric.api.server import AdminServer

        index = await _NodeIndex.start(self.store, self.config, self.settings, events)
        self._stops.append(index.aclose)
        host = self.settings.server.admin_host or self.config.host
        app = create_app(self.store, self.settings, metrics=metrics, extra_routers=[index_router(index.service)])
        admin = AdminServer(app, host, port)
        with _listening(host, port, "the admin API", "--admin-port"):
            await admin.start()
        self._stops.append(admin.close)
        print(ADMIN_READY_LINE.format(host=host, port=admin.port), flush=True)

    async def stop(self) -> None:
        """Stop what :meth:`start` started, last first. Each step runs whatever the one before it raised: the
        store's close (flush, arena) must still follow."""
        log.info("shutting down")
        while self._stops:
            step = self._stops.pop()
            try:
                await step()
            except Exception:
                log.exception("shutting down: %s failed", getattr(step, "__qualname__", step))

    def close(self) -> None:
        self.store.close()

    async def serve(self) -> None:
        """Start, serve until SIGINT or SIGTERM, stop."""
        # Handlers first: a SIGTERM right after the ready line must still close the store (flush, unlink the arena).
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await self.start()
            await stopping.wait()
        finally:
            await self.stop()


@contextlib.contextmanager
def _listening(host: str, port: int, what: str, flag: str) -> Iterator[None]:
    """Binding errors as one line naming the address and the flag that moves it."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot listen on {host}:{port} for {what}: the address is in use (another kvfabric "
                              f"serve?); choose another port with {flag}") from exc  # fmt: skip
        raise ConfigError(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}") from exc


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = None
    try:
        node = Node.open(args, _effective(args, load_settings(args.config)))
        _run_loop(node.serve())
    except (KVFabricError, OSError) as exc:  # start-up failures (and config ones): one line, exit 2
        if getattr(args, "debug", False):
            traceback.print_exc()
        _say(_one_line(exc))
        return 2
    finally:
        if node is not None:
            node.close()
    return 0


def _warn_at_start(settings: Settings, store_config: StoreConfig, keying: KeyingSecret) -> None:
    warnings = placeholder_warnings(settings, keying.is_placeholder)
    warnings += capacity_warnings(store_config.ram_bytes, store_config.data_dir, store_config.disk_capacity)
    for warning in warnings:
        log.warning("%s", warning)


def _say(message: str) -> None:
    print(f"kvfabric serve: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) if isinstance(exc, KVFabricError) else f"{type(exc).__name__}: {exc}"
    return text or type(exc).__name__


def _run_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop not installed; using the default asyncio event loop")
        asyncio.run(coro)
        return
    uvloop.run(coro)
