"""Real containers for tests: podman set up as ``.ci/containers.sh`` leaves it (chroot builds, runc, host network).

Registries cannot be reached here, so images build on the local Debian base that
``../shared/tools/container-env.sh`` makes; everything else is the shipped ``deploy/Dockerfile`` as a user builds it.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONF = Path("/etc/containers/containers.conf.local")
BASE = os.environ.get("KVFABRIC_TEST_BASE_IMAGE", "localhost/debian:bookworm")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/kvfabric:{VERSION}"
"""What ``deploy/Dockerfile``'s comment builds (``kvfabric:<version>``), under podman's default ``localhost/``."""


def env() -> dict[str, str]:
    """This process's environment with the sandbox-friendly containers.conf, unless one is chosen already."""
    out = dict(os.environ)
    if "CONTAINERS_CONF" not in out and LOCAL_CONF.is_file():
        out["CONTAINERS_CONF"] = str(LOCAL_CONF)
    return out


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def require_podman() -> None:
    """Skip (with the fix) where podman or the local base image is missing; CI runs .ci/containers.sh first."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (bash .ci/containers.sh installs it and the local base image)")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.skip(f"base image {BASE} is missing (bash .ci/containers.sh builds it)")


def host_ca() -> str:
    """The CA bundle this machine trusts, mounted into builds so pip inside them trusts the same chain."""
    ca = ssl.get_default_verify_paths().cafile
    return ca if ca and Path(ca).is_file() else "/etc/ssl/certs/ca-certificates.crt"


def build(dockerfile: Path, tag: str, context: Path = ROOT, timeout: float = 900) -> None:
    """``podman build`` as .ci/containers.sh and the Dockerfile comments say; layers are cached between runs."""
    podman(
        "build", "--format", "docker", "--isolation", "chroot", "--network", "host",
        "-v", f"{host_ca()}:/host-ca.crt:ro", "--build-arg", f"BASE={BASE}", "--build-arg", "PIP_CERT=/host-ca.crt",
        "-f", str(dockerfile), "-t", tag, str(context), timeout=timeout,
    )  # fmt: skip


def build_kvfabric() -> str:
    build(ROOT / "deploy" / "Dockerfile", IMAGE)
    return IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, alive: object = None) -> None:
    """Until ``url`` answers 200; ``alive()`` returning False (the container exited) fails at once."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise AssertionError(f"gave up waiting for {url}: the container exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout_s} s: {last}")


def running(name: str) -> bool:
    proc = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "true"
