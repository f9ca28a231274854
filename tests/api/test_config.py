"""Configuration: file formats, env overrides and their precedence, sizes, secrets, errors that name the key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from kvfabric.config import Settings, dumps_json, dumps_toml, format_size, load_settings, parse_size
from kvfabric.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("KVFABRIC_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096), ("4096", 4096), ("64GiB", 64 << 30), ("64 GiB", 64 << 30), ("512MiB", 512 << 20),
        ("10GB", 10 * 1000**3), ("1.5KiB", 1536), ("2k", 2048), ("1TiB", 1 << 40), ("0", 0), (8.0, 8),
    ],
)  # fmt: skip
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12XB", "-1", "1.5.2GiB", True, 1.5, [1], -3])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(1 << 30) == "1GiB"
    assert format_size(1536) == "1536"
    assert format_size(3 << 20) == "3MiB"
    assert parse_size(format_size(123456789)) == 123456789


def test_defaults_without_file() -> None:
    s = load_settings(None)
    assert s.server.port == 9500 and s.server.admin_port == 9501
    assert s.store.data_dir is None and s.store.ram_bytes == 1 << 30
    assert not s.server.auth.enabled and not s.object.enabled
    assert s.namespaces == {}


def test_toml_and_yaml_give_the_same_settings(tmp_path: Path) -> None:
    toml = write(
        tmp_path,
        "c.toml",
        """
[store]
data_dir = "/data"
ram_bytes = "2GiB"
[namespaces.chat]
ttl_s = 60
quota_bytes = "1GiB"
""",
    )
    yml = write(
        tmp_path,
        "c.yaml",
        """
store:
  data_dir: /data
  ram_bytes: 2GiB
namespaces:
  chat: {ttl_s: 60, quota_bytes: 1GiB}
