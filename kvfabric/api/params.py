"""Path parameters of the admin API, validated at the edge (a bad one is a 422 naming it; nothing is touched)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.exceptions import RequestValidationError

from kvfabric.ids import MAX_NAMESPACE_BYTES, BlockKey, ModelFingerprint, Namespace, PrefixHash

HEX64 = r"^[0-9a-fA-F]{64}$"

NamespaceParam = Annotated[
    str, Path(min_length=1, max_length=MAX_NAMESPACE_BYTES, description="namespace (tenant key space)")
]
# max_length counts characters; the key's limit is UTF-8 bytes, checked again by BlockKey (see namespace_of).
FingerprintParam = Annotated[str, Path(pattern=HEX64, description="model fingerprint, 64 hex digits")]
PrefixParam = Annotated[str, Path(pattern=HEX64, description="chained prefix hash of the block, 64 hex digits")]


def fingerprint_of(hex_: str) -> ModelFingerprint:
    return ModelFingerprint(bytes.fromhex(hex_))


def block_key(namespace: str, fingerprint: str, prefix: str) -> BlockKey:
    return BlockKey(Namespace(namespace), fingerprint_of(fingerprint), PrefixHash(bytes.fromhex(prefix)))


def namespace_of(name: str) -> Namespace:
    """The namespace, or a 422 naming the parameter when it is too long in UTF-8 bytes."""
    if len(name.encode()) > MAX_NAMESPACE_BYTES:
        raise RequestValidationError(
            [{
                "loc": ("path", "namespace"),
                "msg": f"namespace must be at most {MAX_NAMESPACE_BYTES} UTF-8 bytes",
                "type": "value_error",
                "input": name,
            }]
        )  # fmt: skip
    return Namespace(name)


def reject_unknown_query(request: Request) -> None:
    """App-wide dependency: a query parameter the route does not declare is a 422 naming it, not silently ignored
    (a misspelt ``?limt=10`` must not quietly return the default)."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    allowed = _query_aliases(dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "unknown query parameter", "type": "extra_forbidden",
                 "input": request.query_params[name]}
                for name in unknown
            ]
        )  # fmt: skip


def _query_aliases(dependant: Any) -> frozenset[str]:
    """Every query parameter alias a route declares, its sub-dependencies' included.

    Walks ``Dependant``'s public fields (``query_params``, ``dependencies``) rather than FastAPI's flattening helper,
    which moved between releases."""
    aliases: set[str] = set()
    todo, seen = [dependant], set()
    while todo:
        d = todo.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        aliases.update(p.alias for p in d.query_params)
        todo.extend(d.dependencies)
    return frozenset(aliases)
