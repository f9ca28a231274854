"""The ``kvfabric`` command line. Each subcommand lives in the module that owns its job and adds itself through
``register(subparsers)``, which sets ``func`` to run it; this file only dispatches."""

from __future__ import annotations

import argparse
import sys

from kvfabric import admin_cli, node

COMMAND_MODULES = (node, admin_cli)
"""Modules defining subcommands; each has ``register(subparsers: argparse._SubParsersAction) -> None``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfabric", description="Persistent KV-cache data fabric for LLM inference")
    parser.add_argument("--version", action="version", version=f"kvfabric {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def _version() -> str:
    """The installed distribution's version (what pip installed), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvfabric")
    except PackageNotFoundError:
        from kvfabric import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)
