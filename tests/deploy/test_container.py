"""The shipped image, built and run for real: ``deploy/Dockerfile`` under podman, a node in a container on a named
volume, blocks put and got from the host through the client, a SIGTERM, a new container on the same volume that
serves every block byte for byte."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvfabric.client import Client
from tests.blocks import SPEC
from tests.deploy import podman as pm

pytestmark = pytest.mark.slow

N_BLOCKS = 24


@pytest.fixture(scope="module")
def image() -> str:
    pm.require_podman()
    return pm.build_kvfabric()


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"kvfabric-test-{uuid.uuid4().hex[:8]}"
    pm.podman("volume", "create", name)
    try:
        yield name
    finally:
        pm.podman("volume", "rm", "-f", name, check=False)


class Node:
    """One container of the image on ``volume``, serving on free host ports (host networking)."""

    def __init__(self, image: str, volume: str) -> None:
        self.name = f"kvfabric-test-{uuid.uuid4().hex[:8]}"
        self.port, self.admin_port = pm.free_port(), pm.free_port()
        pm.podman(
            "run", "-d", "--runtime", "runc", "--network", "host", "--name", self.name, "--shm-size", "128m",
            "-v", f"{volume}:/var/lib/kvfabric",
            "-e", f"KVFABRIC_SERVER__PORT={self.port}", "-e", f"KVFABRIC_SERVER__ADMIN_PORT={self.admin_port}",
            image,
        )  # fmt: skip
        try:
            pm.wait_http(f"http://127.0.0.1:{self.admin_port}/healthz", 90, alive=lambda: pm.running(self.name))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    @property
    def url(self) -> str:
        return f"kvfabric://127.0.0.1:{self.port}"

    def logs(self) -> str:
        proc = pm.podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def stop(self) -> int:
        """SIGTERM (podman stop; SIGKILL only after 60 s) and the exit code."""
        pm.podman("stop", "-t", "60", self.name, timeout=90)
        return int(pm.podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def remove(self) -> None:
        pm.podman("rm", "-f", self.name, check=False)


def test_the_image_keeps_every_block_across_a_sigterm_and_a_new_container(image: str, volume: str) -> None:
    tokens = np.arange(N_BLOCKS * SPEC.block_size)
    kv = np.random.default_rng(11).integers(0, 256, (N_BLOCKS, SPEC.block_nbytes), dtype=np.uint8)
    node = Node(image, volume)
    try:
        # The image's own HEALTHCHECK passes, and the node runs as the image's unprivileged user.
        assert pm.podman("healthcheck", "run", node.name, check=False).returncode == 0, node.logs()
        wrong_port = pm.podman("exec", "-e", "KVFABRIC_SERVER__ADMIN_PORT=1", node.name, "python3",
                               "/opt/kvfabric/healthcheck.py", check=False)  # fmt: skip
        assert wrong_port.returncode == 1 and "port 1" in wrong_port.stderr
        assert pm.podman("exec", node.name, "id", "-un").stdout.strip() == "kvfabric"
        # The wheel inside carries the dashboard: its page and assets are served.
        for path, marker in (("/", b"/dashboard/dashboard.js"), ("/dashboard/dashboard.js", b"function"),
                             ("/dashboard/dashboard.css", b"{")):  # fmt: skip
            with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}{path}", timeout=10) as r:
                assert r.status == 200 and marker in r.read(), path
        with Client(node.url) as c:
            assert c.put(SPEC, tokens, kv) == N_BLOCKS
            got = c.get(SPEC, tokens)
            assert got is not None and got.shape[0] == N_BLOCKS
            assert torch.equal(got.reshape(N_BLOCKS, -1).view(torch.uint8), torch.from_numpy(kv))
        assert node.stop() == 0, node.logs()
        assert "shutting down" in node.logs()
    finally:
        node.remove()

    node = Node(image, volume)
    try:
        with Client(node.url) as c:
            assert c.lookup(SPEC, tokens).blocks == N_BLOCKS
            got_blocks = c.get_blocks(SPEC, c.block_hashes(SPEC, tokens))
            assert all(g is not None for g in got_blocks)
            assert [bytes(memoryview(g).cast("B")) for g in got_blocks] == [row.tobytes() for row in kv]
        assert node.stop() == 0, node.logs()
    finally:
        node.remove()
