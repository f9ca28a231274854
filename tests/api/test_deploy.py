"""The shipped deployment files agree with each other and with the code (no Docker needed to check that)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from kvfabric.config import load_settings
from tests.serve_process import start_serve

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "kvfabric"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("KVFABRIC_"):
            monkeypatch.delenv(name)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())


def test_compose_node_config_loads_with_the_composes_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose()["services"]["kvfabric"]["environment"]
    for name, value in env.items():
        monkeypatch.setenv(name, "a-long-random-secret" if value.startswith("${") else value)
    s = load_settings(DEPLOY / "compose" / "kvfabric.toml")
    assert s.server.auth.enabled and s.object.enabled
    assert s.object.endpoint_url == "http://seaweedfs:8333"
    assert s.object.create_bucket, "nothing else in the stack creates the node's bucket"
    creds = json.loads((DEPLOY / "compose" / "s3.json").read_text())["identities"][0]["credentials"][0]
    assert s.object.access_key_id is not None and s.object.secret_access_key is not None
    assert creds == {
        "accessKey": s.object.access_key_id.get_secret_value(),
        "secretKey": s.object.secret_access_key.get_secret_value(),
    }


def test_prometheus_scrapes_with_a_node_wide_read_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFABRIC_SERVER__SERVER_SECRET", "a-long-random-secret")
    s = load_settings(DEPLOY / "compose" / "kvfabric.toml")
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    token = job["authorization"]["credentials"]
    (match,) = [t for t in s.server.auth.tokens if t.token.get_secret_value() == token]
    assert "read" in match.scopes and match.may_access("*") and "*" in match.allowed_namespaces
    assert job["static_configs"][0]["targets"] == [f"kvfabric:{s.server.admin_port}"]


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "kvfabric.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert f"{path}/kvfabric-dashboard.json" in mounts
    dash = json.loads((DEPLOY / "grafana" / "kvfabric-dashboard.json").read_text())
    assert dash["uid"] == "kvfabric-overview" and dash["panels"]


def test_grafana_json_is_built_from_its_script() -> None:
    import runpy

    script = runpy.run_path(str(DEPLOY / "grafana" / "build_dashboard.py"))
    assert (DEPLOY / "grafana" / "kvfabric-dashboard.json").read_text() == script["render"](), (
        "run python deploy/grafana/build_dashboard.py"
    )


def test_the_image_tag_is_the_same_everywhere() -> None:
    """What the Dockerfile's comment builds is what compose runs and the chart pulls: kvfabric:<package version>."""
    built = set(re.findall(r"-t (kvfabric:\S+)", (DEPLOY / "Dockerfile").read_text()))
    assert built == {f"kvfabric:{VERSION}"}
    assert compose()["services"]["kvfabric"]["image"] == f"kvfabric:{VERSION}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"{values['image']['repository']}:{values['image']['tag']}" == f"kvfabric:{VERSION}"
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == VERSION


def test_helm_values_config_loads_with_the_charts_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without helm: values.yaml's config with what templates/statefulset.yaml puts in the environment."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cfg = tmp_path / "kvfabric.toml"
    cfg.write_text(values["config"])
    tokens = [{"token": "ops-token-0123456789", "tenant": "ops", "scopes": ["admin"], "namespaces": ["*"]}]
    monkeypatch.setenv("KVFABRIC_SERVER__AUTH__ENABLED", str(values["auth"]["enabled"]).lower())
    monkeypatch.setenv("KVFABRIC_SERVER__SERVER_SECRET", "chart-secret")
    monkeypatch.setenv("KVFABRIC_SERVER__AUTH__TOKENS", json.dumps(tokens))
    monkeypatch.setenv("KVFABRIC_STORE__NODE_ID", "kvfabric-0")
    s = load_settings(cfg)
    assert s.server.auth.enabled and s.server.auth.tokens[0].tenant == "ops"
    assert s.store.node_id == "kvfabric-0"
    assert str(s.store.data_dir) == "/var/lib/kvfabric"
    assert s.server.port == values["ports"]["data"] and s.server.admin_port == values["ports"]["admin"]
    assert s.store.disk_bytes is not None and s.store.ram_bytes < s.store.disk_bytes


