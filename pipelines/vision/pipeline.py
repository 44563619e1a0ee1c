"""The vision pipeline: sources -> preprocess -> inference -> postprocess -> sink, one thread each.

::

    capture (1 thread per source) --FrameHub (policy)--> preprocess --q--> inference --q-->
        postprocess --q--> sink (ResultSink.publish)

- **capture**: each source's own thread (``pipelines.vision.sources``) stamps frames with wall
  and monotonic time and offers them to the ``FrameHub``: ``latest`` keeps only the newest frame
  per source (stale ones dropped and counted), ``all`` queues a bounded number and blocks the
  source when full (back-pressure).
- **preprocess**: takes up to a batch of frames (round-robin across sources, waiting at most
  ``batch_max_wait_ms`` for a batch to fill) and writes them straight into the engine's input
  buffer with the model's ``Preprocessor``.
- **inference**: the preprocess stage ``submit``s each batch as soon as it is written (so the
  engine runs batch N while N+1 is prepared), this stage ``collect``s them in order. At most
  one batch per engine slot is in flight, counted by a slot token that postprocess returns once
  it has decoded the engine-owned outputs (no output copy). A slow call is waited for, never
  dropped: ``collect`` waits in short slices and the worker beats between them (a dropped ticket
  would keep its engine slot forever). Only a call still running after ``_STALL_INTERVALS``
  heartbeat intervals counts as stalled: the worker then stops beating, so the watchdog sees it.
- **postprocess**: the model's decoder (score threshold, class allow-list, boxes back to source
  pixels, class-aware NMS, max detections).
- **sink**: builds the schema-versioned result message (``pipelines.vision.results``) per frame
  and hands it to the ``ResultSink`` on ``vision/<name>/detections``.

Every worker pins itself to its stage's CPU set first, registers with the heartbeat registry,
beats every loop and blocks only with timeouts. Queues between stages are bounded, so a slow
stage throttles the ones before it (under ``latest`` the hub then drops stale frames). Per-stage
latency histograms, frame rates and drop counters are in ``status()``.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy.typing as npt
from pydantic import ValidationError

from engines.base import TensorEngine, Ticket
from engines.errors import EngineError, InferenceTimeoutError
from pipelines.base import PipelineContext
from pipelines.config import VisionPipelineConfig
from pipelines.errors import PipelineConfigError, PipelineError, PipelineStateError
from pipelines.vision.decoders.base import DecodeParams, Decoder
from pipelines.vision.detections import Detections
from pipelines.vision.metrics import Counters, LatencyHistogram, RateMeter
from pipelines.vision.preprocess import FrameMeta, Preprocessor
from pipelines.vision.results import (
    build_result,
    detections_topic,
    encode_snapshot,
    frame_fingerprint,
)
from pipelines.vision.sources import CaptureLink, Frame, FrameHub, FrameSource
from pipelines.workers import WorkerThreads, pinner

__all__ = ["KEEP", "VisionPipeline"]

_log = logging.getLogger(__name__)

_POLL_S = 0.25
"""Longest a worker blocks before it checks for stop and beats again."""

_STALL_INTERVALS = 6
"""An engine call still running after this many heartbeat intervals is stalled, not slow: the
inference worker stops beating (the watchdog then sees it stale) and keeps waiting."""

State = Literal["created", "running", "finished", "stopping", "stopped", "failed"]
LATENCY_STAGES = ("wait", "preprocess", "inference", "postprocess", "sink", "end_to_end")


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP
"""``VisionPipeline.update`` argument default: leave this setting as it is."""


@dataclass
class _Batch:
    """Frames travelling together through one engine call."""

    frames: list[Frame]
    metas: list[FrameMeta] = field(default_factory=list)
    pre_start: float = 0.0
    pre_s: float = 0.0
    infer_s: float = 0.0
    post_s: float = 0.0
    ticket: Ticket | None = None
    submitted: float = 0.0
    outputs: dict[str, npt.NDArray[Any]] | None = None
    detections: list[Detections] = field(default_factory=list)


class VisionPipeline:
    """A running detection pipeline (implements ``pipelines.base.Pipeline``)."""

    def __init__(
        self,
        config: VisionPipelineConfig,
        ctx: PipelineContext,
        *,
        engine: TensorEngine,
        decoder: Decoder,
        preprocessor: Preprocessor,
        sources: Sequence[FrameSource],
        labels: Sequence[str],
        batch_size: int,
        dynamic_batch: bool,
        close_engine: bool = True,
    ) -> None:
        self.config = config
        self._ctx = ctx
        self._engine = engine
        self._decoder = decoder
        self._extra_names = decoder.extra_input_names()  # fixed per decoder: read once
        self._pre = preprocessor
        self._sources = list(sources)
        self._labels = tuple(labels)
        self._batch = batch_size
        self._dynamic = dynamic_batch
        self._close_engine = close_engine
        self._tensor = preprocessor.spec.tensor
        self._params = _decode_params(config, self._labels)
        self._topic = detections_topic(config.name)
        self._hub = FrameHub(
            [s.name for s in self._sources], config.policy, config.source_queue_size
        )
        qsize = config.stage_queue_size
        self._to_infer: queue.Queue[_Batch | None] = queue.Queue(qsize)
        self._to_post: queue.Queue[_Batch | None] = queue.Queue(qsize)
        self._to_sink: queue.Queue[_Batch | None] = queue.Queue(qsize)
        # batches submitted and not yet decoded: at most one per engine slot, so preprocess
        # always writes into a free slot and a slot's outputs stay put until they are decoded
        self._slots = _engine_slots(engine)
        self._slot_free = threading.Semaphore(self._slots)
        self._stop = threading.Event()
        self._capture_stop = threading.Event()  # set by stop(), or when a bounded run is done
        self._external: threading.Event | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._state: State = "created"
        self._error: str | None = None
        self._workers = WorkerThreads(config.name, ctx.heartbeats, self._fail)
        self._snapshot_for: set[str | None] = set()
        self._latency = {k: LatencyHistogram() for k in LATENCY_STAGES}
        self._cpu = {k: LatencyHistogram() for k in ("preprocess", "postprocess")}
        self._fps_out = RateMeter()
        self._counters = Counters(
            (
                "frames_processed",
                "results_published",
                "batches",
                "preprocess_errors",
                "inference_errors",
                "slow_inferences",
                "stalled_inferences",
                "postprocess_errors",
                "sink_errors",
            )
        )
        self._started_at: float | None = None

    # -- Pipeline protocol -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def finished(self) -> threading.Event:
        """Set when a bounded run (``max_frames`` or ended files) has published everything."""
        return self._done

    def start(self, stop_event: threading.Event) -> None:
        """Check the sources, then start every worker thread.

        A file source that is missing or undecodable raises ``SourceOpenError`` here; a live
        source that cannot open yet is retried by its thread (see ``status()``).
        """
        with self._lock:
            if self._state != "created":
                raise PipelineStateError(
                    f"pipeline {self.name} cannot start: it is {self._state} (build a new one)"
                )
            try:
                for source in self._sources:
                    source.check()
            except BaseException:
                for source in self._sources:
                    source.release()
                raise
            self._external = stop_event
            self._state = "running"
            self._started_at = time.monotonic()
        cfg = self.config
        interval = cfg.heartbeat_interval_s
        for slot, source in enumerate(self._sources):
            worker = f"{self.name}/capture/{source.name}"
            # a stream open/read may block up to its timeout: never report that as a hang
            self._workers.register(worker, max(interval, source.max_block_s() + 2.0))
            link = CaptureLink(self._hub, slot, self._capture_stop, self._ctx.heartbeats, worker)
            source.start(link, pinner(self._ctx.cpus_for(cfg.stages.capture), worker))
        self._spawn("preprocess", cfg.stages.preprocess, self._preprocess_loop)
        self._spawn("inference", cfg.stages.inference, self._inference_loop)
        self._spawn("postprocess", cfg.stages.postprocess, self._postprocess_loop)
        self._spawn("sink", cfg.stages.sink, self._sink_loop)

    def stop(self, timeout_s: float) -> bool:
        """Stop every worker and join them; True if all ended within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._state in ("running", "finished"):
                self._state = "stopping"
        self._shutdown()
        joined = True
        for source in self._sources:
            joined &= source.join(deadline - time.monotonic())
        joined &= self._workers.finish(deadline)
        with self._lock:
            if self._state in ("created", "stopping"):
                self._state = "stopped"
        if joined and self._close_engine:
            self._engine.close()
        elif not joined:
            _log.error(
                "pipeline %s: workers still running after %.1f s; the engine is left open",
                self.name,
                timeout_s,
            )
        return joined

    def status(self) -> dict[str, Any]:
        with self._lock:
            state, error = self._state, self._error
        sources = []
        stale_total = 0
        for slot, source in enumerate(self._sources):
            entry = source.status()
            entry["stale"] = self._hub.stale(slot)
            stale_total += entry["stale"]
            sources.append(entry)
        counters = self._counters.snapshot()
        uptime = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        return {
            "name": self.name,
            "type": "vision",
            "state": state,
            "error": error,
            "uptime_s": round(uptime, 3),
            "model": self.config.model,
            "decoder": self._decoder.name,
            "policy": self.config.policy,
            "batch_size": self._batch,
            "dynamic_batch": self._dynamic,
            "engine_slots": self._slots,
            "topic": self._topic,
            "engine": self._engine.status(),
            "sources": sources,
            "frames": {
                "in": sum(s["frames_delivered"] for s in sources),
                "processed": counters["frames_processed"],
                "published": counters["results_published"],
                "batches": counters["batches"],
            },
            "fps": {
                "in": round(sum(s["fps"] for s in sources), 2),
                "out": round(self._fps_out.rate(), 2),
                "out_average": round(self._fps_out.average(), 2),
            },
            "drops": {
                "stale": stale_total,
                "zero_size": sum(s["zero_size"] for s in sources),
                "rate_limited": sum(s["rate_limited"] for s in sources),
                "preprocess_errors": counters["preprocess_errors"],
                "inference_errors": counters["inference_errors"],
                "postprocess_errors": counters["postprocess_errors"],
                "sink_errors": counters["sink_errors"],
            },
            "inference_waits": {
                "slow": counters["slow_inferences"],
                "stalled": counters["stalled_inferences"],
                "stall_after_s": _STALL_INTERVALS * self.config.heartbeat_interval_s,
            },
            "reconnects": sum(s["reconnects"] for s in sources),
            "settings": self.settings(),
            "latency_ms": {k: h.summary_ms() for k, h in self._latency.items()},
            "cpu_ms": {k: h.summary_ms() for k, h in self._cpu.items()},
            "queues": {
                "frames": self._hub.depth(),
                "to_inference": self._to_infer.qsize(),
                "to_postprocess": self._to_post.qsize(),
                "to_sink": self._to_sink.qsize(),
            },
        }

    # -- commands --------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The live-adjustable settings now in force (see ``update``)."""
        cfg = self.config
        caps = {s.name: s.config.fps_cap for s in self._sources}
        return {
            "score_threshold": cfg.score_threshold,
            "nms_iou": cfg.nms_iou,
            "classes": None if cfg.classes is None else list(cfg.classes),
            "fps_cap": caps,
        }

    def update(
        self,
        *,
        score_threshold: float | _Keep = KEEP,
        nms_iou: float | _Keep = KEEP,
        classes: Sequence[str | int] | _Keep | None = KEEP,
        fps_cap: float | _Keep | None = KEEP,
    ) -> dict[str, Any]:
        """Change settings of the running pipeline; each takes effect with the next batch
        decoded (thresholds, classes) or the next frame read (``fps_cap``, every source;
        ``None`` removes the cap). Checked by the config's own rules first: a bad value raises
        ``PipelineConfigError`` and nothing changes. Thread-safe; returns ``settings()``."""
        changes: dict[str, Any] = {}
        if not isinstance(score_threshold, _Keep):
            changes["score_threshold"] = score_threshold
        if not isinstance(nms_iou, _Keep):
            changes["nms_iou"] = nms_iou
        if not isinstance(classes, _Keep):
            changes["classes"] = None if classes is None else list(classes)
        with self._lock:
            data = self.config.model_dump()
            data.update(changes)
            if not isinstance(fps_cap, _Keep):
                data["sources"] = [{**src, "fps_cap": fps_cap} for src in data["sources"]]
            try:
                config = type(self.config).model_validate(data)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err.get("loc", ()))
                raise PipelineConfigError(
                    f"pipeline {self.name}: {where}: {err.get('msg', 'invalid')}"
                ) from exc
            params = _decode_params(config, self._labels)
            self.config = config
            self._params = params  # one reference swap: the decoder reads it once per batch
            if not isinstance(fps_cap, _Keep):
                for source, src_cfg in zip(self._sources, config.sources, strict=True):
                    source.config = src_cfg
        _log.info("pipeline %s: settings changed: %s", self.name, changes or {"fps_cap": fps_cap})
        return self.settings()

    def request_snapshot(self, source: str | None = None) -> None:
        """Attach a base64 JPEG of the next processed frame (of ``source``, or of any source)
        to its result message."""
        names = {s.name for s in self._sources}
        if source is not None and source not in names:
            raise PipelineError(
                f"pipeline {self.name} has no source {source!r} "
                f"(sources: {', '.join(sorted(names))})"
            )
        with self._lock:
            self._snapshot_for.add(source)

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, role: str, stage: str, body: Callable[[str], None]) -> None:
        cpus = self._ctx.cpus_for(stage)
        self._workers.start(role, body, cpus=cpus, interval_s=self.config.heartbeat_interval_s)

    def _fail(self, error: str) -> None:
        with self._lock:
            self._state = "failed"
            self._error = error
        self._shutdown()

    def _halted(self) -> bool:
        if self._external is not None and self._external.is_set() and not self._stop.is_set():
            self._shutdown()
        return self._stop.is_set()

    def _beat(self, worker: str) -> None:
        self._ctx.heartbeats.beat(worker)

    def _put(self, q: queue.Queue[_Batch | None], item: _Batch | None, worker: str) -> bool:
        while not self._halted():
            self._beat(worker)
            try:
                q.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            return True
        return False

    def _get(self, q: queue.Queue[_Batch | None], worker: str) -> tuple[bool, _Batch | None]:
        """(True, item) when an item (or the end marker ``None``) arrived; (False, None) on stop."""
        while not self._halted():
            self._beat(worker)
            try:
                return True, q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return False, None

    def _sources_done(self) -> bool:
        return all(s.finished for s in self._sources) and self._hub.depth() == 0

    def _preprocess_loop(self, worker: str) -> None:
        cfg = self.config
        remaining = cfg.max_frames
        wait_s = cfg.batch_max_wait_ms / 1e3
        while not self._halted():
            self._beat(worker)
            if remaining is not None and remaining <= 0:
                break
            want = self._batch if remaining is None else min(self._batch, remaining)
            frames = self._hub.take(want, timeout_s=_POLL_S, max_wait_s=wait_s)
            if not frames:
                if self._sources_done():
                    break
                continue
            if not self._acquire_slot(worker):
                return
            batch = self._prepare(frames)
            if batch is None or not self._submit(batch):
                self._slot_free.release()
                continue
            if remaining is not None:
                remaining -= len(batch.frames)
            if not self._put(self._to_infer, batch, worker):
                return
        # bounded run ended (max_frames or every file finished): let the captures go, drain
        if not self._halted():
            self._stop_captures()
            self._put(self._to_infer, None, worker)

    def _shutdown(self) -> None:
        """Stop every worker: the pipeline's stop flag, then the captures."""
        self._stop.set()
        self._stop_captures()

    def _stop_captures(self) -> None:
        """Stop the capture threads (the downstream workers keep draining)."""
        self._capture_stop.set()
        self._hub.close()

    def _acquire_slot(self, worker: str) -> bool:
        """Wait until fewer than ``slots`` engine calls are outstanding."""
        while not self._halted():
            self._beat(worker)
            if self._slot_free.acquire(timeout=_POLL_S):
                return True
        return False

    def _prepare(self, frames: list[Frame]) -> _Batch | None:
        """Write ``frames`` into the engine's next input buffer (batch slots 0..n-1)."""
        start = time.monotonic()
        cpu0 = time.thread_time()
        buffer = self._engine.input_buffer(self._tensor, self._pre.input_shape)
        batch = _Batch(frames=[], pre_start=start)
        for frame in frames:
            try:
                meta = self._pre.prepare(frame.image, buffer, len(batch.metas))
            except PipelineError as exc:
                self._counters.add("preprocess_errors")
                _log.warning(
                    "pipeline %s: frame %d of %s skipped: %s",
                    self.name,
                    frame.index,
                    frame.source,
                    exc,
                )
                continue
            batch.frames.append(frame)
            batch.metas.append(meta)
        if not batch.frames:
            return None
        if self._extra_names:
            out = {
                name: self._engine.input_buffer(name, (self._batch, 2))
                for name in self._extra_names
            }
            self._decoder.extra_inputs(batch.metas, out)
        batch.pre_s = time.monotonic() - start
        self._cpu["preprocess"].record((time.thread_time() - cpu0) / len(batch.frames))
        return batch

    def _submit(self, batch: _Batch) -> bool:
        try:
            batch.ticket = self._engine.submit()
        except EngineError as exc:
            self._counters.add("inference_errors")
            _log.error("pipeline %s: engine refused a batch, dropped: %s", self.name, exc)
            return False
        batch.submitted = time.monotonic()
        return True

    def _inference_loop(self, worker: str) -> None:
        engine_free_at = 0.0
        while True:
            got, batch = self._get(self._to_infer, worker)
            if not got:
                return
            if batch is None:
                self._put(self._to_post, None, worker)
                return
            if batch.ticket is None:  # pragma: no cover - set by the preprocess stage
                continue
            try:
                # engine-owned outputs: valid until this slot runs again, which cannot happen
                # before postprocess releases the slot token
                outputs = self._collect(batch.ticket, worker)
            except EngineError as exc:  # the engine has released the ticket: drop the batch
                self._slot_free.release()
                self._counters.add("inference_errors")
                _log.error("pipeline %s: inference failed, batch dropped: %s", self.name, exc)
                continue
            if outputs is None:  # stopped while waiting
                return
            batch.outputs = outputs
            done = time.monotonic()
            # the engine runs one call at a time, in order: this one started when it was
            # submitted or when the previous one finished, whichever came later
            batch.infer_s = done - max(batch.submitted, engine_free_at)
            engine_free_at = done
            self._counters.add("batches")
            if not self._put(self._to_post, batch, worker):
                return

    def _collect(self, ticket: Ticket, worker: str) -> dict[str, npt.NDArray[Any]] | None:
        """``ticket``'s outputs, waited for in ``_POLL_S`` slices with a beat between them;
        None on stop.

        A slice that times out (``InferenceTimeoutError``) leaves the ticket outstanding and is
        simply waited again: a slow engine is never a failure. A call slower than the heartbeat
        interval is counted as slow; one still running after ``_STALL_INTERVALS`` intervals is
        stalled: logged once, and this worker stops beating (the watchdog sees it stale) until
        the call ends or the pipeline stops.
        """
        interval = self.config.heartbeat_interval_s
        stall_s = _STALL_INTERVALS * interval
        start = time.monotonic()
        stalled = False
        while not self._halted():
            waited = time.monotonic() - start
            if waited < stall_s:
                self._beat(worker)
            elif not stalled:
                stalled = True
                self._counters.add("stalled_inferences")
                _log.error(
                    "pipeline %s: inference (ticket #%d) still running after %.1f s (%d "
                    "heartbeat intervals): the engine looks stalled; %s stops beating so the "
                    "watchdog sees it",
                    self.name,
                    ticket.sequence,
                    waited,
                    _STALL_INTERVALS,
                    worker,
                )
            try:
                outputs = self._engine.collect(ticket, timeout_s=_POLL_S)
            except InferenceTimeoutError:
                continue  # still running: the ticket is outstanding, wait again
            waited = time.monotonic() - start
            if waited > interval:
                self._counters.add("slow_inferences")
            if stalled:
                _log.warning(
                    "pipeline %s: the stalled inference (ticket #%d) finished after %.1f s",
                    self.name,
                    ticket.sequence,
                    waited,
                )
            return outputs
        return None

    def _postprocess_loop(self, worker: str) -> None:
        while True:
            got, batch = self._get(self._to_post, worker)
            if not got:
                return
            if batch is None:
                self._put(self._to_sink, None, worker)
                return
            start = time.monotonic()
            cpu0 = time.thread_time()
            try:
                if batch.outputs is None:  # pragma: no cover - set by the inference stage
                    continue
                params = self._params  # read once: update() may swap it
                batch.detections = self._decoder.decode(batch.outputs, batch.metas, params)
            except PipelineError as exc:
                self._counters.add("postprocess_errors")
                _log.error("pipeline %s: decoding failed, batch dropped: %s", self.name, exc)
                continue
            finally:
                batch.outputs = None
                self._slot_free.release()  # the engine may now reuse this slot's outputs
            batch.post_s = time.monotonic() - start
            self._cpu["postprocess"].record((time.thread_time() - cpu0) / len(batch.frames))
            if not self._put(self._to_sink, batch, worker):
                return

    def _sink_loop(self, worker: str) -> None:
        while True:
            got, batch = self._get(self._to_sink, worker)
            if not got:
                return
            if batch is None:
                with self._lock:
                    if self._state == "running":
                        self._state = "finished"
                self._done.set()
                return
            self._publish(batch)

    def _publish(self, batch: _Batch) -> None:
        cfg = self.config
        for frame, dets in zip(batch.frames, batch.detections, strict=True):
            snapshot = self._take_snapshot(frame)
            now = time.monotonic()
            latency = {
                "wait": max(0.0, batch.pre_start - frame.monotonic),
                "preprocess": batch.pre_s,
                "inference": batch.infer_s,
                "postprocess": batch.post_s,
                "end_to_end": now - frame.monotonic,
            }
            message = build_result(
                pipeline=self.name,
                source=frame.source,
                frame_index=frame.index,
                wall_time=frame.wall_time,
                monotonic=frame.monotonic,
                detections=dets,
                labels=self._labels,
                latency_s=latency,
                fingerprint=frame_fingerprint(frame.image) if cfg.fingerprint else None,
                snapshot=snapshot,
            )
            self._counters.add("frames_processed")
            for key, value in latency.items():
                self._latency[key].record(value)
            sent = time.monotonic()
            try:
                self._ctx.sink.publish(self._topic, message)
            except Exception as exc:  # noqa: BLE001 - a failing sink must not kill the pipeline
                self._counters.add("sink_errors")
                _log.error("pipeline %s: sink refused a result: %s", self.name, exc)
                continue
            self._latency["sink"].record(time.monotonic() - sent)
            self._counters.add("results_published")
            self._fps_out.mark()

    def _take_snapshot(self, frame: Frame) -> dict[str, Any] | None:
        with self._lock:
            if not self._snapshot_for:
                return None
            if frame.source in self._snapshot_for:
                self._snapshot_for.discard(frame.source)
            elif None in self._snapshot_for:
                self._snapshot_for.discard(None)
            else:
                return None
        return encode_snapshot(frame.image, self.config.snapshot_quality)


