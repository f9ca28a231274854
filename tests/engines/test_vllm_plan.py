"""The connector's vLLM-free parts: the scheduler's step planner and its configuration (layouts:
``test_vllm_layouts.py``)."""

from __future__ import annotations

import pytest

from kvfabric.client.vllm.config import ConnectorConfig
from kvfabric.client.vllm.plan import StepPlanner
from kvfabric.errors import ConfigError

BS = 4


def prompt(n: int) -> tuple[int, ...]:
    return tuple(range(100, 100 + n))


def test_load_covers_the_fabric_hit_beyond_the_engine_cache_and_leaves_the_last_token() -> None:
    planner = StepPlanner(BS)
    p = prompt(4 * BS)  # block-aligned: the last block holds the token that must be computed
    assert planner.on_lookup("r", p, fabric_blocks=4, computed_tokens=BS) == 2 * BS
    planner.on_alloc("r", [10, 11, 12, 13], external_tokens=2 * BS)
    planner.on_scheduled("r", [10, 11, 12, 13], replace=True, computed_after=len(p))
    plan = planner.take_plan()
    (load,) = plan.loads
    assert (load.first_block, load.block_ids, load.tokens) == (1, (11, 12), p[: 3 * BS])
    assert plan.saves == ()  # block 3 is computed this step, but the fabric already holds it
    assert planner.take_plan().loads == ()


def test_saves_follow_chunked_prefill_each_block_once() -> None:
    planner = StepPlanner(BS)
    p = prompt(3 * BS + 2)
    assert planner.on_lookup("r", p, fabric_blocks=0, computed_tokens=0) == 0
    planner.on_scheduled("r", [5, 6], replace=True, computed_after=2 * BS - 1)
    (s1,) = planner.take_plan().saves
    assert (s1.first_block, s1.block_ids) == (0, (5,))
    planner.on_scheduled("r", [7, 8], replace=False, computed_after=len(p))
    (s2,) = planner.take_plan().saves
    assert (s2.first_block, s2.block_ids, s2.tokens) == (1, (6, 7), p[: 3 * BS])
    planner.on_scheduled("r", None, replace=False, computed_after=len(p) + 1)  # decode steps store nothing
    assert planner.take_plan().saves == ()


def test_roles_and_failed_loads() -> None:
    consumer = StepPlanner(BS, save=False)
    assert consumer.on_lookup("r", prompt(3 * BS), fabric_blocks=2, computed_tokens=0) == 2 * BS
    consumer.on_scheduled("r", [1, 2, 3], replace=True, computed_after=3 * BS)
    assert consumer.take_plan().saves == ()
    producer = StepPlanner(BS, load=False)
    assert producer.on_lookup("r", prompt(3 * BS), fabric_blocks=2, computed_tokens=0) == 0

    planner = StepPlanner(BS)
    planner.on_lookup("r", prompt(3 * BS), fabric_blocks=2, computed_tokens=0)
    planner.on_alloc("r", [1, 2, 3], external_tokens=2 * BS)
    planner.on_scheduled("r", [1, 2, 3], replace=True, computed_after=3 * BS)
    assert [s.block_ids for s in planner.take_plan().saves] == [(3,)]
    planner.on_invalid_blocks({2})  # block 1 of the request failed to load: it is recomputed, then saved again
    planner.on_scheduled("r", None, replace=False, computed_after=3 * BS)
    assert [s.block_ids for s in planner.take_plan().saves] == [(2, 3)]
    planner.finish("r")
    assert len(planner) == 0


def test_blocks_shared_by_two_requests_in_one_step_are_saved_once() -> None:
    planner = StepPlanner(BS)
    shared = tuple(range(2 * BS))
    a, b = shared + tuple(range(100, 100 + 2 * BS)), shared + tuple(range(200, 200 + BS + 1))
    for req, prompt in (("a", a), ("b", b)):
        planner.on_lookup(req, prompt, fabric_blocks=0, computed_tokens=0)
    planner.on_scheduled("a", [0, 1, 2, 3], replace=True, computed_after=len(a))
    planner.on_scheduled("b", [4, 5, 6], replace=True, computed_after=len(b))  # its own engine blocks, same KV
    saves = planner.take_plan().saves
    assert [(s.req_id, s.first_block, s.block_ids) for s in saves] == [("a", 0, (0, 1, 2, 3)), ("b", 2, (6,))]
    assert saves[1].tokens == b[: 3 * BS]  # the chain up to b's own block: its parent is the shared block 1
    # The next step starts afresh: a request sharing the prefix there is deduplicated by the fabric, not here.
    planner.on_lookup("c", b, fabric_blocks=0, computed_tokens=0)
    planner.on_scheduled("c", [7, 8, 9], replace=True, computed_after=len(b))
    assert [s.block_ids for s in planner.take_plan().saves] == [(7, 8, 9)]


def test_connector_config_rejects_unknown_keys_and_bad_values() -> None:
    cfg = ConnectorConfig.from_extra({"url": "kvfabric://h:1", "token": "t", "tenant": "a", "timeout": "2.5"})
    assert (cfg.url, cfg.token, cfg.tenant, cfg.timeout) == ("kvfabric://h:1", "t", "a", 2.5)
    with pytest.raises(ConfigError, match="unknown kv_connector_extra_config keys \\['ulr'\\]"):
        ConnectorConfig.from_extra({"ulr": "x"})
    with pytest.raises(ConfigError, match="timeout"):
        ConnectorConfig.from_extra({"timeout": "soon"})
    assert ConnectorConfig.from_extra({"shm": False}).shm is False
    assert ConnectorConfig.from_extra({"shm": "auto"}).shm is None
    with pytest.raises(ConfigError, match="shm"):
        ConnectorConfig.from_extra({"shm": "sometimes"})
