"""Admin subcommands of the ``kvfabric`` CLI. Each one is a call to a node's REST admin API over HTTP (httpx), so
they work against a remote node exactly as against a local one; ``config show`` alone reads the local config.

    kvfabric stats | ls [NS [FP]] | models | pins | block NS FP PREFIX | pin/unpin NS FP PREFIX
    kvfabric rm block|prefix|model|namespace ...
    kvfabric policy NS [--ttl S|none] [--quota SIZE|none] | evict --tier T --bytes SIZE | compact | tiers | errors
    kvfabric health | config show [--config FILE] [--format toml|json] [--remote]

``--url`` (``$KVFABRIC_ADMIN_URL``, default ``http://127.0.0.1:9501``) and ``--token`` (``$KVFABRIC_TOKEN``) say where
and as whom; ``--json`` prints the API's JSON instead of a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from kvfabric.config import dumps_json, dumps_toml, load_settings, toml_of
from kvfabric.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:9501"
DATA_PORT = 9500
"""The data plane's default port: a ``--url`` there reached the binary protocol, not the admin API."""


class AdminAPIError(Exception):
    """The admin API answered with an error status, or could not be reached."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AdminAPI:
    """A small synchronous client of the admin REST API."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        scheme = urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise AdminAPIError(f"--url {url!r} is not an http(s) URL{_url_hint(self.url)}", exit_code=2)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.RemoteProtocolError as exc:  # something answered, but not in HTTP: the data port
            raise AdminAPIError(
                f"{self.url} does not answer in HTTP ({exc}){_url_hint(self.url, binary=True)}",
                exit_code=2,
            ) from exc
        except httpx.HTTPError as exc:
            raise AdminAPIError(
                f"cannot reach the admin API at {self.url}: {exc}{_url_hint(self.url)}", exit_code=2
            ) from exc
        if resp.status_code >= 400:
            hint = _url_hint(self.url) if resp.status_code == 404 else ""
            raise AdminAPIError(f"{method} {path} failed with {resp.status_code}: {_detail(resp)}{hint}")
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text


def _url_hint(url: str, binary: bool = False) -> str:
    """What to fix in a ``--url`` that looks wrong: the API's ``/v1`` path given as the base, or the data plane's
    address (its port, or its ``kvfabric://`` scheme) given for the admin API's. Empty if it looks right."""
    parts = urlsplit(url)
    root = "the admin API's root URL, e.g. --url " + DEFAULT_URL
    if parts.path.rstrip("/").endswith("/v1"):
        return f"; --url is the admin API's root, without /v1: --url {url.rstrip('/').removesuffix('/v1')}"
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "kvfabric" or binary or port == DATA_PORT:
        host = parts.hostname or "127.0.0.1"
        return (
            f"; {url} looks like kvfabric's data plane, which speaks its binary protocol, not HTTP; the admin API "
            f"listens on the node's --admin-port (server.admin_port, default 9501): try --url http://{host}:9501"
        )
    return "" if parts.scheme in ("http", "https") else f"; give {root}"


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        return resp.text.strip() or resp.reason_phrase
    if isinstance(detail, list):  # FastAPI validation errors: name each bad field
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail)


# --- output -------------------------------------------------------------------------------------------------------
def _pct(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.1f}%"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, step in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= step:
            return f"{n / step:.2f} {unit}"
    return f"{n} B"


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_stats(s: dict[str, Any]) -> None:
    print(f"node {s['node_id']}  version {s['version']}  up {s['uptime_s']:.0f}s")
    rows = [
        (t["tier"], t["blocks"], _size(t["bytes"]), _size(t["capacity_bytes"]), _pct(t["occupancy"]),
         _pct(t["hit_rate"]), t["hits"], t["misses"], t["evictions"], t["corrupt"])
        for t in s["tiers"]
    ]  # fmt: skip
    print(_table(rows, ["tier", "blocks", "bytes", "capacity", "used", "hit rate", "hits", "misses", "evicted",
                        "corrupt"]))  # fmt: skip
    tot = s["totals"]
    print(f"\ntotal {tot['blocks']} blocks, {_size(tot['bytes'])}, hit rate {_pct(tot['hit_rate'])}, "
          f"upload backlog {_size(s['upload_backlog_bytes'])}")  # fmt: skip
    if s["namespaces"]:
        print()
        _print_namespaces(s["namespaces"])