def _engine_slots(engine: TensorEngine) -> int:
    """In-flight calls the engine takes (its ``slots`` in status; 1 if it does not say)."""
    slots = engine.status().get("slots", 1)
    return slots if isinstance(slots, int) and slots >= 1 else 1


def _decode_params(config: VisionPipelineConfig, labels: Sequence[str]) -> DecodeParams:
    """The decoder's post-processing settings from a pipeline config."""
    return DecodeParams(
        score_threshold=config.score_threshold,
        nms_iou=config.nms_iou,
        max_detections=config.max_detections,
        class_allowlist=_allowlist(config.classes, labels),
    )


def _allowlist(classes: Sequence[str | int] | None, labels: Sequence[str]) -> frozenset[int] | None:
    if classes is None:
        return None
    ids: set[int] = set()
    index = {label: i for i, label in enumerate(labels)}
    for item in classes:
        if isinstance(item, int):
            if labels and not 0 <= item < len(labels):
                raise PipelineConfigError(
                    f"class id {item} in `classes` is outside the model's {len(labels)} classes"
                )
            ids.add(item)
        elif item in index:
            ids.add(index[item])
        else:
            raise PipelineConfigError(
                f"class {item!r} in `classes` is not a label of this model "
                f"(e.g. {', '.join(list(labels)[:5])})"
            )
    return frozenset(ids)
