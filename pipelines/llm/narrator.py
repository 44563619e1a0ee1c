"""The narrator: recent vision detection counts -> a short operator report by the LLM.

It watches the agent's result feed (``PipelineContext.results``) for
``vision/<pipeline>/detections`` (per-frame ``counts``) and ``vision/<pipeline>/events``. Every
``interval_s`` (when frames came in), and on an event at most every ``min_gap_s``, it turns the
window's counts into a few factual lines (:func:`summarise`) and submits a chat request to its
LLM pipeline (system prompt = ``narrator.system_prompt``, cached as a prompt prefix). The
answer is the pipeline's ordinary result on ``llm/<request_id>/result`` with ``source`` =
``narrator`` and the figures it was written from under ``context``.

The feed listener only adds to counters under a lock (it runs on the vision sink thread); the
narrator's own thread builds the summary and submits. A full LLM queue skips the report
(counted), it never blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.base import ResultFeed
from pipelines.errors import PipelineBusyError, PipelineError
from pipelines.llm.config import NarratorConfig
from pipelines.llm.requests import ChatMessage, GenerateRequest

if TYPE_CHECKING:
    from pipelines.llm.pipeline import LlmPipeline

__all__ = ["Narrator", "Window", "summarise"]

_log = logging.getLogger(__name__)


@dataclass
class _LabelStats:
    frames: int = 0
    """Frames in which the label appeared."""
    total: int = 0
    """Sum of its per-frame counts."""
    peak: int = 0


@dataclass
class Window:
    """Detections of one vision pipeline since the last report."""

    frames: int = 0
    labels: dict[str, _LabelStats] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def add_frame(self, counts: Mapping[str, Any]) -> None:
        self.frames += 1
        for label, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                continue
            stats = self.labels.setdefault(str(label), _LabelStats())
            stats.frames += 1
            stats.total += value
            stats.peak = max(stats.peak, value)


def summarise(windows: Mapping[str, Window], seconds: float) -> str:
    """The facts handed to the LLM, one line per vision pipeline, most frequent labels first."""
    lines = []
    for name in sorted(windows):
        w = windows[name]
        if w.frames == 0 and not w.events:
            continue
        parts = []
        ranked = sorted(w.labels.items(), key=lambda kv: (-kv[1].frames, kv[0]))
        for label, s in ranked[:5]:
            share = 100.0 * s.frames / w.frames if w.frames else 0.0
            parts.append(
                f"{label} in {share:.0f}% of frames (at most {s.peak} at once, "
                f"{s.total / max(1, s.frames):.1f} on average when present)"
            )
        seen = "; ".join(parts) if parts else "nothing detected"
        line = f"Camera {name!r}, last {seconds:.0f} s, {w.frames} frames: {seen}."
        if w.events:
            line += f" Events: {', '.join(w.events[:5])}."
        lines.append(line)
    return "\n".join(lines)


class Narrator:
    """Attach to an ``LlmPipeline`` with :meth:`attach` (see the module docstring)."""

    def __init__(
        self, config: NarratorConfig, pipeline: LlmPipeline, feed: ResultFeed | None
    ) -> None:
        self.config = config
        self._pipeline = pipeline
        self._feed = feed
        self._lock = threading.Lock()
        self._windows: dict[str, Window] = {}
        self._window_start = time.monotonic()
        self._trigger = threading.Event()
        self._unsubscribe: Any = None
        self._count = 0
        self.reports = 0
        self.skipped_busy = 0
        self.skipped_empty = 0
        self.last_request_id: str | None = None
        self.last_summary: str | None = None

    def attach(self) -> None:
        """Subscribe to the feed and run the narrator thread with the pipeline."""
        if self._feed is None:
            raise PipelineError(
                f"pipeline {self._pipeline.name}: the narrator needs the agent's result feed "
                "(PipelineContext.results) and got none"
            )
        self._unsubscribe = self._feed.subscribe(self.on_result)
        self._pipeline.on_stop(self._detach)
        self._pipeline.add_status("narrator", self.status)
        self._pipeline.add_thread("narrator", self._loop)

    def _detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._trigger.set()

    def _wanted(self, pipeline: str) -> bool:
        return not self.config.pipelines or pipeline in self.config.pipelines

    def on_result(self, topic: str, message: Mapping[str, Any]) -> None:
        """Feed listener: note a vision result (cheap; runs on the publisher's thread)."""
        levels = topic.split("/")
        if len(levels) != 3 or levels[0] != "vision" or not self._wanted(levels[1]):
            return
        if levels[2] == "detections":
            counts = message.get("counts")
            if isinstance(counts, Mapping):
                with self._lock:
                    self._windows.setdefault(levels[1], Window()).add_frame(counts)
        elif levels[2] == "events":
            what = message.get("event") or message.get("type") or "event"
            with self._lock:
                self._windows.setdefault(levels[1], Window()).events.append(str(what)[:80])
            if self.config.on_events:
                self._trigger.set()

    def _loop(self, worker: str) -> None:
        cfg = self.config
        beats = self._pipeline.heartbeats
        stop = self._pipeline.stopping
        next_due = time.monotonic() + cfg.interval_s
        last_report = 0.0
        while not stop.is_set():
            beats.beat(worker)
            wait = min(max(0.0, next_due - time.monotonic()), 1.0)
            triggered = self._trigger.wait(wait)
            if stop.is_set():
                return
            now = time.monotonic()
            if triggered and now - last_report < cfg.min_gap_s:
                self._trigger.clear()
                next_due = min(next_due, last_report + cfg.min_gap_s)
                continue
            if not triggered and now < next_due:
                continue
            self._trigger.clear()
            next_due = now + cfg.interval_s
            if self.report_now():
                last_report = now

    def report_now(self) -> bool:
        """Summarise the window and submit the report; False when there was nothing to say or
        the LLM queue was full."""
        with self._lock:
            windows, self._windows = self._windows, {}
            seconds = time.monotonic() - self._window_start
            self._window_start = time.monotonic()
        summary = summarise(windows, seconds)
        if not summary:
            self.skipped_empty += 1
            return False
        self._count += 1
        request_id = f"{self._pipeline.name}-narrator-{self._count}-{int(time.time())}"
        request = GenerateRequest(
            request_id=request_id,
            messages=[
                ChatMessage(role="system", content=self.config.system_prompt),
                ChatMessage(
                    role="user",
                    content=f"{summary}\nWrite a one-sentence report for the operator.",
                ),
            ],
            max_tokens=self.config.max_tokens,
            temperature=0.2,
            repeat_penalty=1.3,
        )
        context = {
            "window_s": round(seconds, 1),
            "summary": summary,
            "pipelines": {
                name: {
                    "frames": w.frames,
                    "labels": {
                        k: {"frames": v.frames, "peak": v.peak, "total": v.total}
                        for k, v in w.labels.items()
                    },
                    "events": w.events[:20],
                }
                for name, w in windows.items()
            },
        }
        try:
            self._pipeline.submit(request, source="narrator", context=context)
        except PipelineBusyError:
            self.skipped_busy += 1
            _log.info("narrator of %s: LLM queue full, report skipped", self._pipeline.name)
            return False
        self.reports += 1
        self.last_request_id = request_id
        self.last_summary = summary
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            frames = {name: w.frames for name, w in self._windows.items()}
        return {
            "reports": self.reports,
            "skipped_busy": self.skipped_busy,
            "skipped_empty": self.skipped_empty,
            "last_request_id": self.last_request_id,
            "last_summary": self.last_summary,
            "window_frames": frames,
            "interval_s": self.config.interval_s,
        }