# --- the chart rendered by helm itself -------------------------------------------------------------------------
def helm(*args: str) -> str:
    if shutil.which("helm") is None:
        pytest.skip("helm is not installed (bash .ci/containers.sh installs it)")
    proc = subprocess.run(["helm", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def render(*sets: str) -> dict[tuple[str, str], dict]:
    """``helm template rel`` of the chart (``--set`` each of ``sets``), keyed by (kind, name)."""
    args = [a for s in sets for a in ("--set", s)]
    docs = [d for d in yaml.safe_load_all(helm("template", "rel", str(CHART), *args)) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container_env(objs: dict[tuple[str, str], dict], pod_name: str) -> dict[str, str]:
    """The node container's environment as the kubelet would build it from the rendered objects."""
    (sts,) = [o for (kind, _), o in objs.items() if kind == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = objs[("Secret", ref["name"])]["stringData"][ref["key"]]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = pod_name
    return env


@pytest.mark.parametrize("sets", [(), ("metrics.serviceMonitor.enabled=true",), ("auth.enabled=false",)])
def test_helm_lint_passes(sets: tuple[str, ...]) -> None:
    helm("lint", "--strict", str(CHART), *[a for s in sets for a in ("--set", s)])


def test_helm_refuses_auth_without_any_token_instead_of_a_crash_looping_pod() -> None:
    if shutil.which("helm") is None:
        pytest.skip("helm is not installed (bash .ci/containers.sh installs it)")
    proc = subprocess.run(["helm", "template", "rel", str(CHART), "--set", "auth.generateTokens=false"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "auth.enabled with no tokens" in proc.stderr


def test_helm_statefulset_has_a_headless_service_and_the_image_the_dockerfile_builds() -> None:
    objs = render()
    (sts,) = [o for (kind, _), o in objs.items() if kind == "StatefulSet"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    headless = objs[("Service", sts["spec"]["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= pod_labels.items()
    assert objs[("Service", "rel")]["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"kvfabric:{VERSION}"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/kvfabric", "/etc/kvfabric", "/dev/shm"} <= mounts


@pytest.mark.slow
def test_helm_defaults_start_a_node_whose_metrics_token_works(tmp_path: Path) -> None:
    """The default release's ConfigMap and Secret, as its pod gets them, start a real ``kvfabric serve``: auth is
    on, the generated admin token reaches the admin API and the metrics token /metrics. Only the data dir and the
    sizes are moved to fit a test machine (the pod's are /var/lib/kvfabric and values.yaml's)."""
    objs = render()
    cfg = tmp_path / "kvfabric.toml"
    cfg.write_text(objs[("ConfigMap", "rel")]["data"]["kvfabric.toml"])
    env = container_env(objs, "rel-0")
    env |= {"KVFABRIC_STORE__DATA_DIR": str(tmp_path / "data"), "KVFABRIC_STORE__RAM_BYTES": "64MiB",
            "KVFABRIC_STORE__DISK_BYTES": "256MiB"}  # fmt: skip
    secret = objs[("Secret", "rel")]["stringData"]
    proc, _, admin = start_serve(cfg, tmp_path, env=env)
    try:
        with httpx.Client(base_url=admin, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/metrics").status_code == 401
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {secret['metrics-token']}"})
            assert metrics.status_code == 200 and "kvfabric_" in metrics.text
            cfg_seen = http.get("/v1/config", headers={"Authorization": f"Bearer {secret['admin-token']}"})
            assert cfg_seen.status_code == 200, cfg_seen.text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_helm_service_monitor_sends_the_metrics_token() -> None:
    objs = render("metrics.serviceMonitor.enabled=true")
    (endpoint,) = objs[("ServiceMonitor", "rel")]["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    ref = endpoint["authorization"]["credentials"]
    token = objs[("Secret", ref["name"])]["stringData"][ref["key"]]
    env = container_env(objs, "rel-0")
    (match,) = [t for t in json.loads(env["KVFABRIC_SERVER__AUTH__TOKENS"]) if t["token"] == token]
    assert match["scopes"] == ["read"] and match["namespaces"] == ["*"]


def test_helm_user_tokens_and_server_secret_reach_the_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    objs = render("secrets.serverSecret=shared-cluster-secret", "auth.tokens[0].token=engine-token-0123456789",
                  "auth.tokens[0].tenant=chat", "auth.tokens[0].scopes[0]=write")  # fmt: skip
    cfg = tmp_path / "kvfabric.toml"
    cfg.write_text(objs[("ConfigMap", "rel")]["data"]["kvfabric.toml"])
    for name, value in container_env(objs, "rel-0").items():
        monkeypatch.setenv(name, value)
    s = load_settings(cfg)
    assert s.server.server_secret is not None and s.server.server_secret.get_secret_value() == "shared-cluster-secret"
    assert {t.tenant for t in s.server.auth.tokens} == {"ops", "monitoring", "chat"}
    assert s.store.node_id == "rel-0"
