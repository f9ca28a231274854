#!/usr/bin/env bash
# The clean-install check: what a new user does, on a copy of the tree with nothing but the package registries.
#   1. builds the sdist and the wheel and checks both carry the package data (the dashboard's files);
#   2. runs the README's first command exactly as written, in a fresh copy (so a fresh .venv, no test extras, a
#      non-editable install), and waits for the node;
#   3. checks /healthz, /metrics, the dashboard page and every asset it links, `kvfabric --version`, `pip check`;
#   4. runs the README's Python snippet as written with the venv's Python and compares what it prints with its
#      `# prints:` comments;
#   5. stops the node with SIGTERM and expects a clean exit.
# Called by .ci/run; runs on its own too: bash .ci/clean_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
work=$(mktemp -d)
node=""
cleanup() {
  if [ -n "$node" ] && kill -0 "$node" 2>/dev/null; then kill -TERM "$node" 2>/dev/null || true; wait "$node" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step() { echo "clean-install: $*"; }
fail() { echo "clean-install: FAILED: $*" >&2; [ -f "$work/serve.log" ] && tail -n 40 "$work/serve.log" >&2; exit 1; }

# What git would ship (tracked, plus untracked files it does not ignore): a clean clone in CI, the work tree here.
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' \
  | tar --null -T - -c | tar -x -C "$work/src"

step "sdist and wheel carry the dashboard"
$py -m pip install -q build
$py -m build -q --sdist --wheel --outdir "$work/dist" "$work/src" >/dev/null
$py - "$work/dist" <<'PY'
import sys, tarfile, zipfile, pathlib
dist = pathlib.Path(sys.argv[1])
need = {"kvfabric/api/dashboard/index.html", "kvfabric/api/dashboard/dashboard.js", "kvfabric/api/dashboard/dashboard.css"}
whl = next(dist.glob("*.whl"))
names = set(zipfile.ZipFile(whl).namelist())
missing = need - names
assert not missing, f"{whl.name} lacks {sorted(missing)}"
sdist = next(dist.glob("*.tar.gz"))
snames = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
missing = need - snames
assert not missing, f"{sdist.name} lacks {sorted(missing)}"
print(f"clean-install: {whl.name} and {sdist.name} hold the dashboard")
PY
rm -rf "$work/src/build" "$work/src"/*.egg-info

# The README's first command, verbatim: the first line of its first ```bash block.
cmd=$(awk '/^```bash/{getline; print; exit}' README.md)
[ -n "$cmd" ] || fail "README.md has no \`\`\`bash block"
# Where the system's Python is externally managed (PEP 668: Debian, Ubuntu), `python3` is that one here, as it is
# for a user of such a system: the command must work without pip ever touching it.
path=$PATH
if [ -x /usr/bin/python3 ] && ls /usr/lib/python3*/EXTERNALLY-MANAGED >/dev/null 2>&1; then
  if ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  mkdir -p "$work/system-python" && ln -s /usr/bin/python3 "$work/system-python/python3"
  path="$work/system-python:$PATH"
  step "python3 is the system's externally managed $(/usr/bin/python3 --version)"
fi
step "running the README's first command: $cmd"
(
  cd "$work/src"
  exec env -u PYTHONPATH -u VIRTUAL_ENV PATH="$path" bash -c "$cmd" >"$work/serve.log" 2>&1
) &
node=$!
# pip installs torch and the runtime dependencies first: allow minutes, then the node must say it listens.
for _ in $(seq 1 600); do
  grep -q "listening on" "$work/serve.log" 2>/dev/null && break
  kill -0 "$node" 2>/dev/null || fail "the README's first command exited before the node listened"
  sleep 1
done
grep -q "listening on" "$work/serve.log" || fail "no node listening after 10 minutes"
venv="$work/src/.venv"

cd "$work"  # from here on nothing may import the source tree by accident
step "the install is not editable, has no test extras, and is consistent"
"$venv/bin/python" - <<'PY'
import importlib.util, json, pathlib, sys
from importlib.metadata import distribution
d = distribution("kvfabric")
direct = d.read_text("direct_url.json")
assert not (direct and json.loads(direct).get("dir_info", {}).get("editable")), "kvfabric was installed editable"
for extra in ("pytest", "hypothesis", "schemathesis", "seaweedfs", "playwright"):
    assert importlib.util.find_spec(extra) is None, f"a test extra is installed: {extra}"
import kvfabric
assert pathlib.Path(kvfabric.__file__).is_relative_to(sys.prefix), f"kvfabric imported from {kvfabric.__file__}"
PY
"$venv/bin/pip" check
"$venv/bin/kvfabric" --version

step "admin API, metrics and dashboard answer"
"$venv/bin/python" - <<'PY'
import re, urllib.request
base = "http://127.0.0.1:9501"
def get(path: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode()
status, _, body = get("/healthz")
assert status == 200, (status, body)
status, ctype, body = get("/metrics")
assert status == 200 and "kvfabric_" in body and ctype.startswith("text/plain"), (status, ctype, body[:200])
status, ctype, page = get("/")
assert status == 200 and "text/html" in ctype, (status, ctype)
assets = re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page)
assert assets, "the dashboard page links no assets"
for asset in assets:
    status, ctype, body = get(asset)
    assert status == 200 and body, (asset, status)
print(f"clean-install: /healthz, /metrics, / and {len(assets)} dashboard assets answer")
PY

step "the README's Python snippet runs and prints what its comments say"
awk '/^```python/{on=1; next} /^```/{if (on) exit} on' "$work/src/README.md" >"$work/snippet.py"
(cd "$work" && env -u PYTHONPATH "$venv/bin/python" snippet.py) >"$work/snippet.out" 2>&1 || {
  cat "$work/snippet.out" >&2; fail "the README snippet raised"; }
sed -n 's/.*# prints: //p' "$work/snippet.py" >"$work/snippet.want"
diff -u "$work/snippet.want" "$work/snippet.out" || fail "the README snippet printed something else than its comments say"

step "SIGTERM stops the node cleanly"
pid=""
for p in $(pgrep -f "kvfabric serve" || true); do  # the one whose working directory is the copy
  [ "$(readlink "/proc/$p/cwd")" = "$work/src" ] && pid=$p && break
done
[ -n "$pid" ] || fail "no kvfabric serve process"
kill -TERM "$pid"
wait "$node" || rc=$?
[ "${rc:-0}" = 0 ] || [ "${rc:-0}" = 143 ] || fail "the node exited with $rc"
node=""
step "passed"
