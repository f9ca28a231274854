"""The shipped deployment files agree with each other and with the code (no Docker needed to check that)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kvfabric.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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


def test_helm_values_config_loads_with_the_charts_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "kvfabric" / "values.yaml").read_text())
    cfg = tmp_path / "kvfabric.toml"
    cfg.write_text(values["config"])
    # What templates/secret.yaml and statefulset.yaml put in the environment:
    tokens = [{"token": "ops-token-0123456789", "tenant": "ops", "scopes": ["admin"], "namespaces": ["*"]}]
    monkeypatch.setenv("KVFABRIC_SERVER__SERVER_SECRET", "chart-secret")
    monkeypatch.setenv("KVFABRIC_SERVER__AUTH__TOKENS", json.dumps(tokens))
    monkeypatch.setenv("KVFABRIC_STORE__NODE_ID", "kvfabric-0")
    s = load_settings(cfg)
    assert s.server.auth.enabled and s.server.auth.tokens[0].tenant == "ops"
    assert s.store.node_id == "kvfabric-0"
    assert str(s.store.data_dir) == "/var/lib/kvfabric"
    assert s.server.port == values["ports"]["data"] and s.server.admin_port == values["ports"]["admin"]
    statefulset = (DEPLOY / "helm" / "kvfabric" / "templates" / "statefulset.yaml").read_text()
    assert "/healthz" in statefulset and "/readyz" in statefulset and "mountPath: /var/lib/kvfabric" in statefulset
