"""Checks a node runs before it opens its store: what would fail later, said now in one line, and what is legal but
probably wrong, said as a warning.

Failures are :class:`~kvfabric.errors.ConfigError` (``kvfabric serve`` prints the message and exits 2); warnings
go to the ``kvfabric.serve`` logger."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kvfabric.config import Settings, format_size
from kvfabric.errors import ConfigError, StoreError, TierUnavailableError

log = logging.getLogger("kvfabric.serve")


def placeholder_warnings(settings: Settings, secret_is_placeholder: bool) -> list[str]:
    """Secrets still holding the example configs' ``change-me`` values."""
    from kvfabric.keying import PLACEHOLDER_MARKS

    def placeholder(text: str) -> bool:
        return any(mark in text.lower() for mark in PLACEHOLDER_MARKS)

    out = []
    if secret_is_placeholder:
        out.append("the keying secret is a placeholder from an example config: set server.server_secret to a long "
                   "random string before storing anything you want to keep")  # fmt: skip
    names = [t.tenant for t in settings.server.auth.tokens if placeholder(t.token.get_secret_value())]
    if names:
        out.append(f"bearer tokens of {', '.join(sorted(set(names)))} are placeholders from an example config "
                   "(server.auth.tokens): anyone who read the example can use them")  # fmt: skip
    return out


def capacity_warnings(ram_bytes: int, data_dir: Path | None, disk_bytes: int | None) -> list[str]:
    """A RAM tier larger than the machine's memory, a disk tier larger than the free space under its data dir."""
    out = []
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 0
    if physical and ram_bytes > physical:
        out.append(f"store.ram_bytes ({format_size(ram_bytes)}) is larger than this machine's memory "
                   f"({format_size(physical)} = {physical} bytes): the RAM tier will be swapped or OOM-killed")  # fmt: skip
    if data_dir is not None and disk_bytes is not None:
        probe = Path(data_dir)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        used = _used_bytes(Path(data_dir))
        free = shutil.disk_usage(probe).free
        if disk_bytes > free + used:
            out.append(f"store.disk_bytes ({format_size(disk_bytes)}) is more than the free space under {data_dir} "
                       f"({free} bytes free): puts will fail with tier_full before the tier is full")  # fmt: skip
    return out


def _used_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def probe_object_store(
    settings: Settings,
    *,
    wait_s: float,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Reach the object tier's bucket before the store opens it: credentials, endpoint, bucket.

    An unreachable endpoint is retried for up to ``wait_s`` seconds, each wait announced through ``say`` with a
    countdown; then, like a missing bucket or missing credentials, it is a :class:`ConfigError` naming the fix."""
    config = settings.object_tier_config()
    if config is None:
        return
    from kvfabric.store.object.s3 import ObjectStore

    # One try per probe: the countdown below does the retrying, visibly (botocore's own would be silent).
    store = ObjectStore(dataclasses.replace(config, max_attempts=1))
    deadline = time.monotonic() + wait_s
    attempt = 1
    delay = 1.0
    while True:
        try:
            store.ensure_bucket(config.create_bucket)
            return
        except TierUnavailableError as exc:
            left = deadline - time.monotonic()
            if wait_s <= 0 or (attempt > 1 and left <= 0):
                raise ConfigError(
                    f"{_first_line(exc)}; check object.endpoint_url and that the store is up "
                    f"(retried for {wait_s:g} s: object.startup_wait_s)"
                ) from exc
            pause = max(1.0, min(delay, left))
            say(f"object store {store.endpoint} unreachable; retrying in {pause:.0f} s "
                f"(attempt {attempt}, giving up in {max(left, 0):.0f} s)")  # fmt: skip
            sleep(pause)
            attempt += 1
            delay = min(delay * 2, 8.0)
        except StoreError as exc:
            message = _first_line(exc)
            if "does not exist" in message:
                raise ConfigError(
                    f"{message}: create it, or set object.create_bucket = true (KVFABRIC_OBJECT__CREATE_BUCKET=true) "
                    f"to have kvfabric create it"
                ) from exc
            raise ConfigError(message) from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
