"""The model registry: specs from clients are validated and bounded, per owner and in all, and models.json is only
rewritten when something changed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvfabric.errors import LimitExceededError
from kvfabric.spec import MAX_SPEC_STRING_BYTES, ModelSpec
from kvfabric.store.registry import ModelRegistry
from tests.blocks import SPEC


def spec(i: int) -> ModelSpec:
    return dataclasses.replace(SPEC, model=f"test/model-{i}")


@pytest.mark.parametrize("change,message", [
    ({"model": ["a", "list"]}, "model must be a string"),
    ({"model": "x" * (MAX_SPEC_STRING_BYTES + 1)}, "longer than 256 bytes"),
    ({"revision": 3}, "revision must be a string"),
    ({"num_layers": True}, "num_layers must be an integer"),
    ({"head_dim": 1.5}, "head_dim must be an integer"),
    ({"kv_heads": 1 << 30}, "kv_heads must be an integer"),
    ({"dtype": 3}, "dtype must be a string"),
])  # fmt: skip
def test_specs_from_the_wire_have_exact_types_and_bounded_values(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_wire({**SPEC.to_dict(), **change})
    assert ModelSpec.from_wire(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError, match="must be a map"):
        ModelSpec.from_wire([SPEC.to_dict()])


def test_each_owner_registers_at_most_its_limit_and_owners_survive_a_restart(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    for i in range(3):
        reg.register(spec(i), owner="a", max_per_owner=3)
    with pytest.raises(LimitExceededError, match="tenant 'a' has registered 3 models"):
        reg.register(spec(3), owner="a", max_per_owner=3)
    assert reg.register(spec(1), owner="a", max_per_owner=3) == spec(1).fingerprint()  # known: no new slot
    reg.register(spec(0), owner="b", max_per_owner=1)  # another tenant naming the same model counts for itself
    with pytest.raises(LimitExceededError):
        reg.register(spec(5), owner="b", max_per_owner=1)
    again = ModelRegistry(tmp_path)
    assert again.owners(spec(0).fingerprint()) == {"a", "b"}
    with pytest.raises(LimitExceededError):
        again.register(spec(3), owner="a", max_per_owner=3)
    assert {s.model for s in again.all()} == {"test/model-0", "test/model-1", "test/model-2"}


def test_the_registry_is_bounded_in_all_and_not_rewritten_for_known_models(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path, max_models=4)
    for i in range(4):
        reg.register(spec(i))
    with pytest.raises(LimitExceededError, match="limit of 4 models"):
        reg.register(spec(4))
    path = tmp_path / ModelRegistry.FILE
    before = path.stat().st_mtime_ns, path.read_bytes()
    for i in range(4):
        reg.register(spec(i))
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert len(path.read_bytes()) < 4 * 1024
