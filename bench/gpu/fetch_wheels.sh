#!/usr/bin/env bash
# Download the wheels check.sh installs on an offline GPU host into bench/gpu/wheels/ (run on a networked machine
# with the GPU host's Python version; `PYVER=3.12 bash bench/gpu/fetch_wheels.sh` for another one).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pyver="${PYVER:-$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')}"
python3 -m pip download -q --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$here/wheels" \
  xxhash zstandard rocksdict msgpack sortedcontainers pydantic pydantic-settings pyyaml uvloop click httpx
du -sh "$here/wheels"
