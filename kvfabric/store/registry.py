"""The store's small persistent registries: the model specs it accepts and the keys pinned by operators.

Each is a JSON file in the data dir, replaced atomically (temp file, fsync, rename, fsync of the directory) on every
change, so a crash leaves either the old or the new file, never a torn one. Both are rare, operator-speed writes;
without a data dir they live in memory only. Thread-safe: each registry has its own lock.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvfabric.errors import ConfigError, LimitExceededError
from kvfabric.ids import BlockKey, ModelFingerprint
from kvfabric.spec import ModelSpec

FILE_VERSION = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON so that readers see the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json(path: Path, kind: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the {kind} file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
        raise ConfigError(f"{kind} file {path} is not a version-{FILE_VERSION} kvfabric {kind} file")
    return data


MAX_MODELS = 4096
"""Models one store accepts in all: with bounded specs (``ModelSpec.from_wire``) ``models.json`` stays a few MB."""


class ModelRegistry:
    """Model specs by fingerprint, persisted to ``models.json``, with the owners (tenants) that registered each.

    A spec counts against each owner that registered it (``register(..., owner=, max_per_owner=)``), so one tenant
    cannot fill the registry; specs from before owners were kept, or registered by an operator, have none."""

    FILE = "models.json"

    def __init__(self, data_dir: Path | None, max_models: int = MAX_MODELS) -> None:
        self._path = data_dir / self.FILE if data_dir is not None else None
        self._lock = threading.Lock()
        self.max_models = max_models
        self._specs: dict[ModelFingerprint, ModelSpec] = {}
        self._owners: dict[ModelFingerprint, frozenset[str]] = {}
        if self._path is not None:
            data = _read_json(self._path, "model registry")
            for entry in data["models"] if data else ():
                try:
                    spec = ModelSpec.from_dict(entry)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"model registry {self._path} holds an invalid spec {entry!r}: {exc}") from exc
                self._specs[spec.fingerprint()] = spec
            owners = data.get("owners", {}) if data else {}
            if not isinstance(owners, dict):
                raise ConfigError(f"model registry {self._path}: 'owners' must be a map")
            for fp_hex, names in owners.items():
                fp = ModelFingerprint(bytes.fromhex(fp_hex))
                if fp in self._specs and isinstance(names, list):
                    self._owners[fp] = frozenset(str(n) for n in names)

    def register(
        self, spec: ModelSpec, *, owner: str | None = None, max_per_owner: int | None = None
    ) -> ModelFingerprint:
        """Accept ``spec``; raises LimitExceededError when ``owner`` already holds ``max_per_owner`` other models or
        the registry is full. Writes ``models.json`` only when something changed."""
        fingerprint = spec.fingerprint()
        with self._lock:
            owners = self._owners.get(fingerprint, frozenset())
            known = fingerprint in self._specs
            if known and (owner is None or owner in owners):
                return fingerprint
            if owner is not None and max_per_owner is not None:
                held = sum(owner in names for names in self._owners.values())
                if held >= max_per_owner:
                    raise LimitExceededError(
                        f"tenant {owner!r} has registered {held} models, its limit (max_models_per_tenant)"
                    )
            if not known and len(self._specs) >= self.max_models:
                raise LimitExceededError(f"the model registry holds its limit of {self.max_models} models")
            specs = {**self._specs, fingerprint: spec}
            all_owners = dict(self._owners)
            if owner is not None:
                all_owners[fingerprint] = owners | {owner}
            if self._path is not None:
                write_json_atomic(self._path, {
                    "version": FILE_VERSION, "models": [s.to_dict() for s in specs.values()],
                    "owners": {fp.hex(): sorted(names) for fp, names in all_owners.items()},
                })  # fmt: skip
            self._specs, self._owners = specs, all_owners  # replaced whole, so readers never lock
        return fingerprint

    def owners(self, fingerprint: ModelFingerprint) -> frozenset[str]:
        """The tenants that registered ``fingerprint`` (empty: none recorded)."""
        return self._owners.get(fingerprint, frozenset())

    def get(self, fingerprint: ModelFingerprint) -> ModelSpec | None:
        return self._specs.get(fingerprint)

    def all(self) -> list[ModelSpec]:
        return list(self._specs.values())


class PinRegistry:
    """Pinned block keys, persisted to ``pins.json`` (keys as hex of :meth:`BlockKey.to_bytes`)."""

    FILE = "pins.json"

    def __init__(self, data_dir: Path | None) -> None:
        self._path = data_dir / self.FILE if data_dir is not None else None
        self._lock = threading.Lock()
        self._keys: frozenset[BlockKey] = frozenset()
        if self._path is not None:
            data = _read_json(self._path, "pin")
            try:
                self._keys = frozenset(BlockKey.from_bytes(bytes.fromhex(h)) for h in (data["pins"] if data else ()))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"pin file {self._path} holds an invalid key: {exc}") from exc

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._keys

    def keys(self) -> frozenset[BlockKey]:
        return self._keys

    def add(self, key: BlockKey) -> bool:
        """Pin ``key``; ``False`` if it already was."""
        return self._update(lambda keys: keys | {key})

    def remove(self, key: BlockKey) -> bool:
        """Unpin ``key``; ``False`` if it was not pinned."""
        return self._update(lambda keys: keys - {key})

    def remove_where(self, predicate: Callable[[BlockKey], bool]) -> int:
        """Unpin every key ``predicate`` accepts; how many."""
        before = len(self._keys)
        self._update(lambda keys: frozenset(k for k in keys if not predicate(k)))
        return before - len(self._keys)

    def _update(self, change: Callable[[frozenset[BlockKey]], frozenset[BlockKey]]) -> bool:
        with self._lock:
            keys = change(self._keys)
            if keys == self._keys:
                return False
            if self._path is not None:
                write_json_atomic(
                    self._path, {"version": FILE_VERSION, "pins": sorted(k.to_bytes().hex() for k in keys)}
                )
            self._keys = keys  # replaced whole, so readers never lock
            return True
