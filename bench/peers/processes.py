"""Starting and stopping peer servers, and running a peer's client half in the bench virtualenv.

Servers are plain child processes bound to 127.0.0.1 on free ports, their output sent to a log file so a failure can
quote it. Everything started here is stopped by the caller's ``ExitStack`` even when a measurement fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from bench.peers.result import PeerUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_VENV = REPO_ROOT / ".bench-venv"
INSTALL_HINT = "run `bash bench/peers/install.sh` first"
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it; the peer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_executable(peer: str, name: str) -> Path:
    """A program installed in the bench virtualenv, or a clear error naming the install step."""
    path = BENCH_VENV / "bin" / name
    if not path.exists():
        raise PeerUnavailableError(peer, f"{path} is missing: {INSTALL_HINT}")
    return path


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra or {})
    return env


def log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text[-LOG_TAIL_CHARS:] or "(empty log)"


class ServerProcess:
    """One peer server process: started on construction, ready once its port accepts connections, stopped by stop()."""

    def __init__(self, peer: str, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.peer = peer
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env if env is not None else dict(os.environ), cwd=log_dir, start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise PeerUnavailableError(peer, f"cannot start {name} ({argv[0]}): {exc}") from exc

    def wait_for_port(self, port: int, timeout_s: float) -> None:
        """Block until 127.0.0.1:port accepts a connection; fail with the server's log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PeerUnavailableError(
                    self.peer, f"{self.name} exited with code {self._proc.returncode} before listening on port "
                    f"{port}; its log ends:\n{log_tail(self.log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.1)
        raise PeerUnavailableError(
            self.peer, f"{self.name} did not listen on port {port} within {timeout_s:.0f} s; its log ends:\n"
            f"{log_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL it if it has not gone within a few seconds."""
        try:
            if self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGTERM)
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                    self._proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        finally:
            self._log.close()


def run_client(peer: str, args: list[str], env: dict[str, str] | None = None, timeout_s: float = 900) -> dict[str, Any]:
    """Run ``bench.peers.peer_client`` for ``peer`` in the bench virtualenv's Python; return the JSON it printed."""
    python = bench_executable(peer, "python")
    argv = [str(python), "-m", "bench.peers.peer_client", peer, *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=client_env(env), cwd=REPO_ROOT, timeout=timeout_s,
            stdin=subprocess.DEVNULL, check=False,  # a failure is reported below, with the client's stderr
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailableError(peer, f"client did not finish within {timeout_s:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise PeerUnavailableError(
            peer, f"client exited with code {done.returncode}; its stderr ends:\n{done.stderr[-LOG_TAIL_CHARS:]}")
    return dict(json.loads(lines[-1]))
