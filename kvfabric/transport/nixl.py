"""NIXL (UCX backend) one-sided reads: the server registers its RAM arena, clients read leased blocks from it.

Optional: needs the ``nixl`` extra (``nixl-cu12``; it runs on CPU hosts too, over UCX shared memory / TCP). When it
cannot be imported or its UCX backend cannot start, :func:`server_endpoint` / :func:`client_endpoint` return
``None`` and log why; callers then use TCP.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from kvfabric.errors import ClientError
from kvfabric.transport.shm import ArenaMap

log = logging.getLogger(__name__)

_API_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
MAX_CACHED_REGISTRATIONS = 64
XFER_TIMEOUT_S = 30.0
RDMA_DEVICES = "/sys/class/infiniband"


def load_api() -> tuple[ModuleType | None, str]:
    """The NIXL Python API module, or ``None`` and the reason it is unavailable."""
    import importlib

    reasons = []
    for name in _API_MODULES:
        try:
            api = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken native library raising anything at import
            reasons.append(f"{name}: {exc}")
            continue
        _log_through_the_application()
        return api, ""
    return None, "; ".join(reasons)


def _log_through_the_application() -> None:
    """NIXL's Python package logs INFO lines to stdout through its own handler, which corrupts the stdout of the
    program using it (``bench/transport.py --json``, say): hand its records to the application's logging."""
    nixl_log = logging.getLogger("nixl")
    for handler in list(nixl_log.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            nixl_log.removeHandler(handler)
    nixl_log.propagate = True


def _skip_absent_rdma_modules() -> None:
    """On a host without RDMA devices, keep UCX from loading its InfiniBand modules (unless ``UCX_MODULES`` is set):
    they cannot be used there, and the libnl they pull in (bundled in the nixl wheels) crashes in its library
    destructor at process exit (SIGSEGV in ``rtnl_tc_unregister``), turning every clean exit into exit code 139."""
    if "UCX_MODULES" in os.environ:
        return
    try:
        has_rdma = any(Path(RDMA_DEVICES).iterdir())
    except OSError:
        has_rdma = False
    if not has_rdma:
        os.environ["UCX_MODULES"] = "^ib,rdmacm"  # read by UCX when the first agent loads it


def _agent(api: ModuleType, role: str, progress_thread: bool) -> Any:
    """A NIXL agent with the UCX backend. ``progress_thread`` starts UCX's progress thread, which polls without
    pause: the server needs it (over UCX's TCP transport a remote read is served by the target's progress), a
    client does not (it drives progress itself while it waits for its reads)."""
    _skip_absent_rdma_modules()
    name = f"kvfabric-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    agent = api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"]))
    if "UCX" not in agent.backends:
        raise RuntimeError("NIXL has no UCX backend plugin")
    return agent


class NixlServerEndpoint:
    """The server's NIXL agent with the RAM arena registered; clients learn its metadata at NIXL_CONNECT."""

    def __init__(self, agent: Any, arena: ArenaMap) -> None:
        self._agent = agent
        self.name: str = agent.name
        self.base_addr = arena.base_address
        self.length = arena.size
        self._reg = agent.register_memory([(self.base_addr, self.length, 0, "")], "DRAM")
        self.metadata: bytes = agent.get_agent_metadata()

    def close(self) -> None:
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None


def server_endpoint(arena: ArenaMap | None) -> NixlServerEndpoint | None:
    if arena is None:
        log.info("NIXL transport off: the store has no shared RAM arena to register")
        return None
    api, why = load_api()
    if api is None:
        log.info("NIXL transport unavailable (%s); clients will use TCP", why)
        return None
    try:
        return NixlServerEndpoint(_agent(api, "server", progress_thread=True), arena)
    except Exception as exc:  # UCX initialisation failures surface as RuntimeError or nixl's own types
        log.warning("NIXL transport unavailable (%s); clients will use TCP", exc)
        return None


@dataclass(frozen=True, slots=True)
class ReadOp:
    """Copy ``nbytes`` from the remote address into local memory at ``local_addr`` (on ``mem_type``/``device``)."""

    local_addr: int
    remote_addr: int
    nbytes: int
    mem_type: str = "DRAM"
    device: int = 0


class NixlClientEndpoint:
    """A client's NIXL agent: registers destination buffers (cached) and reads from one server's arena."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._remote: str | None = None
        self._regs: OrderedDict[tuple[int, int, str, int], Any] = OrderedDict()

    @property
    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def connect(self, server_metadata: bytes) -> None:
        self._remote = self._agent.add_remote_agent(server_metadata)
        if isinstance(self._remote, bytes):
            self._remote = self._remote.decode()

    def _register(self, op: ReadOp) -> None:
        key = (op.local_addr, op.nbytes, op.mem_type, op.device)
        if key in self._regs:
            self._regs.move_to_end(key)
            return
        self._regs[key] = self._agent.register_memory([(op.local_addr, op.nbytes, op.device, "")], op.mem_type)
        while len(self._regs) > MAX_CACHED_REGISTRATIONS:
            _, reg = self._regs.popitem(last=False)
            self._agent.deregister_memory(reg)

    def read(self, ops: list[ReadOp]) -> None:
        """Run the reads as one transfer and wait for it; raises ClientError when NIXL reports a failure."""
        if not ops:
            return
        if self._remote is None:
            raise ClientError("NIXL endpoint is not connected to a server")
        for op in ops:
            self._register(op)
        mem = ops[0].mem_type
        local = self._agent.get_xfer_descs([(o.local_addr, o.nbytes, o.device) for o in ops], mem)
        remote = self._agent.get_xfer_descs([(o.remote_addr, o.nbytes, 0) for o in ops], "DRAM")
        handle = self._agent.initialize_xfer("READ", local, remote, self._remote)
        try:
            state = self._agent.transfer(handle)
            deadline = time.monotonic() + XFER_TIMEOUT_S
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise ClientError(f"NIXL read of {len(ops)} blocks timed out after {XFER_TIMEOUT_S}s")
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise ClientError(f"NIXL read of {len(ops)} blocks failed (state {state})")
        finally:
            self._agent.release_xfer_handle(handle)

    def close(self) -> None:
        while self._regs:
            _, reg = self._regs.popitem()
            self._agent.deregister_memory(reg)
        if self._remote is not None:
            self._agent.remove_remote_agent(self._remote)
            self._remote = None


def client_endpoint() -> NixlClientEndpoint | None:
    api, why = load_api()
    if api is None:
        log.warning("NIXL requested but unavailable (%s); using TCP", why)
        return None
    try:
        return NixlClientEndpoint(_agent(api, "client", progress_thread=False))
    except Exception as exc:
        log.warning("NIXL requested but its UCX backend failed to start (%s); using TCP", exc)
        return None