def _print_namespaces(namespaces: list[dict[str, Any]]) -> None:
    rows = [
        (n["namespace"], len(n["models"]), n["blocks"], _size(n["bytes"]),
         "-" if n["policy"]["ttl_s"] is None else f"{n['policy']['ttl_s']:g}s", _size(n["policy"]["quota_bytes"]))
        for n in namespaces
    ]  # fmt: skip
    print(_table(rows, ["namespace", "models", "blocks", "bytes", "ttl", "quota"]))


def _quiet_on_broken_pipe(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``kvfabric stats | head``: when the reader goes away, stop quietly, as other command-line tools do, with
    the status a SIGPIPE would give (128 + 13), instead of a BrokenPipeError traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            code = command(args)
            sys.stdout.flush()  # output to a pipe is buffered: a write the reader refuses happens here
        except BrokenPipeError:
            # Python flushes stdout again at exit and would report that failure too: point it at /dev/null.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        return code

    return run


# --- commands -----------------------------------------------------------------------------------------------------
Handler = Callable[[AdminAPI, argparse.Namespace], Any]


def _stats(api: AdminAPI, args: argparse.Namespace) -> Any:
    s = api.call("GET", "/v1/stats")
    return s if args.json else _print_stats(s)


def _ls(api: AdminAPI, args: argparse.Namespace) -> Any:
    if args.fingerprint is not None:
        return _ls_blocks(api, args)
    if args.namespace is None:
        out = api.call("GET", "/v1/namespaces")
        return out if args.json else _print_namespaces(out)
    ns = api.call("GET", f"/v1/namespaces/{args.namespace}")
    if args.json:
        return ns
    rows = [(m["model"] or "?", m["fingerprint"], m["blocks"], _size(m["bytes"])) for m in ns["models"]]
    print(_table(rows, ["model", "fingerprint", "blocks", "bytes"]))
    return None


def _ls_blocks(api: AdminAPI, args: argparse.Namespace) -> Any:
    path = f"/v1/namespaces/{args.namespace}/models/{args.fingerprint}/blocks?limit={args.limit}"
    page = api.call("GET", path + (f"&after={args.after}" if args.after else ""))
    if args.json:
        return page
    rows = [
        (
            b["prefix"],
            b["parent"][:16] + "…",
            b["token_count"],
            _size(b["nbytes"]),
            b["tier"],
            "yes" if b["pinned"] else "",
        )
        for b in page["blocks"]
    ]
    print(_table(rows, ["prefix", "parent", "tokens", "bytes", "tier", "pinned"]))
    if page["next"]:
        print(f"\nmore: --after {page['next']}")
    return None


def _pins(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("GET", "/v1/pins")
    if args.json:
        return out
    rows = [(p["namespace"], p["fingerprint"], p["prefix"], "yes" if p["stored"] else "not yet") for p in out]
    print(_table(rows, ["namespace", "fingerprint", "prefix", "stored"]))
    return None


def _models(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("GET", "/v1/models")
    if args.json:
        return out
    rows = [(m["spec"].get("model"), m["fingerprint"], m["blocks"], _size(m["bytes"])) for m in out]
    print(_table(rows, ["model", "fingerprint", "blocks", "bytes"]))
    return None


def _block_path(args: argparse.Namespace) -> str:
    return f"/v1/namespaces/{args.namespace}/models/{args.fingerprint}/blocks/{args.prefix}"


def _block(api: AdminAPI, args: argparse.Namespace) -> Any:
    b = api.call("GET", _block_path(args))
    if args.json:
        return b
    for k, v in b.items():
        print(f"{k:12} {v}")
    return None


def _pin(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("PUT" if args.command == "pin" else "DELETE", _block_path(args) + "/pin")
    return out if args.json else print("pinned" if out["pinned"] else "unpinned")


def _rm(api: AdminAPI, args: argparse.Namespace) -> Any:
    if args.what == "block":
        path = _block_path(args)
    elif args.what == "prefix":
        path = f"/v1/namespaces/{args.namespace}/models/{args.fingerprint}/prefixes/{args.prefix}"
    elif args.what == "model":
        path = f"/v1/namespaces/{args.namespace}/models/{args.fingerprint}"
    else:
        if not args.yes:
            raise AdminAPIError(f"deleting namespace {args.namespace!r} removes all its blocks; pass --yes")
        path = f"/v1/namespaces/{args.namespace}"
    out = api.call("DELETE", path)
    return out if args.json else print(f"deleted {out['deleted']} block(s)")


def _optional(value: str, parse: Callable[[str], Any]) -> Any:
    return None if value.lower() in ("none", "null", "off") else parse(value)


def _policy(api: AdminAPI, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if args.ttl is not None:
        body["ttl_s"] = _optional(args.ttl, float)
    if args.quota is not None:
        body["quota_bytes"] = _optional(args.quota, str)
    out = api.call("PUT", f"/v1/namespaces/{args.namespace}/policy", body)
    if args.json:
        return out
    ttl = "none" if out["ttl_s"] is None else f"{out['ttl_s']:g}s"
    print(f"{args.namespace}: ttl {ttl}, quota {_size(out['quota_bytes'])}")
    return None


def _evict(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("POST", "/v1/evict", {"tier": args.tier, "bytes": args.bytes})
    return out if args.json else print(f"evicted {_size(out['evicted_bytes'])} from {out['tier']}")


def _compact(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("POST", "/v1/compact")
    return out if args.json else print(json.dumps(out["result"], indent=2))


def _tiers(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("GET", "/v1/tiers")
    if args.json:
        return out
    rows = [
        (t["tier"], _size(t["capacity_bytes"]), "yes" if t["persistent"] else "no", "yes" if t["shared"] else "no",
         t["codec"], t["write_policy"], _recovered(t.get("recovery")))
        for t in out["tiers"]
    ]  # fmt: skip
    print(_table(rows, ["tier", "capacity", "persistent", "shared", "codec", "write policy", "recovery at open"]))
    return None


def _recovered(r: dict[str, int] | None) -> str:
    if r is None:
        return "-"
    return f"{r['reindexed']} re-indexed, {r['dropped']} dropped, {_size(r['truncated_bytes'])} cut"


def _errors(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("GET", "/v1/errors")
    if args.json:
        return out
    for e in out:
        print(
            f"{datetime.datetime.fromtimestamp(e['time']).isoformat(timespec='seconds')}  {e['kind']}  {e['message']}"
        )
    if not out:
        print("no recent errors")
    return None


def _health(api: AdminAPI, args: argparse.Namespace) -> Any:
    health = api.call("GET", "/healthz")
    try:
        ready = api.call("GET", "/readyz")
    except AdminAPIError as exc:
        raise AdminAPIError(f"alive but not ready: {exc}") from exc
    return {"health": health, "ready": ready} if args.json else print(f"ok, ready: {ready['detail']}")


@_quiet_on_broken_pipe
def _config_show(args: argparse.Namespace) -> int:
    if args.remote:
        return _run_http(_config_remote, args)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(dumps_json(settings) + "\n" if args.format == "json" else dumps_toml(settings))
    return 0


def _config_remote(api: AdminAPI, args: argparse.Namespace) -> Any:
    out = api.call("GET", "/v1/config")["config"]
    if args.format == "json":
        return out
    sys.stdout.write(toml_of(out))
    return None


@_quiet_on_broken_pipe
def _run(args: argparse.Namespace) -> int:
    return _run_http(args.handler, args)


def _run_http(handler: Handler, args: argparse.Namespace) -> int:
    try:
        with AdminAPI(args.url, args.token) as api:
            out = handler(api, args)
    except AdminAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


# --- registration -------------------------------------------------------------------------------------------------
def _http_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=os.environ.get("KVFABRIC_ADMIN_URL", DEFAULT_URL),
                   help="admin API base URL (env KVFABRIC_ADMIN_URL; default %(default)s)")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("KVFABRIC_TOKEN"), help="bearer token (env KVFABRIC_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    return p


def _block_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("namespace")
    p.add_argument("fingerprint", help="model fingerprint (64 hex digits)")
    p.add_argument("prefix", help="prefix hash of the block (64 hex digits)")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the admin subcommands to the ``kvfabric`` CLI's subparsers."""
    http = _http_parent()

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, parents=[http], help=help_, description=help_)
        p.set_defaults(func=_run, handler=handler)
        return p

    add("stats", _stats, "per-tier, per-namespace statistics of a node")
    ls = add("ls", _ls, "list namespaces, the models in a namespace, or a model's blocks in a namespace")
    ls.add_argument("namespace", nargs="?")
    ls.add_argument("fingerprint", nargs="?", help="model fingerprint: list its blocks")
    ls.add_argument("--limit", type=int, default=100, help="blocks per page (default %(default)s)")
    ls.add_argument("--after", help="continue after this prefix hash (from the previous page)")
    add("pins", _pins, "list pinned blocks")
    add("models", _models, "list registered models with their block counts")
    _block_args(add("block", _block, "show one block's metadata and tier"))
    _block_args(add("pin", _pin, "pin a block (never evicted)"))
    _block_args(add("unpin", _pin, "unpin a block"))

    rm = subparsers.add_parser("rm", help="delete a block, a prefix, a model's blocks, or a namespace")
    rm_sub = rm.add_subparsers(dest="what", required=True)
    for what, help_ in (("block", "delete one block"),
                        ("prefix", "delete a block and every block whose chain extends it"),
                        ("model", "delete a model's blocks in a namespace"),
                        ("namespace", "delete every block of a namespace")):  # fmt: skip
        p = rm_sub.add_parser(what, parents=[http], help=help_)
        p.add_argument("namespace")
        if what != "namespace":
            p.add_argument("fingerprint", help="model fingerprint (64 hex digits)")
        if what in ("block", "prefix"):
            p.add_argument("prefix", help="prefix hash of the block (64 hex digits)")
        if what == "namespace":
            p.add_argument("--yes", action="store_true", help="confirm")
        p.set_defaults(func=_run, handler=_rm)

    pol = add("policy", _policy, "change a namespace's TTL and quota (admin)")
    pol.add_argument("namespace")
    pol.add_argument("--ttl", help="seconds, or 'none' to remove")
    pol.add_argument("--quota", help="size such as 10GiB, or 'none' to remove")
    ev = add("evict", _evict, "evict bytes from a tier (admin)")
    ev.add_argument("--tier", required=True)
    ev.add_argument("--bytes", required=True, help="size such as 1GiB")
    add("compact", _compact, "compact the disk tier now (admin)")
    add("tiers", _tiers, "show the tier configuration")
    add("errors", _errors, "show recent errors")
    add("health", _health, "check liveness and readiness")

    cfg = subparsers.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser("show", parents=[_http_parent()], conflict_handler="resolve",
                              help="print the effective configuration (secrets masked)")  # fmt: skip
    show.add_argument("--config", help="config file (default: $KVFABRIC_CONFIG, then built-in defaults)")
    show.add_argument("--format", choices=("toml", "json"), default="toml")
    show.add_argument("--remote", action="store_true", help="ask the node at --url instead of reading locally")
    show.set_defaults(func=_config_show)
