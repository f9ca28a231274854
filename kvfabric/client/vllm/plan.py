"""Scheduler-side bookkeeping for the vLLM connector: which blocks each engine step loads from, and saves to, the
fabric. Plain Python (no vLLM import) so it is tested on its own.

Blocks are counted in units of the engine's block size, which is also the fabric spec's ``block_size``: vLLM block
``i`` of a request holds prompt tokens ``[i * block_size, (i + 1) * block_size)`` and maps to fabric block ``i``.
Plans carry token ids rather than hashes: each tensor-parallel rank hashes with its own spec (``tp_rank`` is part of
the fingerprint, hence of every chained hash).
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class _BlockRun:
    """Engine blocks ``block_ids`` paired with fabric blocks ``[first_block, end_block)`` of ``tokens``."""

    req_id: str
    tokens: tuple[int, ...]
    first_block: int
    block_ids: tuple[int, ...]

    @property
    def end_block(self) -> int:
        return self.first_block + len(self.block_ids)


@dataclass(frozen=True, slots=True)
class LoadSpec(_BlockRun):
    """Fetch fabric blocks ``[first_block, first_block + len(block_ids))`` of ``tokens`` into ``block_ids``."""


@dataclass(frozen=True, slots=True)
class SaveSpec(_BlockRun):
    """Store engine blocks ``block_ids`` as fabric blocks ``[first_block, end_block)`` of ``tokens``."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Everything the workers move for one engine step."""

    loads: tuple[LoadSpec, ...] = ()
    saves: tuple[SaveSpec, ...] = ()


@dataclass(slots=True)
class _Request:
    prompt: tuple[int, ...]
    fabric_blocks: int  # leading prompt blocks the fabric held at lookup that a load may cover
    saved_blocks: int  # leading prompt blocks stored, or queued for saving, in the fabric
    block_ids: list[int] = field(default_factory=list)
    load: LoadSpec | None = None
    prefix_keys: list[bytes] = field(default_factory=list)  # prefix_keys[i] names prompt[: (i + 1) * block_size]

    def prefix_key(self, block: int, block_size: int) -> bytes:
        """A digest of the prompt up to the end of ``block``, chained block by block: two requests' blocks hold
        the same KV exactly when their keys match (within one spec). Only compared within this process."""
        while len(self.prefix_keys) <= block:
            i = len(self.prefix_keys)
            h = hashlib.blake2b(self.prefix_keys[-1] if self.prefix_keys else b"", digest_size=16)
            h.update(array("q", self.prompt[i * block_size : (i + 1) * block_size]).tobytes())
            self.prefix_keys.append(h.digest())
        return self.prefix_keys[block]


class StepPlanner:
    """Tracks each running request's prompt, engine block table and fabric progress; :meth:`take_plan` hands out
    the loads and saves of one step, each block at most once."""

    def __init__(self, block_size: int, *, load: bool = True, save: bool = True) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.load_enabled = load
        self.save_enabled = save
        self._requests: dict[str, _Request] = {}
        self._loads: list[LoadSpec] = []
        self._saves: list[SaveSpec] = []
        self._step_saved: set[bytes] = set()  # prefix keys of the blocks this step already saves

    def usable_blocks(self, prompt_len: int) -> int:
        """Prompt blocks a load may cover: the last prompt token always runs through the model to give logits."""
        return max(prompt_len - 1, 0) // self.block_size

    def on_lookup(self, req_id: str, prompt: tuple[int, ...], fabric_blocks: int, computed_tokens: int) -> int:
        """Record what the fabric holds; return the tokens to load beyond the engine's ``computed_tokens``."""
        loadable = min(fabric_blocks, self.usable_blocks(len(prompt)))
        self._requests[req_id] = _Request(prompt, loadable, saved_blocks=fabric_blocks)
        matched = loadable * self.block_size
        return matched - computed_tokens if self.load_enabled and matched > computed_tokens else 0

    def on_alloc(self, req_id: str, block_ids: list[int], external_tokens: int) -> None:
        """After vLLM allocated the request's blocks: plan the load of its ``external_tokens``."""
        req = self._requests.get(req_id)
        if req is None or external_tokens <= 0:
            return
        end = req.fabric_blocks
        first = end - external_tokens // self.block_size
        req.block_ids = list(block_ids)
        req.load = LoadSpec(req_id, req.prompt[: end * self.block_size], first, tuple(block_ids[first:end]))

    def on_scheduled(self, req_id: str, block_ids: list[int] | None, *, replace: bool, computed_after: int) -> None:
        """The step runs the request up to ``computed_after`` tokens; ``block_ids`` are its new (or, when
        ``replace``, all) engine blocks. Plans the saves of prompt blocks this step completes."""
        req = self._requests.get(req_id)
        if req is None:
            return
        if block_ids is not None:
            req.block_ids = list(block_ids) if replace else req.block_ids + list(block_ids)
        if req.load is not None:
            self._loads.append(req.load)
            req.load = None
        if not self.save_enabled:
            return
        done = min(computed_after, len(req.prompt)) // self.block_size
        done = min(done, len(req.block_ids))
        if done > req.saved_blocks:
            first = req.saved_blocks
            # Blocks another request of this step already saves (a shared prefix) are saved once. They lead the
            # run: a block's key covers every token before it, so a shared block's predecessors are shared too.
            while first < done and req.prefix_key(first, self.block_size) in self._step_saved:
                first += 1
            if first < done:
                tokens = req.prompt[: done * self.block_size]
                self._saves.append(SaveSpec(req_id, tokens, first, tuple(req.block_ids[first:done])))
                self._step_saved.update(req.prefix_key(i, self.block_size) for i in range(first, done))
            req.saved_blocks = done

    def on_invalid_blocks(self, block_ids: set[int]) -> None:
        """Engine blocks the workers failed to load will be recomputed: save them (and what follows) again."""
        for req in self._requests.values():
            for i, block_id in enumerate(req.block_ids[: req.saved_blocks]):
                if block_id in block_ids:
                    req.saved_blocks = i
                    break

    def finish(self, req_id: str) -> None:
        self._requests.pop(req_id, None)

    def take_plan(self) -> StepPlan:
        plan = StepPlan(tuple(self._loads), tuple(self._saves))
        self._loads, self._saves = [], []
        self._step_saved = set()
        return plan

    def __len__(self) -> int:
        return len(self._requests)
