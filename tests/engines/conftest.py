from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.models import TINY, save_random_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's tiny random-weight Llama (hidden 256, 4 layers, 4 heads, 2 KV heads, vocab 32000)."""
    pytest.importorskip("transformers", reason="the engine adapters need transformers")
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), TINY, seed=0)
