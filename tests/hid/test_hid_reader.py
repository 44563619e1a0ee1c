"""tools/hid_reader.py decoding what the sink writes: round trips through a FIFO, as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.errors import HidDeviceError
from agent.hid.gadget import GadgetTransport
from agent.hid.keyboard import KEY_REPORT_SIZE, KeyboardWedge
from agent.hid.protocol import REPORT_SIZE, Encoder, Kind, Reassembler, encode_text
from agent.hid.writer import ReportWriter
from agent.hid_config import HidConfig
from agent.reporting.hid import HidSink
from pipelines.vision.detections import Detections
from pipelines.vision.results import build_result

ROOT = Path(__file__).resolve().parents[2]
READER = ROOT / "tools" / "hid_reader.py"
sys.path.insert(0, str(ROOT / "tools"))

import hid_reader  # noqa: E402


def start_reader(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(READER), str(path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def _try(make: object) -> tuple[object, HidDeviceError | None]:
    try:
        return make(), None  # type: ignore[operator]
    except HidDeviceError as exc:
        return None, exc


def open_when_read(make: object, timeout_s: float = 30.0) -> object:
    """Build the writer once the reader process has the FIFO open (before: ENXIO)."""
    deadline = time.monotonic() + timeout_s
    while True:
        made, exc = _try(make)
        if exc is None:
            return made
        if "no reader" not in str(exc) or time.monotonic() > deadline:
            raise exc
        time.sleep(0.02)


def result(frame: int, class_ids: list[int]) -> dict[str, object]:
    n = len(class_ids)
    dets = Detections(
        boxes=np.array([[8 * i, 4, 8 * i + 64, 200] for i in range(n)], np.float32).reshape(n, 4),
        scores=np.full(n, 0.75, np.float32),
        class_ids=np.array(class_ids, np.int32),
        width=640,
        height=272,
    )
    return build_result(
        pipeline="street", source="file0", frame_index=frame, wall_time=0.0, monotonic=0.0,
        detections=dets, labels=("person", "bicycle", "car"), latency_s={},
    )  # fmt: skip


def test_reader_decodes_what_the_sink_writes(tmp_path: Path) -> None:
    fifo = tmp_path / "hidg0"
    os.mkfifo(fifo)
    reader = start_reader(fifo, "--json", "--announce")
    try:
        cfg = HidConfig.model_validate(
            {"gadget": {"device": str(fifo)}, "json_topics": ["vision/+/events"]}
        )
        sink = open_when_read(lambda: HidSink(cfg))
        assert isinstance(sink, HidSink)
        sink.publish("vision/street/detections", result(7, [0, 1, 0]))
        sink.publish("vision/street/detections", result(8, []))
        answer = "Zwei Personen, ein Fahrrad. " * 12
        sink.publish("llm/r1/result", {"request_id": "r1", "text": answer})
        sink.publish("vision/street/events", {"event": "crossing", "n": 2})
        assert sink.flush(10)
        sink.close()  # the FIFO's writer goes: the reader sees EOF and ends
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["kind"] for r in records] == ["announce", "detections", "detections", "text", "json"]
    assert records[0]["topic"] == "vision/street/detections"
    det = records[1]
    assert (det["topic"], det["frame_index"], det["total"]) == ("vision/street/detections", 7, 3)
    assert det["counts"] == {"person": 2, "bicycle": 1}
    assert [b["label"] for b in det["boxes"]] == ["person", "bicycle", "person"]
    assert det["boxes"][0]["box_norm"] == pytest.approx(
        [0.0, 4 / 272, 64 / 640, 200 / 272], abs=0.5 / 255 + 0.0005
    )  # quantised to 1/255, printed to 3 decimals
    assert det["boxes"][0]["score"] == pytest.approx(0.75, abs=0.5 / 255 + 0.0005)
    assert records[2]["counts"] == {}
    assert records[3] == {"kind": "text", "seq": records[3]["seq"], "topic": "llm/r1/result",
                          "text": answer}  # fmt: skip
    assert records[4]["message"] == {"event": "crossing", "n": 2}
    stats = json.loads(err.strip().splitlines()[-1].split("hid_reader: ", 1)[1])["stats"]
    assert stats["messages"] == 5
    assert stats["lost"] == stats["corrupt"] == stats["incomplete"] == 0


def test_reader_prints_human_lines_and_stops_after_count(tmp_path: Path) -> None:
    fifo = tmp_path / "hidg0"
    os.mkfifo(fifo)
    reader = start_reader(fifo, "--count", "2")
    try:
        transport = open_when_read(lambda: GadgetTransport(fifo, REPORT_SIZE))
        assert isinstance(transport, GadgetTransport)
        enc = Encoder()
        for text in ("first", "second", "third"):
            for report in enc.encode(Kind.TEXT, encode_text("llm/x/result", text)):
                transport.write(report, deadline=time.monotonic() + 5)
        out, _ = reader.communicate(timeout=60)
        transport.close()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert out.splitlines() == ["[0] llm/x/result: first", "[1] llm/x/result: second"]


def test_reader_types_out_keyboard_reports(tmp_path: Path) -> None:
    fifo = tmp_path / "hidg1"
    os.mkfifo(fifo)
    reader = start_reader(fifo, "--keyboard", "de")
    try:
        transport = open_when_read(lambda: GadgetTransport(fifo, KEY_REPORT_SIZE))
        assert isinstance(transport, GadgetTransport)
        writer = ReportWriter(transport, name="kb", max_queued_reports=1000)
        writer.start()
        wedge = KeyboardWedge(
            layout="de", template="{text}", topics=["#"], chars_per_s=1000, burst_chars=100,
            writer=writer,
        )  # fmt: skip
        text = "Grüße @ 3€ {Zürich}\n"
        assert wedge.type_text(text)
        assert writer.close(timeout_s=10)
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    assert out == text


def test_reader_resyncs_past_garbage_and_counts_it() -> None:
    enc = Encoder()
    reports = [r for t in ("a", "b" * 120, "c") for r in enc.encode(Kind.TEXT, encode_text("t", t))]
    corrupt = bytearray(reports[-1])
    corrupt[20] ^= 0xFF
    stream = b"\x00garbage" + b"".join(reports[:-1]) + bytes(corrupt)
    resync, reasm = hid_reader.Resync(), Reassembler()
    got = reasm.feed_all(resync.feed(stream[:100]))  # arbitrary cut: bytes arrive in parts
    got += reasm.feed_all(resync.feed(stream[100:]))
    assert [hid_reader.decode_text(m.payload)[1] for m in got] == ["a", "b" * 120]
    assert reasm.stats.corrupt == 2  # the garbage start, the damaged last report
    assert resync.skipped_bytes >= len(b"\x00garbage")


def test_reader_lists_gadget_hidraw_nodes(tmp_path: Path) -> None:
    for name, hid_id in (
        ("hidraw0", "0003:0000046D:0000C52B"),
        ("hidraw3", "0003:00001D6B:00000104"),
    ):
        dev = tmp_path / name / "device"
        dev.mkdir(parents=True)
        (dev / "uevent").write_text(f"HID_ID={hid_id}\nHID_NAME=edge-agent edge-agent HID\n")
    assert hid_reader.list_hidraw(tmp_path) == [("/dev/hidraw3", "edge-agent edge-agent HID")]


def test_reader_help_and_bad_device(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, str(READER), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "examples:" in help_text
    assert "hid_reader.py /dev/hidraw3 --json" in help_text
    proc = subprocess.run(
        [sys.executable, str(READER), str(tmp_path / "hidraw9")], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "cannot open" in proc.stderr
    assert "Traceback" not in proc.stderr
