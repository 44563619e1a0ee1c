"""VisionPipeline.update: live changes of thresholds, class allow-list and fps cap on a running
pipeline (real ONNX Runtime, YOLOX-nano, the real video)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from vision_support import MemorySink, make_context, vision_config

from pipelines.errors import PipelineConfigError
from pipelines.factory import build_vision_pipeline
from pipelines.vision.pipeline import VisionPipeline

# Frames that can be past the decoder when update() returns: source queue (1), three stage
# queues (1 each), one frame in each of the four workers, one in the capture thread, plus
# the engine slots' batches: far below this margin.
IN_FLIGHT_MARGIN = 24


def _labels(messages: list[dict[str, object]]) -> set[str]:
    return {str(d["label"]) for m in messages for d in m["detections"]}  # type: ignore[attr-defined]


def _start(models_dir: Path, data_dir: Path, tmp_path: Path) -> tuple[VisionPipeline, MemorySink]:
    sink = MemorySink()
    ctx, _ = make_context(models_dir, data_dir, tmp_path, sink)
    config = vision_config(
        source_queue_size=1,
        stage_queue_size=1,
        score_threshold=0.25,
        sources=[{"type": "file", "path": "videos/bikes.mp4", "loop": True}],
    )
    pipeline = build_vision_pipeline(config, ctx)
    pipeline.start(threading.Event())
    return pipeline, sink


def test_class_allow_list_and_threshold_change_while_running(
    models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    pipeline, sink = _start(models_dir, data_dir, tmp_path)
    try:
        assert sink.wait_for(40, 120)
        before = sink.messages()
        assert {"person", "car"} <= _labels(before)
        published = max(int(m["frame_index"]) for m in sink.messages())
        settings = pipeline.update(classes=["person"], score_threshold=0.5)
        assert settings["classes"] == ["person"]
        assert settings["score_threshold"] == 0.5
        assert pipeline.status()["settings"] == settings
        assert sink.wait_for(len(sink.messages()) + IN_FLIGHT_MARGIN + 20, 120)
        after = [m for m in sink.messages() if m["frame_index"] > published + IN_FLIGHT_MARGIN]
        assert after
        assert _labels(after) == {"person"}
        scores = [d["score"] for m in after for d in m["detections"]]  # type: ignore[attr-defined]
        assert scores
        assert min(scores) > 0.5
        # back to every class: the other labels return
        published = max(int(m["frame_index"]) for m in sink.messages())
        pipeline.update(classes=None, score_threshold=0.25)
        assert sink.wait_for(len(sink.messages()) + IN_FLIGHT_MARGIN + 40, 120)
        again = [m for m in sink.messages() if m["frame_index"] > published + IN_FLIGHT_MARGIN]
        assert "car" in _labels(again)
    finally:
        assert pipeline.stop(10)


def test_bad_values_change_nothing_and_fps_cap_reaches_every_source(
    models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    pipeline, sink = _start(models_dir, data_dir, tmp_path)
    try:
        original = pipeline.settings()
        with pytest.raises(PipelineConfigError, match="score_threshold"):
            pipeline.update(score_threshold=1.5, classes=["person"])
        with pytest.raises(PipelineConfigError, match="not a label"):
            pipeline.update(classes=["unicorn"])
        with pytest.raises(PipelineConfigError, match="fps_cap"):
            pipeline.update(fps_cap=0)
        with pytest.raises(PipelineConfigError, match="nms_iou"):
            pipeline.update(nms_iou=0.0)
        assert pipeline.settings() == original
        settings = pipeline.update(fps_cap=7.5, nms_iou=0.6)
        assert settings["fps_cap"] == {"file0": 7.5}
        assert settings["nms_iou"] == 0.6
        assert pipeline.config.sources[0].fps_cap == 7.5
        assert pipeline.update(fps_cap=None)["fps_cap"] == {"file0": None}
        assert sink.wait_for(5, 60)
        assert pipeline.status()["state"] == "running"
    finally:
        assert pipeline.stop(10)
