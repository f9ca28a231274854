"""Mooncake-format traces: one JSON object per line with timestamp (ms), input_length, output_length and hash_ids
(ids of 512-token blocks; an id stands for its whole prefix, so ids serve as chain hashes directly)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvfabric.ids import HASH_BYTES, PrefixHash

MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_TRACE = Path("mooncake") / "conversation_trace.jsonl"
TRACES_ENV = "KVFABRIC_TRACES"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    chain: tuple[PrefixHash, ...]


def block_key(hash_id: int) -> PrefixHash:
    """A trace's integer block id as a fixed-size index key (ids are unique per prefix within a trace)."""
    return PrefixHash(hash_id.to_bytes(HASH_BYTES, "big"))


def default_trace_path(repo_root: Path) -> Path | None:
    """``../shared/traces/mooncake/conversation_trace.jsonl`` beside the repo, else under ``$KVFABRIC_TRACES``."""
    candidates = [repo_root.parent / "shared" / "traces" / DEFAULT_TRACE]
    if os.environ.get(TRACES_ENV):
        candidates.insert(0, Path(os.environ[TRACES_ENV]) / DEFAULT_TRACE)
    return next((p for p in candidates if p.is_file()), None)


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """Parse a Mooncake JSONL trace; a malformed line raises ``ValueError`` naming the line."""
    keys: dict[int, PrefixHash] = {}
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids = row["hash_ids"]
                chain = tuple(keys.get(i) or keys.setdefault(i, block_key(int(i))) for i in ids)
                req = TraceRequest(float(row["timestamp"]) / 1000.0, int(row["input_length"]),
                                   int(row["output_length"]), chain)  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace record ({exc})") from exc
            out.append(req)
            if limit is not None and len(out) >= limit:
                break
    return out
