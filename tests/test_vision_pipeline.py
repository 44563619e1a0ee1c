"""The vision pipeline end to end: real ONNX Runtime on the real YOLOX-nano / DEIMv2 models, the
real sample video (file and over a real local HTTP server), a real in-memory sink and the agent's
real heartbeat registry."""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from vision_support import MemorySink, VideoServer, make_context, vision_config

from agent.defaults import default_config
from pipelines.errors import (
    DecoderMismatchError,
    PipelineConfigError,
    PipelineError,
    SourceOpenError,
)
from pipelines.factory import build_pipeline
from pipelines.vision.metrics import LatencyHistogram, RateMeter
from pipelines.vision.pipeline import VisionPipeline
from pipelines.vision.results import ResultMessage, frame_fingerprint

STOP_S = 10.0


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def started() -> Iterator[list[VisionPipeline]]:
    """Pipelines a test started; stopped (and checked to stop) afterwards."""
    pipelines: list[VisionPipeline] = []
    yield pipelines
    for pipeline in pipelines:
        assert pipeline.stop(STOP_S), f"{pipeline.name} did not stop"


def _build(config_kwargs: dict, ctx) -> VisionPipeline:  # type: ignore[no-untyped-def]
    pipeline = build_pipeline(vision_config(**config_kwargs), ctx)
    assert isinstance(pipeline, VisionPipeline)
    return pipeline


