"""Running the real FabricServer over a real TieredStore for tests: on an event loop in a background thread, or as
``kvfabric serve`` in a separate process."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvloop

from kvfabric.store.config import StoreConfig
from kvfabric.store.memory import MemoryTier
from kvfabric.store.tiered import TieredStore
from kvfabric.transport.server import FabricServer, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"kvfabric-test-secret-0123456789"
RAM_BYTES = 16 << 20


def open_store(data_dir: Path | None = None, ram_bytes: int = RAM_BYTES) -> TieredStore:
    """The product's store as ``kvfabric serve`` opens it: RAM only (a /dev/shm arena), or RAM + disk."""
    return TieredStore.open(StoreConfig(data_dir=data_dir, ram_bytes=ram_bytes))


def ram_store(ram: MemoryTier) -> TieredStore:
    """A RAM-only TieredStore over ``ram``, so a test can also watch the RAM tier's arena."""
    return TieredStore(StoreConfig(ram_bytes=ram.capacity_bytes), ram)


def held_bytes(ram: MemoryTier) -> int:
    """Arena bytes RAM cannot give back: blocks a lease holds (live or already deleted); these tests pin nothing.
    Evicts every other block first."""
    ram.evict(1 << 62)
    return ram.used_bytes


class ThreadServer:
    """A FabricServer on its own uvloop in a daemon thread; ``url`` to connect, ``call(coro)`` to reach it."""

    def __init__(self, store: Any, **config: Any) -> None:
        config.setdefault("server_secret", SECRET)
        config.setdefault("port", 0)
        self.store = store
        self.loop = uvloop.new_event_loop()
        self.server = FabricServer(store, ServerConfig(**config))
        self.loop.run_until_complete(self.server.start())
        self._thread = threading.Thread(target=self.loop.run_forever, name="fabric-server", daemon=True)
        self._thread.start()
        self.scheme = "kvfabrics" if config.get("ssl") else "kvfabric"

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn: Any) -> Any:
        """Run ``fn()`` on the server's loop (to read its state without racing it)."""

        async def run() -> Any:
            return fn()

        return self.call(run())

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def thread_server(store: Any, **config: Any) -> Iterator[ThreadServer]:
    srv = ThreadServer(store, **config)
    try:
        yield srv
    finally:
        srv.stop()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def process_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``kvfabric serve --port 0 ARGS`` (RAM only unless ARGS name a data dir) in a child process; yields
    (process, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfabric", "serve", "--port", "0", "--log-level", "WARNING", *args], cwd=ROOT,
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # native libraries may log to stdout before the ready line
            seen.append(line)
            if match := re.search(r"listening on [\d.]+:(\d+)", line):
                break
        else:
            raise RuntimeError(f"kvfabric serve exited before listening: {''.join(seen)}")
        yield proc, int(match.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
