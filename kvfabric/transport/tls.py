"""TLS contexts for the data plane (optional): server from cert/key files, client verifying against a CA file."""

from __future__ import annotations

import ssl
from pathlib import Path

from kvfabric.errors import ConfigError


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}") from exc
    return ctx


def client_context(ca_file: str | Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