""",
    )
    a, b = load_settings(toml), load_settings(yml)
    assert a == b
    assert a.store.ram_bytes == 2 << 30
    assert a.namespaces["chat"].quota_bytes == 1 << 30


def test_env_overrides_file_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "c.toml", '[store]\nram_bytes = "2GiB"\nfsync = "always"\n[server]\nport = 9600\n')
    monkeypatch.setenv("KVFABRIC_STORE__RAM_BYTES", "3GiB")
    monkeypatch.setenv("kvfabric_server__admin_port", "9700")  # case-insensitive
    s = load_settings(cfg)
    assert s.store.ram_bytes == 3 << 30  # env beats file
    assert s.store.fsync == "always"  # file beats default
    assert s.server.port == 9600
    assert s.server.admin_port == 9700
    assert s.store.group_commit_ms == 2.0  # default


def test_env_sets_nested_lists_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFABRIC_SERVER__SERVER_SECRET", "secret-of-the-server")
    monkeypatch.setenv("KVFABRIC_SERVER__AUTH__ENABLED", "true")
    tokens = [{"token": "a" * 20, "tenant": "acme", "scopes": ["read", "write"]}]
    monkeypatch.setenv("KVFABRIC_SERVER__AUTH__TOKENS", json.dumps(tokens))
    s = load_settings(None)
    (tok,) = s.server.auth.tokens
    assert tok.tenant == "acme" and tok.scopes == {"read", "write"}
    assert tok.allowed_namespaces == ("acme",)
    assert tok.may_access("acme") and not tok.may_access("other")


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "c.yml", "server:\n  port: 9123\n")
    monkeypatch.setenv("KVFABRIC_CONFIG", str(cfg))
    assert load_settings(None).server.port == 9123


def test_bad_key_is_named_with_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "c.toml", '[store]\nram_bytez = 5\nfsync = "sometimes"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    msg = str(exc.value)
    assert "store.ram_bytez: unknown key" in msg
    assert "store.fsync" in msg and "sometimes" in msg
    assert str(cfg) in msg
    monkeypatch.setenv("KVFABRIC_STORE__RAM_BYTES", "lots")
    with pytest.raises(ConfigError, match=r"store\.ram_bytes: invalid size 'lots'.*KVFABRIC_STORE__RAM_BYTES"):
        load_settings(None)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = 70000\n', "server.port"),
        ('[server.tls]\ncert = "/c.pem"\n', "server.tls"),
        ('[server.auth]\nenabled = true\n', "server.auth"),
        ('[store.codec]\ndisk = "lz4"\n', "store.codec.disk"),
        ('[store.write_policy]\ndisk = "sometimes"\n', "store.write_policy.disk"),
        ('[object]\nbucket = "b"\naccess_key_id = "AKID"\n', "object"),
        ('[store]\nram_low_watermark = 0.9\nram_high_watermark = 0.8\n', "store"),
        ('[store]\nram_policy = "mru"\n', "store.ram_policy"),
        ('[namespaces.""]\nttl_s = 1\n', "namespaces"),
        ('[namespaces.a]\nttl_s = -1\n', "namespaces.a.ttl_s"),
        ('[[server.auth.tokens]]\ntoken = "short"\ntenant = "t"\n', "server.auth.tokens.0.token"),
        ('[[server.auth.tokens]]\ntoken = "aaaaaaaaaaaaaaaaaaaa"\ntenant = "t"\nscopes = ["root"]\n',
         "server.auth.tokens.0.scopes"),
        ('[index.tier_bandwidth]\ndisk = "fast"\n', "index.tier_bandwidth.disk"),
    ],
)  # fmt: skip
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_settings(write(tmp_path, "c.toml", text))


def test_auth_needs_a_server_secret(tmp_path: Path) -> None:
    text = '[server.auth]\nenabled = true\n[[server.auth.tokens]]\ntoken = "aaaaaaaaaaaaaaaaaaaa"\ntenant = "t"\n'
    with pytest.raises(ConfigError, match=r"server_secret \(or secret_file\) must be set"):
        load_settings(write(tmp_path, "c.toml", text))
    s = load_settings(write(tmp_path, "d.toml", '[server]\nserver_secret = "xyz"\n' + text))
    assert s.server.auth.enabled is True


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="must end in .toml, .yaml or .yml"):
        load_settings(write(tmp_path, "c.ini", "x=1"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "c.toml", "[store\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "c.yaml", "store: [1, 2\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(write(tmp_path, "c.yaml", "- 1\n- 2\n"))
    assert load_settings(write(tmp_path, "empty.yaml", "")) == Settings()


def test_secrets_are_masked_when_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFABRIC_SERVER__SERVER_SECRET", "very-secret-server-key")
    monkeypatch.setenv("KVFABRIC_OBJECT__ACCESS_KEY_ID", "AKIDSECRETVALUE")
    monkeypatch.setenv("KVFABRIC_OBJECT__SECRET_ACCESS_KEY", "sk-secret-value")
    monkeypatch.setenv("KVFABRIC_SERVER__AUTH__TOKENS", json.dumps([{"token": "tok-secret-0123456789", "tenant": "a"}]))
    s = load_settings(None)
    for text in (dumps_toml(s), dumps_json(s), repr(s), str(s)):
        for secret in ("very-secret-server-key", "AKIDSECRETVALUE", "sk-secret-value", "tok-secret-0123456789"):
            assert secret not in text
    assert s.server.server_secret is not None
    assert s.server.server_secret.get_secret_value() == "very-secret-server-key"


def test_shown_toml_reads_back_to_the_same_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = load_settings(REPO / "deploy" / "single-node.toml")
    shown = dumps_toml(s)
    back = tomllib.loads(shown)
    # masked secrets must be filled in again; everything else round-trips
    back["server"]["server_secret"] = s.server.server_secret.get_secret_value()  # type: ignore[union-attr]
    for tok, orig in zip(back["server"]["auth"]["tokens"], s.server.auth.tokens):
        tok["token"] = orig.token.get_secret_value()
    assert Settings(**back) == s
    assert json.loads(dumps_json(s))["store"]["ram_bytes"] == 64 << 30


@pytest.mark.parametrize("name", ["single-node.toml", "s3-tier.toml"])
def test_example_configs_load(name: str) -> None:
    s = load_settings(REPO / "deploy" / name)
    assert s.store.data_dir is not None


def test_store_config_is_the_stores_own(tmp_path: Path) -> None:
    from kvfabric.store.config import NamespacePolicy, StoreConfig

    s = load_settings(REPO / "deploy" / "single-node.toml")
    cfg = s.store_config()
    assert isinstance(cfg, StoreConfig)
    assert cfg.ram_bytes == 64 << 30 and cfg.disk_bytes == 2 << 40 and cfg.node_id == "node-1"
    assert cfg.write_policy == {"disk": "write-through", "object": "write-back"}
    assert cfg.namespaces == {"chat": NamespacePolicy(ttl_s=86400, quota_bytes=1 << 40)}
    assert cfg.object is None


def test_a_store_opens_from_settings(tmp_path: Path) -> None:
    from kvfabric.store.tiered import TieredStore

    text = f'[store]\ndata_dir = "{tmp_path / "d"}"\nram_bytes = "8MiB"\ndisk_bytes = "32MiB"\n'
    store = TieredStore.open(load_settings(write(tmp_path, "c.toml", text)).store_config())
    try:
        assert store.tier_stats()["ram"].capacity_bytes == 8 << 20
    finally:
        store.close()


def test_command_line_values_win_over_the_environment_and_keep_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFABRIC_STORE__RAM_BYTES", "3GiB")
    monkeypatch.setenv("KVFABRIC_SERVER__SERVER_SECRET", "secret-from-the-environment")
    s = load_settings().overridden(store={"ram_bytes": 1 << 20, "data_dir": None}, server={"port": 0})
    assert (s.store.ram_bytes, s.store.data_dir, s.server.port) == (1 << 20, None, 0)
    assert s.server.server_secret is not None
    assert s.server.server_secret.get_secret_value() == "secret-from-the-environment"  # untouched sections stay
    assert s.store_config().ram_bytes == 1 << 20
    with pytest.raises(ConfigError, match=r"store\.ram_bytes: .*negative"):
        s.overridden(store={"ram_bytes": -1})
    with pytest.raises(ConfigError, match=r"server\.port"):
        s.overridden(server={"port": 70000})


def test_the_settings_defaults_are_the_stores() -> None:
    from kvfabric.store.config import StoreConfig
    from kvfabric.store.object import ObjectTierConfig

    # The settings take their defaults from the store's types; the store built from empty settings is the default.
    assert Settings().store_config() == StoreConfig()
    obj = load_settings(None).overridden(object={"bucket": "b"}).object_tier_config()
    assert obj == ObjectTierConfig(bucket="b")
