"""Disaggregated serving: a prefill worker and a decode worker, separate processes sharing KV only through
``kvfabric serve``.

    PYTHONPATH=. python examples/disaggregated.py [--engine hf|vllm] [--model DIR] [--tokens 2048]

Starts the server (port 0, a temporary data directory), runs the prefill worker on a prompt (it publishes the KV),
then the decode worker on the same prompt (it fetches the KV, computes only the last block and decodes), then a
decode worker without the fabric as the reference, and prints the three results side by side. Without ``--model``
it saves a random-weight tiny Llama first (nothing to download). It needs only kvfabric and the engine (transformers,
or vLLM); nothing from the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
TOKEN, TENANT = "example-token", "examples"
READY = re.compile(r"listening on ([^\s:]+):(\d+)")
START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Fabric:
    url: str
    token: str


def child_env() -> dict[str, str]:
    """Workers import kvfabric from the same place this script does (an install, or the checkout on PYTHONPATH)."""
    import kvfabric

    env = dict(os.environ)
    checkout = Path(kvfabric.__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").exists():  # a source tree, perhaps on a relative PYTHONPATH: make it absolute
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, [env.get("PYTHONPATH")])])
    return env


@contextmanager
def serve(data_dir: Path) -> Iterator[Fabric]:
    """``kvfabric serve`` on a free port with one token, until the block exits."""
    cmd = [
        sys.executable, "-m", "kvfabric", "serve", "--data-dir", str(data_dir), "--port", "0",
        "--token", f"{TOKEN}={TENANT}", "--no-nixl", "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        port = _ready_port(proc)
        yield Fabric(f"kvfabric://127.0.0.1:{port}", TOKEN)
    finally:
        proc.terminate()  # SIGTERM: the server flushes its tiers and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready_port(proc: subprocess.Popen[str]) -> int:
    """The port from the server's ready line; the rest of its output is drained in the background, so the server
    never blocks on a full pipe."""
    lines: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not ready.is_set():
                lines.append(line)
                if m := READY.search(line):
                    port.append(int(m.group(2)))
                    ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.wait(0.1) and reader.is_alive() and time.monotonic() < deadline:
        pass
    if not port:
        raise RuntimeError("kvfabric serve did not come up:\n" + "".join(lines)[-2000:])
    return port[0]


def save_random_llama(path: Path) -> Path:
    """A float32 random-weight Llama (4 layers, 64-dim heads) saved with ``save_pretrained``: vLLM and transformers
    load the same weights, so their greedy tokens can be compared (vLLM's dummy weights give uniform logits)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=16384, tie_word_embeddings=False,
        initializer_range=0.15,  # peaked logits: greedy decoding is stable across engines' rounding
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


def random_prompt(n: int, *, seed: int, vocab: int = 32000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def hf_worker(role: str, fabric: Fabric, model: Path, prompts: Path, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable, str(EXAMPLES / "hf_worker.py"), role, "--url", fabric.url, "--token", fabric.token,
        "--model", str(model), "--model-name", "example-llama", "--prompts", str(prompts), "--out", str(out), *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=child_env())
    return json.loads(out.read_text())["results"][0]


def vllm_worker(what: str, fabric: Fabric | None, model: Path, prompts: Path, *extra: str) -> dict:
    """One vLLM engine in its own process. Its progress lines (engine start, generation) and kvfabric's connector
    lines are shown as they come; vLLM's own chatter only if the worker fails."""
    print(f"{what}: starting a vLLM engine (a minute or more on CPU)", flush=True)
    cmd = [sys.executable, str(EXAMPLES / "vllm_worker.py"), str(model), str(prompts), "--label", what, *extra]
    if fabric is not None:
        cmd += ["--url", fabric.url, "--token", fabric.token, "--model-name", "example-llama"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    drain = threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True)
    drain.start()
    log: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line)
        if line.startswith(f"{what}: ") or " kvfabric." in line:
            print(f"  {line}" if " kvfabric." in line else line, end="", flush=True)
    drain.join()
    if proc.wait() != 0:
        sys.stderr.write("".join(log[-60:]))
        raise SystemExit(f"{what}: the vLLM worker failed (exit {proc.returncode}); its last lines are above")
    line = next(x for x in out if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["results"][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvfabric-disagg-") as tmp:
        root = Path(tmp)
        if args.model is None:
            print("saving a random-weight tiny Llama (nothing to download)", flush=True)
        model = args.model or save_random_llama(root / "model")
        prompts = root / "prompts.json"
        prompts.write_text(json.dumps([random_prompt(args.tokens, seed=42)]))
        with serve(root / "fabric") as fabric:
            print(f"kvfabric serve at {fabric.url}", flush=True)
            if args.engine == "hf":
                pre = hf_worker("prefill", fabric, model, prompts, root / "prefill.json")
                dec = hf_worker("decode", fabric, model, prompts, root / "decode.json")
                ref = hf_worker("decode", fabric, model, prompts, root / "ref.json", "--no-fabric")
                print(f"prefill worker published {pre['published_blocks']} blocks in {pre['seconds']:.2f} s")
                matched = dec["matched_tokens"]
            else:
                vllm_worker("prefill", fabric, model, prompts, "--kv-role", "kv_producer", "--max-tokens", "1")
                dec = vllm_worker("decode", fabric, model, prompts, "--kv-role", "kv_consumer", "--no-prefix-cache")
                ref = vllm_worker("reference", None, model, prompts)
                matched = dec["num_cached_tokens"]
        print(f"decode worker: {matched} of {args.tokens} prompt tokens from the fabric; tokens {dec['tokens']}")
        print(f"reference (no fabric):                           tokens {ref['tokens']}")
        same = dec["tokens"] == ref["tokens"]
        print("identical" if same else "DIFFERENT")
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
