from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvfabric.hashing import block_hash, encode_extra, prefix_hashes, root_hash, tenant_salt
from kvfabric.spec import DType, ModelSpec

SPEC = ModelSpec(model="meta-llama/Llama-3.1-8B", num_layers=32, kv_heads=8, head_dim=128, dtype=DType.BFLOAT16)

# Golden vectors, also published in docs/hashing.md: another implementation must reproduce them exactly.
TOKENS = list(range(48))


def test_fingerprint_depends_on_every_field() -> None:
    base = SPEC.fingerprint()
    for change in (dict(block_size=32), dict(tp_rank=0, tp_size=2), dict(dtype=DType.FLOAT16), dict(revision="x")):
        fields = SPEC.to_dict() | change
        assert ModelSpec.from_dict(fields).fingerprint() != base


def test_chain_is_prefix_closed() -> None:
    root = root_hash(SPEC.fingerprint(), b"salt")
    full = prefix_hashes(root, TOKENS, 16)
    assert len(full) == 3
    assert prefix_hashes(root, TOKENS[:40], 16) == full[:2]  # partial block has no hash
    other = TOKENS[:16] + [99] + TOKENS[17:]
    assert prefix_hashes(root, other, 16)[0] == full[0]
    assert prefix_hashes(root, other, 16)[1] != full[1]
    assert prefix_hashes(root, other, 16)[2] != full[2]  # chained: the change propagates


def test_salt_and_extra_separate_chains() -> None:
    fp = SPEC.fingerprint()
    assert prefix_hashes(root_hash(fp, b"a"), TOKENS, 16) != prefix_hashes(root_hash(fp, b"b"), TOKENS, 16)
    r = root_hash(fp)
    assert block_hash(r, TOKENS[:16]) != block_hash(r, TOKENS[:16], encode_extra(lora_id="l1"))
    assert tenant_salt(b"secret", "a") != tenant_salt(b"secret", "b")


def test_token_dtypes_agree_and_bad_tokens_rejected() -> None:
    r = root_hash(SPEC.fingerprint())
    assert block_hash(r, TOKENS[:16]) == block_hash(r, np.arange(16, dtype=np.int64))
    assert block_hash(r, TOKENS[:16]) == block_hash(r, np.arange(16, dtype=np.uint32))
    with pytest.raises(ValueError):
        block_hash(r, [-1])
    with pytest.raises(ValueError):
        block_hash(r, [2**32])


def test_deterministic_across_processes() -> None:
    code = (
        "from kvfabric.hashing import prefix_hashes, root_hash; from tests.test_hashing import SPEC, TOKENS;"
        "print(prefix_hashes(root_hash(SPEC.fingerprint(), b'salt'), TOKENS, 16)[-1].hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert out.stdout.strip() == prefix_hashes(root_hash(SPEC.fingerprint(), b"salt"), TOKENS, 16)[-1].hex()


def test_golden_vectors_match_docs() -> None:
    import pathlib
    import re

    text = pathlib.Path(__file__).parents[1].joinpath("docs/hashing.md").read_text()
    table = text.split("<!-- golden:begin -->")[1].split("<!-- golden:end -->")[0]
    golden = dict(re.findall(r"^\| (\w+) \| `(.+)` \|$", table, re.M))
    fp = SPEC.fingerprint()
    salt = tenant_salt(b"kvfabric-test-secret", "tenant-a")
    root = root_hash(fp, salt)
    hs = prefix_hashes(root, TOKENS, 16)
    computed = {
        "canonical_json": SPEC.canonical_json().decode(), "fingerprint": fp.hex(), "salt": salt.hex(),
        "root": root.hex(), "h0": hs[0].hex(), "h1": hs[1].hex(), "h2": hs[2].hex(),
        "root_unsalted": root_hash(fp).hex(),
        "h0_unsalted_lora": block_hash(root_hash(fp), TOKENS[:16], encode_extra(lora_id="adapter-1")).hex(),
    }  # fmt: skip
    assert computed == golden


def test_prefix_hashes_equal_chained_block_hashes_with_extras_and_a_partial_tail() -> None:
    r = root_hash(SPEC.fingerprint(), b"salt")
    tokens = list(range(1000, 1000 + 16 * 5 + 7))  # five full blocks and a partial one
    extras = [b"", encode_extra(lora_id="l1"), b"", encode_extra(mm_hashes=[b"\x01" * 32]), b""]
    expected, parent = [], r
    for i in range(5):
        parent = block_hash(parent, tokens[i * 16 : (i + 1) * 16], extras[i])
        expected.append(parent)
    assert prefix_hashes(r, tokens, 16, extras) == expected
    assert prefix_hashes(r, np.array(tokens, dtype=np.uint32), 16, extras) == expected
    assert prefix_hashes(r, tokens, 16)[0] == block_hash(r, tokens[:16])
    with pytest.raises(ValueError):
        prefix_hashes(r, [*tokens[:15], -1], 16)
