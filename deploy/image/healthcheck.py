"""The image's HEALTHCHECK: exit 0 when the admin app answers /healthz (no token needed). Stdlib only, so a check
every few seconds costs no imports of kvfabric. The port is KVFABRIC_SERVER__ADMIN_PORT, else 9501."""

import os
import sys
import urllib.request

port = os.environ.get("KVFABRIC_SERVER__ADMIN_PORT", "9501")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as exc:
    print(f"kvfabric admin API on port {port}: {exc}", file=sys.stderr)
    sys.exit(1)
