"""The ``kvfabric`` command line. Each subcommand lives in the module that owns its job; this file only dispatches."""

from __future__ import annotations

import argparse
import sys

from kvfabric import admin_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfabric", description="Persistent KV-cache data fabric for LLM inference")
    subparsers = parser.add_subparsers(dest="command", required=True)
    admin_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)
