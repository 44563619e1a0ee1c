"""The HID reporter (ResultSink) on a real FIFO: routing, splitting, announces, bad input."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import AgentConfig, ReportingConfig
from agent.errors import HidDeviceError
from agent.hid.filters import topic_matches
from agent.hid.protocol import (
    FRAGMENT_PAYLOAD_BYTES,
    REPORT_SIZE,
    Kind,
    Reassembler,
    decode_announce,
    decode_detections,
    decode_json,
    decode_text,
)
from agent.hid_config import HidConfig, HidKeyboardConfig
from agent.reporting import open_reporting
from agent.reporting.hid import HidSink
from pipelines.errors import SinkError
from pipelines.vision.detections import Detections
from pipelines.vision.results import build_result

LABELS = ("person", "bicycle", "car")


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "hidg0"
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(rfd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    try:
        yield path, rfd
    finally:
        os.close(rfd)


def read_messages(rfd: int) -> tuple[list[tuple[int, bytes]], Reassembler]:
    data = b""
    while True:
        try:
            chunk = os.read(rfd, 1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    assert len(data) % REPORT_SIZE == 0
    reasm = Reassembler()
    msgs = reasm.feed_all(data[i : i + REPORT_SIZE] for i in range(0, len(data), REPORT_SIZE))
    return [(m.kind, m.payload) for m in msgs], reasm


def vision_message(frame: int, class_ids: list[int]) -> dict[str, Any]:
    n = len(class_ids)
    boxes = np.array([[10 * i, 5, 10 * i + 40, 100] for i in range(n)], np.float32).reshape(n, 4)
    dets = Detections(
        boxes=boxes,
        scores=np.linspace(0.9, 0.5, n, dtype=np.float32),
        class_ids=np.array(class_ids, np.int32),
        width=640,
        height=272,
    )
    return build_result(
        pipeline="street", source="file0", frame_index=frame, wall_time=0.0, monotonic=0.0,
        detections=dets, labels=LABELS, latency_s={"end_to_end": 0.01},
    )  # fmt: skip


def sink_for(path: Path, **cfg: Any) -> HidSink:
    return HidSink(HidConfig.model_validate({"gadget": {"device": str(path)}, **cfg}))


def test_detections_become_one_report_after_an_announce(fifo: tuple[Path, int]) -> None:
    path, rfd = fifo
    sink = sink_for(path)
    msg = vision_message(42, [0, 0, 1, 2, 0])
    sink.publish("vision/street/detections", msg)
    sink.publish("vision/street/detections", vision_message(43, [0]))
    assert sink.flush(5)
    sink.close()
    got, reasm = read_messages(rfd)
    assert [k for k, _ in got] == [Kind.ANNOUNCE, Kind.DETECTIONS, Kind.DETECTIONS]
    announce_reports = -(-len(got[0][1]) // FRAGMENT_PAYLOAD_BYTES)
    assert reasm.stats.reports == announce_reports + 2  # each summary is exactly one report
    assert decode_announce(got[0][1]) == (
        0, "vision/street/detections", {0: "person", 1: "bicycle", 2: "car"}
    )  # fmt: skip
    s = decode_detections(got[1][1])
    assert (s.stream, s.frame_index, s.total) == (0, 42, 5)
    assert dict(s.counts) == {0: 3, 1: 1, 2: 1}
    assert {LABELS[c]: n for c, n in s.counts} == msg["counts"]
    for box, det in zip(s.boxes, msg["detections"], strict=False):
        assert box.class_id == det["class_id"]
        assert np.allclose(box.box, det["box_norm"], atol=0.5 / 255 + 1e-6)
        assert abs(box.score - det["score"]) <= 0.5 / 255 + 1e-6


def test_announce_repeats_on_new_label_and_interval(fifo: tuple[Path, int]) -> None:
    path, rfd = fifo
    now = [0.0]
    cfg = HidConfig.model_validate({"gadget": {"device": str(path)}, "announce_interval_s": 10})
    sink = HidSink(cfg, clock=lambda: now[0])
    topic = "vision/street/detections"
    sink.publish(topic, vision_message(0, [0]))
    sink.publish(topic, vision_message(1, [0]))  # nothing new: no announce
    sink.publish(topic, vision_message(2, [2]))  # "car" is new: announce
    now[0] = 10.0
    sink.publish(topic, vision_message(3, [2]))  # interval over: announce again
    sink.publish("vision/yard/detections", vision_message(0, []))  # a second stream
    assert sink.flush(5)
    assert sink.status()["streams"] == {topic: 0, "vision/yard/detections": 1}
    sink.close()
    got, _ = read_messages(rfd)
    kinds = [k for k, _ in got]
    assert kinds == [4, 1, 1, 4, 1, 4, 1, 4, 1]
    assert decode_announce(got[3][1])[2] == {0: "person", 2: "car"}
    assert decode_announce(got[7][1])[:2] == (1, "vision/yard/detections")


def test_llm_text_split_across_reports_and_reassembled(fifo: tuple[Path, int]) -> None:
    path, rfd = fifo
    sink = sink_for(path)
    text = "Zwei Radfahrer überqueren die Kreuzung — 🚲🚲. " * 30
    sink.publish("llm/req-1/result", {"request_id": "req-1", "text": text, "status": "ok"})
    sink.publish("llm/req-1/stream", {"text": "partial"})  # not a text topic by default
    assert sink.flush(5)
    sink.close()
    got, reasm = read_messages(rfd)
    assert len(got) == 1
    assert decode_text(got[0][1]) == ("llm/req-1/result", text)
    assert reasm.stats.reports > 30  # really split
    assert sink.status()["ignored"] == 1


def test_json_topics_send_the_whole_message(fifo: tuple[Path, int]) -> None:
    path, rfd = fifo
    sink = sink_for(path, json_topics=["vision/+/events"], text_topics=[])
    event = {"kind": "line_crossed", "count": 3, "labels": ["car"]}
    sink.publish("vision/street/events", event)
    assert sink.flush(5)
    sink.close()
    got, _ = read_messages(rfd)
    assert decode_json(got[0][1]) == {"topic": "vision/street/events", **event}


def test_oversize_and_malformed_are_counted_drops_pipeline_goes_on(
    fifo: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    path, rfd = fifo
    sink = sink_for(path, max_message_bytes=100, json_topics=["x/#"])
    sink.publish("llm/a/result", {"text": "y" * 200})  # over max_message_bytes
    sink.publish("llm/a/result", {"no_text": 1})  # no text field
    sink.publish("vision/s/detections", {"detections": "nope"})  # not a list
    sink.publish("vision/s/detections", {"detections": [{"label": "x"}]})  # no class_id
    sink.publish("x/y", {"bad": float("nan")})  # not JSON-serialisable
    sink.publish("llm/a/result", {"text": "fine"})
    assert sink.flush(5)
    status = sink.status()
    sink.close()
    assert status["dropped_oversize"] == 1
    assert status["dropped_invalid"] == 4
    assert status["dropped_total"] == 5
    assert "over reporting.hid.max_message_bytes (100)" in caplog.text
    got, _ = read_messages(rfd)
    assert [decode_text(p)[1] for k, p in got if k == Kind.TEXT] == ["fine"]


def test_publish_after_close_is_a_sink_error(fifo: tuple[Path, int]) -> None:
    path, _ = fifo
    sink = sink_for(path)
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(SinkError, match="closed"):
        sink.publish("llm/a/result", {"text": "x"})


def test_open_reporting_with_missing_device_is_one_clear_line(tmp_path: Path) -> None:
    cfg = ReportingConfig.model_validate(
        {
            "jsonl": {"path": str(tmp_path / "out.jsonl")},
            "hid": {"gadget": {"device": str(tmp_path / "hidg0")}},
        }
    )
    with pytest.raises(HidDeviceError) as info:
        open_reporting(cfg)
    assert "\n" not in str(info.value)
    assert "does not exist — set up the USB gadget" in str(info.value)
    assert info.value.reason == "hid_device_unavailable"


def test_open_reporting_fans_out_and_reports_hid_status(
    fifo: tuple[Path, int], tmp_path: Path
) -> None:
    path, rfd = fifo
    cfg = ReportingConfig.model_validate(
        {"jsonl": {"path": str(tmp_path / "out.jsonl")}, "hid": {"gadget": {"device": str(path)}}}
    )
    sink = open_reporting(cfg)
    sink.publish("llm/a/result", {"text": "both"})
    hid = next(s for s in sink.sinks if isinstance(s, HidSink))
    assert hid.flush(5)
    status = sink.reporter_status()
    sink.close()
    assert status["HidSink"]["vendor"]["messages_written"] == 1
    assert "both" in (tmp_path / "out.jsonl").read_text()
    assert decode_text(read_messages(rfd)[0][0][1])[1] == "both"


def test_wait_for_device_starts_and_counts_no_host(tmp_path: Path) -> None:
    cfg = {"gadget": {"device": str(tmp_path / "hidg0"), "wait_for_device": True}}
    sink = HidSink(HidConfig.model_validate({**cfg, "json_topics": ["#"], "text_topics": []}))
    sink.publish("a", {"x": 1})
    assert sink.flush(5)
    status = sink.status()
    sink.close()
    assert status["vendor"]["dropped"]["no_host"] == 1
    assert status["vendor"]["transport"]["state"] == "missing"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"mode": "host"}, "needs a [reporting.hid.host] section"),
        ({"json_topics": ["a/#/b"]}, "'#' must be a whole last level"),
        ({"text_topics": ["a+/b"]}, "'+' must be a whole level"),
        ({"detection_topics": ["a//b"]}, "empty level"),
        ({"max_message_bytes": 70000}, "less than or equal to 65535"),
        (
            {"mode": "host", "host": {"vendor_id": 1, "product_id": 2}, "keyboard": {}},
            "keyboard wedge needs mode = 'gadget'",
        ),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        HidConfig.model_validate(raw)


def test_config_in_agent_config_and_described() -> None:
    cfg = AgentConfig.model_validate({"reporting": {"hid": {"keyboard": {"layout": "de"}}}})
    assert cfg.reporting.hid is not None
    assert cfg.reporting.hid.keyboard is not None
    assert cfg.reporting.hid.keyboard.layout == "de"
    assert cfg.reporting.hid.keyboard.template == "{label} {count}\n"  # whitespace is typed
    with pytest.raises(ValidationError, match="Extra inputs"):
        HidKeyboardConfig.model_validate({"colour": 1})  # still strict
    schema = HidConfig.model_json_schema()

    def described(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                assert prop.get("description"), f"{where}.{name} has no description"
            for key, value in node.items():
                described(value, f"{where}.{key}")

    described(schema, "hid")


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("vision/+/detections", "vision/street/detections", True),
        ("vision/+/detections", "vision/street/events", False),
        ("vision/+/detections", "vision/a/b/detections", False),
        ("llm/#", "llm/x/result", True),
        ("#", "status", True),
        ("status", "status/x", False),
    ],
)
def test_topic_filters(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match


def test_example_config_commented_hid_block_validates(tmp_path: Path) -> None:
    from agent.configfile import load_config

    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.toml"
    text = example.read_text(encoding="utf-8")
    begin = text.index("# --- hid example begin\n")
    end = text.index("# --- hid example end\n")
    block = text[begin:end].splitlines()[1:]
    assert block
    assert all(line.startswith("# ") for line in block)
    enabled = text[:begin] + "\n".join(line[2:] for line in block) + "\n" + text[end:]
    path = tmp_path / "agent.toml"
    path.write_text(enabled, encoding="utf-8")
    config = load_config(path)
    hid = config.reporting.hid
    assert hid is not None
    assert hid.gadget.device == Path("/dev/hidg0")
    assert hid.keyboard is not None
    assert hid.keyboard.template == "{label} {count}\n"
