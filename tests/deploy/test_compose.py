"""``deploy/compose`` brought up for real with podman-compose on images built here from the stack's own Dockerfiles
(kvfabric, SeaweedFS from its PyPI wheel, Prometheus from Debian's package): every healthcheck passes, blocks go
through the node and its write-back S3 tier reaches SeaweedFS, Prometheus scrapes /metrics with its bearer token,
and ``down -v`` leaves nothing behind. Grafana is left out: its image comes only from a registry, which this
machine cannot reach."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import botocore.config
import numpy as np
import pytest
import yaml

from kvfabric.client import Client
from tests.blocks import SPEC
from tests.deploy import podman as pm

pytestmark = pytest.mark.slow

COMPOSE_DIR = pm.ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
SERVICES = ("seaweedfs", "kvfabric", "prometheus")
"""Every service but grafana (registry-only image)."""
DOCKERFILES = {"kvfabric": pm.ROOT / "deploy" / "Dockerfile", "seaweedfs": COMPOSE_DIR / "seaweedfs" / "Dockerfile",
               "prometheus": COMPOSE_DIR / "prometheus" / "Dockerfile"}  # fmt: skip


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    ports: dict[str, int]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = ["podman-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, service: str) -> str:
        names = pm.podman(
            "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        assert len(names) == 1, f"{service}: containers {names}"
        return names[0]

    def wait_healthy(self, service: str, timeout_s: float = 120) -> None:
        """Run the service's compose healthcheck until it passes (podman without systemd does not run it alone)."""
        name = self.container(service)
        deadline = time.monotonic() + timeout_s
        while pm.podman("healthcheck", "run", name, check=False).returncode != 0:
            if time.monotonic() > deadline:
                logs = pm.podman("logs", "--tail", "40", name, check=False)
                raise AssertionError(f"{service} not healthy in {timeout_s} s:\n{logs.stdout}\n{logs.stderr}")
            time.sleep(1)


def compose_images() -> dict[str, str]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {name: services[name]["image"] for name in SERVICES}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    pm.require_podman()
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (bash .ci/containers.sh installs it)")
    for service, image in compose_images().items():
        pm.build(DOCKERFILES[service], f"localhost/{image}")
    names = ("S3_PORT", "KVFABRIC_DATA_PORT", "KVFABRIC_ADMIN_PORT", "PROMETHEUS_PORT")
    ports = {name: pm.free_port() for name in names}
    env = pm.env() | {k: str(v) for k, v in ports.items()}
    env["KVFABRIC_SERVER__SERVER_SECRET"] = uuid.uuid4().hex * 2
    s = Stack(f"kvfabric-test-{uuid.uuid4().hex[:8]}", env, ports)
    try:
        s.compose("up", "-d", "--no-build", *SERVICES)
        for service in SERVICES:
            s.wait_healthy(service)
        yield s
    finally:
        s.compose("down", "-v", "-t", "30")
        label = f"label=io.podman.compose.project={s.project}"
        left = pm.podman("ps", "-a", "-q", "--filter", label).stdout
        left += pm.podman("volume", "ls", "-q", "--filter", label).stdout
        assert not left.strip(), f"containers or volumes left after down -v: {left}"


def node_config() -> dict:
    return tomllib.loads((COMPOSE_DIR / "kvfabric.toml").read_text())


def test_the_stack_serves_blocks_uploads_them_to_seaweedfs_and_is_scraped(stack: Stack) -> None:
    cfg = node_config()
    (engine,) = [t for t in cfg["server"]["auth"]["tokens"] if "write" in t["scopes"]]
    tokens = np.arange(8 * SPEC.block_size)
    kv = np.random.default_rng(5).integers(0, 256, (8, SPEC.block_nbytes), dtype=np.uint8)
    with Client(f"kvfabric://127.0.0.1:{stack.ports['KVFABRIC_DATA_PORT']}", token=engine["token"]) as c:
        assert c.put(SPEC, tokens, kv) == 8
        got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
    assert [bytes(memoryview(g).cast("B")) if g is not None else None for g in got] == [r.tobytes() for r in kv]

    # The write-back S3 tier seals its segment within seal_after_s and uploads it to the bucket the node created.
    s3 = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{stack.ports['S3_PORT']}", region_name="us-east-1",
        aws_access_key_id=stack.env.get("AWS_ACCESS_KEY_ID", "kvfabric"), aws_secret_access_key="kvfabric-secret-key",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )  # fmt: skip
    obj = cfg["object"]
    keys: list[str] = []
    deadline = time.monotonic() + 90
    while not keys and time.monotonic() < deadline:
        listed = s3.list_objects_v2(Bucket=obj["bucket"], Prefix=obj["prefix"])
        keys = [o["Key"] for o in listed.get("Contents", [])]
        time.sleep(1)
    assert keys, f"nothing uploaded to s3://{obj['bucket']}/{obj['prefix']} in 90 s"

    # Prometheus scrapes the node's /metrics with the read token of prometheus.yml. A scrape may have found the
    # node still restarting (compose here starts it before SeaweedFS answers): wait for one that succeeds.
    url = f"http://127.0.0.1:{stack.ports['PROMETHEUS_PORT']}/api/v1/targets"
    want = [(f"http://kvfabric:{cfg['server']['admin_port']}/metrics", "up", "")]
    deadline = time.monotonic() + 90
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            targets = json.load(r)["data"]["activeTargets"]
        states = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        if states == want:
            break
        assert time.monotonic() < deadline, f"no successful scrape by Prometheus in 90 s: {states}"
        time.sleep(2)


def test_a_killed_node_is_restarted_by_its_policy_and_keeps_its_blocks(stack: Stack) -> None:
    """restart: unless-stopped brings a crashed node back (no compose command involved) on the same volume. The
    crash is a SIGKILL of the node's process from the host, as the OOM killer would send: ``podman kill`` would count
    as stopped by the user, which the policy rightly leaves alone."""
    cfg = node_config()
    (engine,) = [t for t in cfg["server"]["auth"]["tokens"] if "write" in t["scopes"]]
    tokens = np.arange(1000, 1000 + 4 * SPEC.block_size)
    kv = np.random.default_rng(6).integers(0, 256, (4, SPEC.block_nbytes), dtype=np.uint8)
    url = f"kvfabric://127.0.0.1:{stack.ports['KVFABRIC_DATA_PORT']}"
    with Client(url, token=engine["token"]) as c:
        assert c.put(SPEC, tokens, kv) == 4
    name = stack.container("kvfabric")
    started = pm.podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout
    os.kill(int(pm.podman("inspect", "--format", "{{.State.Pid}}", name).stdout), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while pm.podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout == started or not pm.running(name):
        assert time.monotonic() < deadline, "the killed node was not restarted in 60 s"
        time.sleep(0.5)
    stack.wait_healthy("kvfabric")
    with Client(url, token=engine["token"]) as c:
        got = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
    assert [bytes(memoryview(g).cast("B")) if g is not None else None for g in got] == [r.tobytes() for r in kv]
