"""JSON Lines reporter and the reporting fan-out, on real files and stdout."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agent.config import JsonlReporterConfig, ReportingConfig
from agent.errors import ReportingError
from agent.reporting import FanoutSink, JsonlSink, open_reporting
from agent.reporting.jsonutil import compact_json
from pipelines.base import ResultSink
from pipelines.errors import SinkError


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lines_carry_topic_ts_and_message(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "results.jsonl"
    sink = JsonlSink(out, clock=lambda: 1700000000.25)
    assert isinstance(sink, ResultSink)
    sink.publish("vision/street/detections", {"frame": 1, "boxes": [[1, 2, 3, 4]]})
    # flushed per line: readable before close
    assert read_lines(out) == [
        {
            "topic": "vision/street/detections",
            "ts": 1700000000.25,
            "frame": 1,
            "boxes": [[1, 2, 3, 4]],
        }
    ]
    sink.close()


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text('{"topic":"old","ts":0}\n', encoding="utf-8")
    with_sink = JsonlSink(out)
    with_sink.publish("new", {"n": 1})
    with_sink.close()
    assert [line["topic"] for line in read_lines(out)] == ["old", "new"]


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    sink = JsonlSink("-")
    sink.publish("status", {"state": "ready"})
    sink.close()  # does not close stdout
    line = json.loads(capsys.readouterr().out)
    assert line["topic"] == "status"
    assert line["state"] == "ready"
    assert isinstance(line["ts"], float)


def test_concurrent_publishers_never_interleave(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    sink = JsonlSink(out)
    payload = "x" * 5000  # longer than a pipe buffer chunk

    def worker(n: int) -> None:
        for i in range(200):
            sink.publish(f"t{n}", {"i": i, "payload": payload})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    lines = read_lines(out)
    assert len(lines) == 1600
    assert sink.published == 1600
    for n in range(8):
        assert [line["i"] for line in lines if line["topic"] == f"t{n}"] == list(range(200))


def test_publish_after_close_raises_sink_error(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl")
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(SinkError, match="closed"):
        sink.publish("t", {})


@pytest.mark.parametrize("message", [{"obj": object()}, {"nan": float("nan")}])
def test_unserialisable_message_is_a_sink_error(tmp_path: Path, message: dict[str, object]) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl")
    with pytest.raises(SinkError, match="not JSON-serialisable"):
        sink.publish("t", message)
    sink.close()


def test_unopenable_file_is_a_reporting_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ReportingError, match="cannot open"):
        JsonlSink(blocker / "results.jsonl")


def test_open_reporting_and_fanout(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    sink = open_reporting(ReportingConfig(jsonl=JsonlReporterConfig(path=str(out))))
    sink.publish("status", {"state": "ready"})
    sink.close()
    assert read_lines(out)[0]["state"] == "ready"
    with pytest.raises(SinkError):
        sink.publish("status", {})
    disabled = open_reporting(ReportingConfig(jsonl=JsonlReporterConfig(enabled=False)))
    assert disabled.sinks == []


def test_fanout_keeps_going_when_one_sink_fails(tmp_path: Path) -> None:
    closed = JsonlSink(tmp_path / "a.jsonl")
    closed.close()
    alive = JsonlSink(tmp_path / "b.jsonl")
    fan = FanoutSink([closed, alive])
    fan.publish("t", {"n": 1})  # one failure of two: no exception
    assert read_lines(tmp_path / "b.jsonl")[0]["n"] == 1
    alive.close()
    with pytest.raises(SinkError, match="every reporter failed"):
        fan.publish("t", {"n": 2})


def test_compact_json_has_no_spaces_keeps_utf8_and_refuses_nan() -> None:
    assert (
        compact_json({"a": "Straße €", "b": [1, 2.5, None]}) == '{"a":"Straße €","b":[1,2.5,null]}'
    )
    with pytest.raises(ValueError, match="JSON compliant"):
        compact_json({"x": float("nan")})
    with pytest.raises(TypeError):
        compact_json({"x": {1, 2}})
