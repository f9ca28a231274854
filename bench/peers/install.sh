#!/usr/bin/env bash
# Installs the peer systems bench/transport.py compares kvfabric against -- Redis, Mooncake Store, LMCache's server --
# into their own virtualenv, .bench-venv/ at the repository root. None of them is a kvfabric dependency, and nothing
# here touches the project's Python. Safe to run again.
#
#   bash bench/peers/install.sh            # then: python bench/peers/run_peer.py redis --size 16777216 --count 8
set -euo pipefail
cd "$(dirname "$0")/../.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
py=${PYTHON:-python3}
venv=.bench-venv

# --- Debian packages: redis-server; libibverbs1 because Mooncake's binaries link libibverbs.so.1 even for TCP.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ldconfig -p | grep -q 'libibverbs\.so\.1 ' || missing+=(libibverbs1)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install.sh: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- the virtualenv
[[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)

# CPU torch first and pinned (LMCache imports torch): anything unpinned would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0

# Redis client (hiredis is redis-py's recommended reply parser) and Mooncake's CPU-only wheel.
"${pip[@]}" "numpy<=2.2.6" "redis==8.1.0" "hiredis>=3.1" "mooncake-transfer-engine-non-cuda==0.3.13.post1"

# LMCache 0.5.6 hard-requires CUDA packages (cupy-cuda13x, cuda-python, cufile-python, nvtx) and cloud SDKs, none of
# which its CPU server or its lm:// connector import. So: the wheel without its dependencies, then the subset those
# two import, within the bounds of lmcache's own metadata.
"${pip[@]}" sortedcontainers numba "prometheus_client>=0.18.0,<=0.24.1" py-cpuinfo psutil cachetools pyyaml \
    aiofile aiofiles msgspec "pyzmq>=25.0.0" "transformers>=5.4" cryptography aiohttp
"${pip[@]}" --no-deps "lmcache==0.5.6"

# --- check that every client and server entry point imports
LMCACHE_TRACK_USAGE=false LMCACHE_LOG_LEVEL=WARNING "$venv/bin/python" - <<'PY'
import redis, hiredis  # noqa: F401
from mooncake.store import MooncakeDistributedStore  # noqa: F401
import lmcache.v1.server.__main__  # noqa: F401
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector  # noqa: F401
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: F401
PY
for tool in mooncake_master mooncake_client mooncake_http_metadata_server; do
    [[ -x $venv/bin/$tool ]] || { echo "install.sh: $venv/bin/$tool is missing" >&2; exit 1; }
done
"$venv/lib/python3.11/site-packages/mooncake/mooncake_master" --version >/dev/null 2>&1 \
    || { echo "install.sh: mooncake_master does not run (missing shared library?)" >&2; exit 1; }
echo "install.sh: peers installed in $venv ($(redis-server --version | cut -d' ' -f1-3))"
