"""Protocols the pipelines layer defines and the agent implements.

- ``ResultSink``: where a pipeline hands each result message (the agent's JSONL, MQTT and HID
  reporters implement it). ``publish`` must not block for long: a sink that cannot keep up drops
  and counts, it never stalls a pipeline.
- ``Heartbeats``: a pipeline's worker threads call ``beat(worker)`` every loop iteration (loops
  block with timeouts, so they come round at least once per timeout). The agent's watchdog only
  pings systemd while every critical worker has beaten within its interval.
- ``Pipeline``: what the agent starts, stops and asks for status.
- ``ResultFeed``: lets a pipeline see what the other pipelines publish (the LLM narrator reads
  vision detections); the agent hands one in ``PipelineContext.results``
  (``pipelines.feed.ResultTee`` implements it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from engines.manifest import ModelManifest

__all__ = [
    "NAME_PATTERN",
    "Heartbeats",
    "Pipeline",
    "PipelineContext",
    "ResolvedModel",
    "ResultFeed",
    "ResultListener",
    "ResultSink",
]

NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
"""Pipeline and source names (they appear in MQTT topics and command arguments)."""


@runtime_checkable
class ResultSink(Protocol):
    """Receives result messages (JSON-serialisable mappings) from pipelines."""

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        """Hand over one message; ``topic`` is relative, e.g. ``vision/street/detections``."""
        ...

    def close(self) -> None:
        """Flush and release; publish after close raises ``pipelines.errors.SinkError``."""
        ...


ResultListener = Callable[[str, Mapping[str, Any]], None]
"""``listener(topic, message)``: called on the publishing thread, so it must only take a note."""


@runtime_checkable
class ResultFeed(Protocol):
    """Messages published by pipelines, for other pipelines to watch."""

    def subscribe(self, listener: ResultListener) -> Callable[[], None]:
        """Call ``listener`` for every message published from now on; returns the function
        that unsubscribes it."""
        ...


@runtime_checkable
class Heartbeats(Protocol):
    """Liveness registry fed by worker threads."""

    def register(self, worker: str, interval_s: float, *, critical: bool = True) -> None:
        """Declare a worker that promises to beat at least every ``interval_s`` seconds."""
        ...

    def beat(self, worker: str) -> None:
        """Record that ``worker`` made progress now."""
        ...

    def unregister(self, worker: str) -> None:
        """Forget a worker that stopped on purpose."""
        ...


class Pipeline(Protocol):
    """A running pipeline as the agent sees it."""

    @property
    def name(self) -> str: ...

    def start(self, stop_event: threading.Event) -> None:
        """Start the worker threads; raise a PipelineError/EngineError on failure."""
        ...

    def stop(self, timeout_s: float) -> bool:
        """Stop and join the workers; True if all ended within ``timeout_s``."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-serialisable status: state, counters, latency percentiles."""
        ...


@dataclass(frozen=True)
class ResolvedModel:
    """A model file that exists locally and matched its manifest's size and sha256."""

    manifest: ModelManifest
    path: Path
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineContext:
    """Everything the agent hands a pipeline at build time (the pipeline imports no agent code).

    ``stage_cpus`` maps a stage name (capture, preprocess, inference, postprocess, llm,
    reporting) to the CPU set its threads pin themselves to; a missing stage inherits the
    process set ``process_cpus``.
    """

    sink: ResultSink
    heartbeats: Heartbeats
    resolve_model: Callable[[str], ResolvedModel]
    resolve_data: Callable[[str], Path]
    process_cpus: frozenset[int]
    stage_cpus: Mapping[str, frozenset[int]] = field(default_factory=dict)
    results: ResultFeed | None = None
    """What every pipeline publishes (the agent's ``ResultTee``); None: not available."""

    def cpus_for(self, stage: str) -> frozenset[int]:
        return self.stage_cpus.get(stage, self.process_cpus)
