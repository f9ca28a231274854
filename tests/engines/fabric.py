"""A real ``kvfabric serve`` in a child process, on an ephemeral port, for engine tests, examples and benchmarks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"listening on ([^\s:]+):(\d+)")
START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Fabric:
    """A running server: connect with ``Client(fabric.url, token=fabric.token)``."""

    url: str
    token: str
    tenant: str
    data_dir: Path
    process: subprocess.Popen[str]


def child_env() -> dict[str, str]:
    """Environment for child processes: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


@contextmanager
def serve(
    data_dir: Path,
    *,
    ram_bytes: int = 1 << 30,
    token: str = "engine-token",
    tenant: str = "engines",
    extra_args: tuple[str, ...] = (),
) -> Iterator[Fabric]:
    """Run ``python -m kvfabric serve`` on port 0 until the block exits; fails if it does not come up."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "kvfabric", "serve", "--data-dir", str(data_dir), "--port", "0",
        "--ram-bytes", str(ram_bytes), "--token", f"{token}={tenant}", "--no-nixl", "--log-level", "WARNING",
        *extra_args,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    assert proc.stdout is not None
    port: list[int] = []
    lines: list[str] = []

    def read_ready() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if m := READY.search(line):
                port.append(int(m.group(2)))
                break

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if not port:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"kvfabric serve did not come up: {''.join(lines)[-2000:]}")
    # Keep draining the server's output so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        yield Fabric(f"kvfabric://127.0.0.1:{port[0]}", token, tenant, data_dir, proc)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    """Terminate the server and wait for it (SIGTERM: it flushes its tiers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def corrupt_on_disk(data_dir: Path, payload: bytes) -> Path:
    """Flip one byte inside ``payload`` where the server's disk tier stored it; returns the file changed.

    The disk tier writes raw payloads (its default codec), so a window of the payload's bytes locates the record
    without knowing the segment format. The server must be stopped first.
    """
    window = payload[len(payload) // 2 : len(payload) // 2 + 64]
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        at = data.find(window)
        if at >= 0:
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(bytes([data[at] ^ 0xFF]))
            return path
    raise FileNotFoundError(f"no file under {data_dir} holds the block's payload")
