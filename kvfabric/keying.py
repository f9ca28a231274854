"""The keying secret: where a node's secret comes from, and proof that stored blocks were keyed with it.

Every block's key is a prefix hash salted per tenant with the secret (:func:`kvfabric.hashing.tenant_salt`). A node
with another secret computes other keys, so blocks keyed under the old one are unreachable: not corrupt, not
reported, just never hit. That is silent loss, and it happens exactly when it hurts: a node replaced after a disk
failure, coming back with a fresh data dir (and a freshly generated secret) over the S3 tier that was to save it.

So the secret is configuration wherever blocks are shared (``server.server_secret``, ``server.secret_file``,
``--secret-file``; the same on every node of a bucket), and each place that holds blocks records a *keying check*
beside them: a keyed hash of a fixed string under the secret, which proves which secret keyed them without
revealing it. A node whose secret does not match a check refuses to start, naming the fix.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvfabric.errors import ConfigError

CHECK_CONTEXT = b"kvfabric/keying-check/v1"
CHECK_NAME = "keying.json"
"""The check's file name in a data dir, and its object name under a bucket prefix."""
SECRET_FILE = "server_secret"
"""A secret generated for a node that has none configured (single node, no shared tier)."""
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
PLACEHOLDER_MARKS = ("change-me", "changeme", "replace-me", "example-secret")


class KeyingMismatchError(ConfigError):
    """Blocks in a data dir or bucket were keyed with another secret than this node's."""


@dataclass(frozen=True, slots=True)
class KeyingSecret:
    secret: bytes
    origin: str
    """Where it came from, for messages: ``server.server_secret``, ``--secret-file PATH``, ..."""

    @property
    def check(self) -> str:
        """The keying check of this secret (hex): a keyed hash that reveals nothing about the secret itself."""
        return hashlib.blake2b(CHECK_CONTEXT, key=self.secret[:64], digest_size=32).hexdigest()

    @property
    def is_placeholder(self) -> bool:
        text = self.secret.decode(errors="replace").lower()
        return any(mark in text for mark in PLACEHOLDER_MARKS)


class MetaStore(Protocol):
    """A place holding blocks that can keep a small named document beside them (a data dir, a bucket prefix)."""

    def read_meta(self, name: str) -> bytes | None: ...

    def write_meta(self, name: str, data: bytes) -> None: ...

    def describe(self) -> str: ...

    def holds_blocks(self) -> bool: ...


def resolve_secret(
    *,
    secret_file: Path | None,
    configured: str | None,
    data_dir: Path | None,
    shared: str | None,
) -> KeyingSecret:
    """The node's secret: ``secret_file`` (the flag or ``server.secret_file``), else ``configured``
    (``server.server_secret``), else -- on a node that shares no tier -- the one generated in ``data_dir``.

    ``shared`` names the shared tier (e.g. ``"s3://bucket/prefix"``) when there is one: then a generated secret is
    refused, since another node (or this one after losing its disk) could never compute the same keys."""
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the keying secret file {secret_file}: {exc.strerror or exc}") from exc
        return _checked(KeyingSecret(secret, f"secret file {secret_file}"))
    if configured:
        return _checked(KeyingSecret(configured.encode(), "server.server_secret"))
    if shared is not None:
        hint = ""
        if data_dir is not None and (Path(data_dir) / SECRET_FILE).exists():
            hint = f" (to keep this node's current keys: server.secret_file = \"{Path(data_dir) / SECRET_FILE}\")"
        raise ConfigError(
            f"the object tier {shared} is shared, so its keying secret must be configuration, the same on every "
            f"node that uses it: set server.server_secret (or KVFABRIC_SERVER__SERVER_SECRET, or server.secret_file, "
            f"or --secret-file){hint}"
        )
    if data_dir is None:
        return KeyingSecret(os.urandom(SECRET_BYTES), "generated for this run (no data dir)")
    return _checked(KeyingSecret(_load_or_create(Path(data_dir) / SECRET_FILE), f"{Path(data_dir) / SECRET_FILE}"))


def _checked(keying: KeyingSecret) -> KeyingSecret:
    if len(keying.secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the keying secret from {keying.origin} is shorter than {MIN_SECRET_BYTES} bytes")
    return keying


def _load_or_create(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def verify(place: MetaStore, keying: KeyingSecret) -> str:
    """Check ``place``'s keying check against ``keying``, recording it where there is none yet.

    Returns what was done (``"matched"``, ``"recorded"``, ``"recorded over existing blocks"``); raises
    :class:`KeyingMismatchError` naming the fix when the blocks there were keyed with another secret."""
    raw = place.read_meta(CHECK_NAME)
    if raw is None:
        existing = place.holds_blocks()
        place.write_meta(CHECK_NAME, json.dumps({"format": 1, "check": keying.check}).encode())
        return "recorded over existing blocks" if existing else "recorded"
    try:
        doc = json.loads(raw)
        stored = str(doc["check"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{place.describe()}: {CHECK_NAME} is not a keying check ({exc}); remove it to re-record") from exc
    if not hmac.compare_digest(stored, keying.check):
        raise KeyingMismatchError(
            f"{place.describe()} holds blocks keyed with another secret than this node's ({keying.origin}); "
            f"none of them could be served. Set server.server_secret (or server.secret_file) to the secret the "
            f"blocks were written with, or point the node at another place"
        )
    return "matched"


@dataclass(frozen=True, slots=True)
class DataDir:
    """A node's data dir as a :class:`MetaStore`."""

    path: Path

    def read_meta(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_meta(self, name: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)

    def describe(self) -> str:
        return f"data dir {self.path}"

    def holds_blocks(self) -> bool:
        if not self.path.is_dir():
            return False
        return any(p.name not in (SECRET_FILE, CHECK_NAME) for p in self.path.iterdir())