def test_all_policy_bounded_run_gives_every_frame_in_order(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    ctx, watchdog = make_context(models_dir, data_dir, tmp_path, sink)
    n = 120  # bicycles enter the scene at frame 77
    pipeline = _build({"name": "street", "max_frames": n}, ctx)
    started.append(pipeline)
    pipeline.start(threading.Event())
    # every worker registered with the heartbeat registry
    workers = set(watchdog.status()["workers"])
    assert {
        "street/capture/file0",
        "street/preprocess",
        "street/inference",
        "street/postprocess",
        "street/sink",
    } <= workers
    beating = threading.Event()
    seen: set[str] = set()

    def all_beating() -> None:
        # every worker beats every loop: each one is seen with more than its first beat
        while not beating.is_set():
            state = watchdog.status()["workers"]
            seen.update(w for w in workers if state.get(w, {"beats": 0})["beats"] > 1)
            if seen == workers:
                beating.set()
            time.sleep(0.005)

    watcher = threading.Thread(target=all_beating, daemon=True)
    watcher.start()
    assert pipeline.finished.wait(60), pipeline.status()
    assert beating.wait(5), workers - seen
    messages = sink.messages("street")
    assert len(messages) == n
    assert [m["frame_index"] for m in messages] == list(range(n))
    assert sink.topics() == {"vision/street/detections"}
    labels: set[str] = set()
    for message in messages:
        ResultMessage.model_validate(message)
        labels.update(message["counts"])
        for det in message["detections"]:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 < x2 <= 640
            assert 0 <= y1 < y2 <= 272
            assert det["score"] >= 0.3
    assert {"person", "bicycle", "car"} <= labels
    status = pipeline.status()
    assert status["state"] == "finished"
    assert status["frames"]["published"] == n
    assert status["drops"]["stale"] == 0  # policy all never drops
    for stage in ("wait", "preprocess", "inference", "postprocess", "end_to_end"):
        summary = status["latency_ms"][stage]
        assert summary["count"] == n
        assert summary["p50"] <= summary["p95"] <= summary["p99"] <= summary["max"]
    # a finished run's workers end and unregister: none is left to go stale in the watchdog
    deadline = time.monotonic() + STOP_S
    while any(w.startswith("street/") for w in watchdog.status()["workers"]):
        assert time.monotonic() < deadline, watchdog.status()
        time.sleep(0.05)
    assert watchdog.stale_workers() == []


def test_latest_policy_drops_stale_frames_under_a_slow_sink(
    models_dir: Path, data_dir: Path, tmp_path: Path, started: list
) -> None:
    slow = MemorySink(delay_s=0.08)
    ctx, _ = make_context(models_dir, data_dir, tmp_path, slow)
    looped = [{"type": "file", "path": "bikes-video", "loop": True}]
    pipeline = _build({"policy": "latest", "max_frames": 12, "sources": looped}, ctx)
    started.append(pipeline)
    pipeline.start(threading.Event())
    assert pipeline.finished.wait(60), pipeline.status()
    messages = slow.messages()
    indices = [m["frame_index"] for m in messages]
    assert len(indices) == 12
    assert indices == sorted(indices)
    assert len(set(indices)) == 12
    status = pipeline.status()
    assert status["drops"]["stale"] > 0
    assert indices[-1] > 11  # frames were skipped: the newest one always won
    assert status["frames"]["processed"] == 12
    assert status["sources"][0]["frames_delivered"] >= status["drops"]["stale"] + 12


def test_missing_video_fails_its_pipeline_only(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    broken = _build(
        {"name": "broken", "sources": [{"type": "file", "path": "videos/nope.mp4"}]}, ctx
    )
    good = _build({"name": "good", "max_frames": 10}, ctx)
    started.extend([broken, good])
    stop = threading.Event()
    with pytest.raises(SourceOpenError, match=r"videos/nope\.mp4.*not found"):
        broken.start(stop)
    good.start(stop)
    assert good.finished.wait(60)
    assert len(sink.messages("good")) == 10
    assert sink.messages("broken") == []


def test_unsupported_video_file_is_a_clear_error(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    bogus = tmp_path / "clip.mp4"
    bogus.write_text("this is not a video\n")
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    pipeline = _build({"sources": [{"type": "file", "path": str(bogus)}]}, ctx)
    started.append(pipeline)
    with pytest.raises(SourceOpenError, match=r"clip\.mp4 cannot be opened|no frame decodes"):
        pipeline.start(threading.Event())


def test_stream_that_dies_mid_run_is_reconnected(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    payload = (data_dir / "videos" / "bikes.mp4").read_bytes()
    server = VideoServer(payload, bytes_per_s=400_000)  # ~1.3 s for the whole file
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    source = {
        "type": "stream",
        "url": server.url,
        "retry_initial_s": 0.1,
        "retry_max_s": 0.4,
        "open_timeout_s": 2,
        "read_timeout_s": 2,
    }
    pipeline = _build({"name": "cam", "sources": [source]}, ctx)
    started.append(pipeline)
    pipeline.start(threading.Event())
    assert sink.wait_for(5, 30), pipeline.status()
    server.kill()  # mid-transfer: the rest of the file never arrives
    deadline = time.monotonic() + 30
    while pipeline.status()["sources"][0]["open_failures"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    lost = pipeline.status()["sources"][0]
    assert lost["lost"] >= 1
    assert lost["open_failures"] >= 2, lost  # retried while the server was down
    assert lost["state"] in ("retrying", "reconnecting")
    assert "cannot be opened" in (lost["last_error"] or "")
    before = len(sink.messages("cam"))
    assert before < 250  # the transfer really was cut short
    # the camera comes back on the same port: the source reconnects and frames flow again
    revived = VideoServer(payload, port=server.port, bytes_per_s=4e6)
    try:
        assert sink.wait_for(before + 5, 30, "cam"), pipeline.status()
        status = pipeline.status()
        assert status["state"] == "running"
        assert status["sources"][0]["reconnects"] >= 1
        assert status["reconnects"] >= 1
    finally:
        assert pipeline.stop(STOP_S)
        revived.kill()


def test_stop_joins_every_thread_and_unregisters_heartbeats(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink
) -> None:
    ctx, watchdog = make_context(models_dir, data_dir, tmp_path, sink)
    pipeline = _build(
        {
            "name": "loop",
            "policy": "latest",
            "sources": [{"type": "file", "path": "bikes-video", "loop": True}],
        },
        ctx,
    )
    pipeline.start(threading.Event())
    assert sink.wait_for(5, 30)
    assert pipeline.stop(STOP_S)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("loop/")]
    assert alive == []
    assert not any(w.startswith("loop/") for w in watchdog.status()["workers"])
    assert pipeline.status()["state"] == "stopped"
    count = len(sink.messages())
    time.sleep(0.3)
    assert len(sink.messages()) == count  # nothing published after stop


def test_agent_stop_event_stops_the_pipeline(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    pipeline = _build({"sources": [{"type": "file", "path": "bikes-video", "loop": True}]}, ctx)
    stop = threading.Event()
    pipeline.start(stop)
    assert sink.wait_for(3, 30)
    stop.set()
    deadline = time.monotonic() + STOP_S
    while any(t.name.startswith("test/") and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "workers ignored the agent's stop event"
        time.sleep(0.05)
    assert pipeline.stop(STOP_S)


def test_decoder_that_does_not_fit_the_model_fails_at_build(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    with pytest.raises(DecoderMismatchError) as info:
        build_pipeline(vision_config(decoder="yolov8"), ctx)
    message = str(info.value)
    assert "'yolov8'" in message
    assert "[1, 3549, 85]" in message  # what the model has
    assert "84" in message  # what the decoder expected: 4 + 80 classes


def test_class_allow_list_by_label_and_unknown_label(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    with pytest.raises(PipelineConfigError, match="'unicorn'"):
        build_pipeline(vision_config(classes=["unicorn"]), ctx)
    pipeline = _build({"classes": ["bicycle", 2], "max_frames": 100}, ctx)
    started.append(pipeline)
    pipeline.start(threading.Event())
    assert pipeline.finished.wait(60)
    labels = {d["label"] for m in sink.messages() for d in m["detections"]}
    assert labels == {"bicycle", "car"}


def test_fingerprint_and_snapshot_on_demand(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    pipeline = _build({"fingerprint": True, "max_frames": 8, "stage_queue_size": 1}, ctx)
    started.append(pipeline)
    pipeline.request_snapshot()
    pipeline.start(threading.Event())
    assert pipeline.finished.wait(60)
    messages = sink.messages()
    # the fingerprint is the sha256 of exactly the frame OpenCV decodes at that index
    capture = cv2.VideoCapture(str(data_dir / "videos" / "bikes.mp4"))
    try:
        for message in messages:
            ok, image = capture.read()
            assert ok
            assert message["fingerprint"] == frame_fingerprint(image)
    finally:
        capture.release()
    snapshots = [m for m in messages if "snapshot" in m]
    assert len(snapshots) == 1  # one request, one snapshot
    jpeg = base64.b64decode(snapshots[0]["snapshot"]["data_base64"])
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (272, 640, 3)
    with pytest.raises(PipelineError, match="no source 'nope'"):
        pipeline.request_snapshot("nope")


def test_frames_of_two_sources_share_batched_engine_calls(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink, started: list
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    sources = [
        {"type": "file", "name": "left", "path": "videos/bikes.mp4"},
        {"type": "file", "name": "right", "path": "bikes-video"},
    ]
    pipeline = _build(
        {
            "model": "deimv2_hgnetv2_atto_coco",
            "sources": sources,
            "max_frames": 20,
            "batch_max_wait_ms": 200,
        },
        ctx,
    )
    started.append(pipeline)
    pipeline.start(threading.Event())
    assert pipeline.finished.wait(60)
    status = pipeline.status()
    assert status["batch_size"] == 2
    assert status["dynamic_batch"] is True
    assert status["frames"]["processed"] == 20
    assert status["frames"]["batches"] < 20  # frames were gathered into shared calls
    by_source: dict[str, list[int]] = {"left": [], "right": []}
    for message in sink.messages():
        by_source[message["source"]].append(message["frame_index"])
        ResultMessage.model_validate(message)
    for indices in by_source.values():
        assert indices == list(range(len(indices)))  # in order per source
    assert by_source["left"]
    assert by_source["right"]
    # the same frame from both sources gives the same detections through one batched call
    left = {m["frame_index"]: m["detections"] for m in sink.messages() if m["source"] == "left"}
    right = {m["frame_index"]: m["detections"] for m in sink.messages() if m["source"] == "right"}
    common = sorted(set(left) & set(right))
    assert common
    for index in common:
        assert [d["label"] for d in left[index]] == [d["label"] for d in right[index]]


def test_fixed_batch_model_rejects_a_larger_batch_size(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink
) -> None:
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    with pytest.raises(PipelineConfigError, match="fixed batch of 1"):
        build_pipeline(vision_config(batch_size=4), ctx)


def test_default_config_is_the_street_demo(tmp_path: Path) -> None:
    config = default_config({"STATE_DIRECTORY": str(tmp_path)})
    pipeline, llm = config.pipelines
    assert llm.type == "llm"
    assert llm.narrator is not None
    assert llm.narrator.pipelines == ["street"]
    assert pipeline.type == "vision"
    assert pipeline.model == "yolox_nano_416"
    assert pipeline.engine.type == "onnxruntime"
    assert pipeline.engine.providers == ["CPUExecutionProvider"]
    (source,) = pipeline.sources
    assert source.type == "file"
    assert source.path == "bikes-video"
    assert source.loop
    assert pipeline.policy == "latest"
    assert config.reporting.jsonl is not None
    assert config.reporting.jsonl.path == "-"


def test_latency_histogram_percentiles_track_numpy() -> None:
    rng = np.random.default_rng(7)
    samples = rng.lognormal(mean=-4.0, sigma=0.6, size=5000)
    histogram = LatencyHistogram()
    for value in samples:
        histogram.record(float(value))
    for q in (50, 95, 99):
        estimate = histogram.percentile(q)
        assert estimate is not None
        assert estimate == pytest.approx(float(np.percentile(samples, q)), rel=0.03)
    assert histogram.summary_ms()["count"] == 5000
    assert LatencyHistogram().summary_ms()["p50"] is None


def test_rate_meter_counts_events_per_second() -> None:
    meter = RateMeter(window_s=2)
    base = math.floor(time.monotonic()) + 10.0
    for i in range(60):
        meter.mark(now=base + i * 0.05)  # 20 events per second for 3 s
    assert meter.total == 60
    assert meter.rate(now=base + 3.0) == pytest.approx(20.0)


def _link_target(entry: Path) -> Path | None:
    try:
        return entry.readlink()
    except OSError:  # closed between listing and reading
        return None


def _open_fds_to(path: Path) -> int:
    return sum(1 for entry in Path("/proc/self/fd").iterdir() if _link_target(entry) == path)


def test_failed_start_releases_the_sources_it_already_opened(
    models_dir: Path, data_dir: Path, tmp_path: Path, sink: MemorySink
) -> None:
    video = (data_dir / "videos" / "bikes.mp4").resolve()
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    sources = [
        {"type": "file", "name": "ok", "path": str(video)},
        {"type": "file", "name": "gone", "path": "videos/gone.mp4"},
    ]
    pipeline = _build({"sources": sources}, ctx)
    before = _open_fds_to(video)
    with pytest.raises(SourceOpenError, match="gone"):
        pipeline.start(threading.Event())
    assert _open_fds_to(video) == before
    assert pipeline.stop(STOP_S)
    assert pipeline.status()["state"] == "stopped"
