"""A real vision pipeline (YOLOX-nano on the sample video) reporting over HID through a FIFO:
what the host decodes matches what the pipeline published, and a host that stops reading
costs the pipeline nothing (every frame still processed, HID drops counted)."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
from vision_support import MemorySink, make_context, vision_config

from agent.hid.protocol import REPORT_SIZE, Kind, Reassembler, decode_announce, decode_detections
from agent.hid_config import HidConfig
from agent.reporting import FanoutSink
from agent.reporting.hid import HidSink
from pipelines.factory import build_pipeline

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
FRAMES = 30


def run_pipeline(
    models_dir: Path, data_dir: Path, state: Path, hid: HidSink, frames: int
) -> tuple[MemorySink, dict[str, object]]:
    memory = MemorySink()
    ctx, _ = make_context(models_dir, data_dir, state, FanoutSink([memory, hid]))
    pipeline = build_pipeline(vision_config(name="street", max_frames=frames), ctx)
    pipeline.start(threading.Event())
    try:
        assert pipeline.finished.wait(120), pipeline.status()  # type: ignore[attr-defined]
    finally:
        assert pipeline.stop(10)
    return memory, pipeline.status()


def fifo_with_reader(tmp_path: Path, pipe_bytes: int) -> tuple[Path, int]:
    path = tmp_path / "hidg0"
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(rfd, F_SETPIPE_SZ, pipe_bytes)
    return path, rfd


def read_all(rfd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(rfd, 1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_pipeline_results_decoded_on_the_host(
    models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    path, rfd = fifo_with_reader(tmp_path, 1 << 20)
    try:
        hid = HidSink(HidConfig.model_validate({"gadget": {"device": str(path)}}))
        memory, status = run_pipeline(models_dir, data_dir, tmp_path, hid, FRAMES)
        assert hid.flush(10)
        hid_status = hid.status()
        hid.close()
        data = read_all(rfd)
    finally:
        os.close(rfd)
    assert hid_status["dropped_total"] == 0
    published = {m["frame_index"]: m for m in memory.messages("street")}
    assert len(published) == FRAMES
    reasm = Reassembler()
    labels: dict[int, str] = {}
    summaries = []
    for msg in reasm.feed_all(data[i : i + REPORT_SIZE] for i in range(0, len(data), REPORT_SIZE)):
        if msg.kind == Kind.ANNOUNCE:
            labels.update(decode_announce(msg.payload)[2])
        elif msg.kind == Kind.DETECTIONS:
            summaries.append((decode_detections(msg.payload), dict(labels)))
    assert reasm.stats.lost == reasm.stats.corrupt == 0
    assert [s.frame_index for s, _ in summaries] == list(range(FRAMES))
    seen_any = False
    for s, names in summaries:
        sent = published[s.frame_index]
        assert s.total == len(sent["detections"])
        counts = {names[c]: n for c, n in s.counts}
        if not s.more_classes:
            assert counts == sent["counts"]
        for box, det in zip(s.boxes, sent["detections"], strict=False):
            seen_any = True
            assert names[box.class_id] == det["label"]
            assert box.score == pytest.approx(det["score"], abs=0.5 / 255 + 1e-6)
            assert box.box == pytest.approx(
                [min(1.0, max(0.0, v)) for v in det["box_norm"]], abs=0.5 / 255 + 1e-6
            )
    assert seen_any  # the video has people in it from the first frames
    assert status["frames"]["published"] == FRAMES  # type: ignore[index]


def test_host_that_stops_reading_does_not_slow_the_pipeline(
    models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    path, rfd = fifo_with_reader(tmp_path, 4096)  # room for 64 reports; nobody reads
    try:
        hid = HidSink(
            HidConfig.model_validate(
                {"gadget": {"device": str(path)}, "queue_reports": 8, "report_timeout_ms": 5}
            )
        )
        memory, status = run_pipeline(models_dir, data_dir, tmp_path, hid, FRAMES * 2)
        assert hid.flush(10)
        hid_status = hid.status()
        hid.close()
    finally:
        os.close(rfd)
    assert len(memory.messages("street")) == FRAMES * 2  # every frame reached every reporter
    assert status["frames"]["published"] == FRAMES * 2  # type: ignore[index]
    vendor = hid_status["vendor"]
    assert vendor["reports_written"] == 4096 // REPORT_SIZE  # the pipe filled up, then no more
    assert vendor["messages_dropped"] > 0
    assert vendor["messages_written"] + vendor["messages_dropped"] == vendor["messages_submitted"]
    assert hid_status["dropped_total"] == vendor["messages_dropped"]
