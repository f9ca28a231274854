"""Disaggregated serving: a prefill worker and a decode worker, separate processes sharing KV only through
``kvfabric serve``.

    PYTHONPATH=. python examples/disaggregated.py [--engine hf|vllm] [--model DIR] [--tokens 2048]

Starts the server (port 0, a temporary data directory), runs the prefill worker on a prompt (it publishes the KV),
then the decode worker on the same prompt (it fetches the KV, computes only the last block and decodes), then a
decode worker without the fabric as the reference, and prints the three results side by side. Without ``--model``
it saves a random-weight tiny Llama first (nothing to download).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.engines.fabric import child_env, serve
from tests.engines.models import TINY, random_prompt, save_random_llama


def hf_worker(role: str, fabric, model: Path, prompts: Path, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable, str(REPO / "examples" / "hf_worker.py"), role, "--url", fabric.url, "--token", fabric.token,
        "--model", str(model), "--model-name", "example-llama", "--prompts", str(prompts), "--out", str(out), *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=child_env())
    return json.loads(out.read_text())["results"][0]


def vllm_worker(fabric, model: Path, prompts: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "examples" / "vllm_worker.py"), str(model), str(prompts), *extra]
    if fabric is not None:
        cmd += ["--url", fabric.url, "--token", fabric.token, "--model-name", "example-llama"]
    out = subprocess.run(cmd, check=True, env=child_env(), capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["results"][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvfabric-disagg-") as tmp:
        root = Path(tmp)
        model = args.model or save_random_llama(root / "model", TINY)
        prompts = root / "prompts.json"
        prompts.write_text(json.dumps([random_prompt(args.tokens, seed=42)]))
        with serve(root / "fabric") as fabric:
            print(f"kvfabric serve at {fabric.url}")
            if args.engine == "hf":
                pre = hf_worker("prefill", fabric, model, prompts, root / "prefill.json")
                dec = hf_worker("decode", fabric, model, prompts, root / "decode.json")
                ref = hf_worker("decode", fabric, model, prompts, root / "ref.json", "--no-fabric")
                print(f"prefill worker published {pre['published_blocks']} blocks in {pre['seconds']:.2f} s")
                matched = dec["matched_tokens"]
            else:
                vllm_worker(fabric, model, prompts, "--kv-role", "kv_producer", "--max-tokens", "1")
                dec = vllm_worker(fabric, model, prompts, "--kv-role", "kv_consumer", "--no-prefix-cache")
                ref = vllm_worker(None, model, prompts)
                matched = dec["num_cached_tokens"]
        print(f"decode worker: {matched} of {args.tokens} prompt tokens from the fabric; tokens {dec['tokens']}")
        print(f"reference (no fabric):                           tokens {ref['tokens']}")
        same = dec["tokens"] == ref["tokens"]
        print("identical" if same else "DIFFERENT")
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
