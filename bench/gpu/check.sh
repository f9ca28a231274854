#!/usr/bin/env bash
# GPU check: canonical KV blocks from `kvfabric serve` into CUDA tensors in each vLLM GPU layout, bytes verified,
# GiB/s against a pinned host-to-device copy of the same bytes (see check.py).
#
#   bash bench/gpu/check.sh [--dry-run] [--json] [check.py options]
#
# For a GPU host with CUDA PyTorch and no network: the wheels `kvfabric serve` needs beyond torch and numpy travel
# in bench/gpu/wheels/ (fill it on a networked machine with `bash bench/gpu/fetch_wheels.sh`; <= 64 MiB) and are
# installed from there only if missing. Capped at 470 s so the whole run stays under 8 minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
# The packages `kvfabric serve` imports with a disk tier (torch and numpy come with the host's CUDA PyTorch).
needed=(xxhash zstandard rocksdict msgpack sortedcontainers pydantic pydantic-settings pyyaml uvloop click httpx)
if ! "$python" -c "import xxhash, zstandard, rocksdict, msgpack, sortedcontainers, pydantic, pydantic_settings, yaml, click, httpx" 2>/dev/null; then
  if compgen -G "$here/wheels/*.whl" > /dev/null; then
    echo "installing kvfabric's server dependencies from $here/wheels (no network)" >&2
    "$python" -m pip install -q --no-index --find-links "$here/wheels" "${needed[@]}"
  else
    echo "kvfabric's server dependencies are missing and $here/wheels has no wheels (bash bench/gpu/fetch_wheels.sh)" >&2
  fi
fi
cd "$repo"
exec timeout --signal=TERM --kill-after=10 470 "$python" "$here/check.py" "$@"
