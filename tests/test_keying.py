"""The keying secret's sources and the keying check (``kvfabric.keying``), on a real data dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvfabric.errors import ConfigError
from kvfabric.keying import CHECK_NAME, SECRET_FILE, DataDir, KeyingMismatchError, KeyingSecret, resolve_secret, verify

A = KeyingSecret(b"a" * 32, "test a")
B = KeyingSecret(b"b" * 32, "test b")


def test_the_check_proves_the_secret_without_revealing_it() -> None:
    assert A.check != B.check and len(A.check) == 64
    assert "a" * 16 not in A.check and A.check == KeyingSecret(b"a" * 32, "elsewhere").check


def test_a_data_dir_records_then_matches_then_refuses_another_secret(tmp_path: Path) -> None:
    place = DataDir(tmp_path / "d")
    assert verify(place, A) == "recorded"
    assert verify(place, A) == "matched"
    with pytest.raises(KeyingMismatchError, match=r"data dir .* another secret .*test b"):
        verify(place, B)
    assert verify(place, A) == "matched"  # the refusal changed nothing


def test_a_data_dir_with_blocks_but_no_check_is_recorded_and_said(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    assert verify(DataDir(tmp_path), A) == "recorded over existing blocks"


def test_a_malformed_check_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / CHECK_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match=CHECK_NAME):
        verify(DataDir(tmp_path), A)


def test_sources_in_order_and_a_shared_tier_needs_configuration(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("from-a-file-0123456789\n")
    assert resolve_secret(secret_file=f, configured="configured-0123456789", data_dir=None, shared=None).secret == (
        b"from-a-file-0123456789"
    )
    got = resolve_secret(secret_file=None, configured="configured-0123456789", data_dir=None, shared="s3://b/p")
    assert got.origin == "server.server_secret"
    generated = resolve_secret(secret_file=None, configured=None, data_dir=tmp_path / "n", shared=None)
    assert (tmp_path / "n" / SECRET_FILE).read_bytes() == generated.secret
    with pytest.raises(ConfigError, match=r"s3://b/p is shared") as refused:
        resolve_secret(secret_file=None, configured=None, data_dir=tmp_path / "n", shared="s3://b/p")
    assert f'server.secret_file = "{tmp_path / "n" / SECRET_FILE}"' in str(refused.value)  # keeps today's keys
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        resolve_secret(secret_file=None, configured="short", data_dir=None, shared=None)
    with pytest.raises(ConfigError, match="cannot read the keying secret file"):
        resolve_secret(secret_file=tmp_path / "missing", configured=None, data_dir=None, shared=None)


def test_placeholders_are_recognised() -> None:
    assert KeyingSecret(b"change-me-to-a-long-random-string", "x").is_placeholder
    assert not A.is_placeholder


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "kvfabric", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kvfabric {version('kvfabric')}"
