"""Fixtures of the LLM tests: the real models (from their PyPI wheels, cached) and engines."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_support import GEMMA, SMOLLM, model_store

from engines.llama import LlamaEngine, open_llama
from engines.llama_config import LlamaCppConfig
from engines.store import ModelStore


@pytest.fixture(scope="session")
def store() -> ModelStore:
    return model_store()


@pytest.fixture(scope="session")
def smollm_path(store: ModelStore) -> Path:
    return store.resolve(SMOLLM)


@pytest.fixture(scope="session")
def gemma_path(store: ModelStore) -> Path:
    return store.resolve(GEMMA)


@pytest.fixture(scope="module")
def smollm(smollm_path: Path) -> Iterator[LlamaEngine]:
    """SmolLM2 on llama.cpp, small context and batch (shared by a module's tests)."""
    engine = open_llama(
        LlamaCppConfig(n_ctx=2048, n_batch=64), smollm_path, cpus=frozenset(os.sched_getaffinity(0))
    )
    try:
        yield engine
    finally:
        engine.close()
