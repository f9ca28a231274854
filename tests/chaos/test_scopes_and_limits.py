"""Against the real node: a read token cannot change anything of its tenant, configured limits are the ones
advertised and enforced, and model registration is validated and bounded."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from kvfabric.client import Client
from kvfabric.errors import AuthError, RemoteError
from kvfabric.transport import frames as fr
from tests.chaos.harness import HOSTILE, MAX_BATCH, MAX_FRAME_BYTES, SPEC, STEADY_READER, Node, beside
from tests.transport.wire import connect, hello, read_frame


def test_a_read_token_cannot_write_over_the_tenants_blocks(node: Node) -> None:
    with beside(node) as steady:
        with Client(node.url, token=STEADY_READER, shm=False) as reader:
            reader.register_model(SPEC)  # naming a model the node knows is reading
            deadline = time.monotonic() + 10
            while len(steady.acked) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            seeds = list(steady.acked)[:8]
            assert seeds, "the steady client acknowledged nothing"
            hashes = [reader.block_hashes(SPEC, steady.tokens(s))[0] for s in seeds]
            with pytest.raises(AuthError, match="'write' scope"):
                reader.put_blocks(SPEC, hashes, [np.zeros(SPEC.block_nbytes, np.uint8)] * len(hashes))
            for op in (reader.delete, reader.pin, reader.unpin):
                with pytest.raises(AuthError, match="'write' scope"):
                    op(SPEC, hashes)
            with pytest.raises(AuthError, match="registering a new model"):
                reader.register_model(dataclasses.replace(SPEC, model="chaos/reader-made"))
            got = reader.get_blocks(SPEC, hashes)  # reading is what it may do
            assert all(g is not None for g in got)
    # beside() has checked every acknowledged block's bytes


def test_configured_limits_are_advertised_and_enforced(node: Node) -> None:
    with beside(node):
        with connect(node.port) as s:
            limits = hello(s, HOSTILE).limits
            assert limits.max_batch == MAX_BATCH and limits.max_payload_bytes == MAX_FRAME_BYTES
            s.sendall(fr.encode_keys(5, "exists", SPEC.fingerprint(), [bytes(32)] * (MAX_BATCH + 1)))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.request_id == 5 and "max_batch" in reply.message
        with Client(node.url, token=HOSTILE, shm=False) as c:  # the client splits by what was advertised
            n = MAX_BATCH * 2 + 7
            words = np.arange(n * SPEC.block_size) + 10**6
            assert c.put(SPEC, words, np.ones((n, SPEC.block_nbytes), np.uint8)) == n
            assert c.lookup(SPEC, words).blocks == n


def test_model_registration_is_validated_and_bounded(node: Node) -> None:
    with beside(node):
        with connect(node.port) as s:
            hello(s, HOSTILE)
            s.sendall(fr.encode_register_model(2, {**SPEC.to_dict(), "model": ["a", "list"]}))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and reply.code == "invalid_block" and "string" in reply.message
            s.sendall(fr.encode_register_model(3, {**SPEC.to_dict(), "model": "n" * (256 << 10)}))
            reply = read_frame(s)
            assert isinstance(reply, fr.Error) and "longer than" in reply.message
        with Client(node.url, token=HOSTILE, shm=False) as c:
            accepted = 0
            with pytest.raises(RemoteError, match="max_models_per_tenant"):
                for i in range(300):
                    c.register_model(dataclasses.replace(SPEC, model=f"chaos/flood-{i}-" + "x" * 200))
                    accepted += 1
            assert accepted < 8  # the hostile tenant registered SPEC already; 8 in all
    models = node.root / "data" / "models.json"
    data = json.loads(models.read_text())
    assert len(models.read_bytes()) < 64 << 10
    assert not any(isinstance(m["model"], list) for m in data["models"])
