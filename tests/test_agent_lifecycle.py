"""Agent lifecycle in-process: start steps, status, notify messages, degraded, stop."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from notify_support import NotifyListener
from wait_support import wait_for

from agent.config import AgentConfig
from agent.errors import ReportingError, StateDirError
from agent.process import SUPERVISOR_WORKER, Agent, resolve_state_dir, run_bounded
from pipelines.config import VisionPipelineConfig


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def make_config(tmp_path: Path, **extra: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "reporting": {"jsonl": {"path": str(tmp_path / "out.jsonl")}},
    }
    data.update(extra)
    return AgentConfig.model_validate(data)


def jsonl(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "out.jsonl"
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_start_and_stop_without_pipelines(tmp_path: Path, notify_socket: NotifyListener) -> None:
    agent = Agent(make_config(tmp_path), environ={"NOTIFY_SOCKET": notify_socket.address})
    agent.start()
    assert agent.state == "ready"
    status = agent.status()
    assert uuid.UUID(status["boot_id"]).version == 4
    assert status["pipelines"] == []
    assert status["pinning"] is not None
    assert status["state_dir"] == str(tmp_path / "state")
    on_disk = json.loads((tmp_path / "state" / "status.json").read_text())
    assert on_disk["state"] == "ready"
    assert on_disk["boot_id"] == status["boot_id"]

    messages = notify_socket.take("READY=1")
    steps = [m[0] for m in messages if m[0].startswith("STATUS=starting: ")]
    assert steps == [
        "STATUS=starting: pinning",
        "STATUS=starting: state dir",
        "STATUS=starting: reporting",
        "STATUS=starting: watchdog",
        "STATUS=starting: model store",
        "STATUS=starting: pipelines",
    ]
    assert messages[-1] == ["READY=1", "STATUS=ready: 0 pipeline(s) running"]

    agent.stop()
    agent.stop()  # idempotent
    assert agent.state == "stopped"
    assert agent.stop_event.is_set()
    assert notify_socket.take("STATUS=stopped") == [
        ["STOPPING=1", "STATUS=stopping"],
        ["STATUS=stopped"],
    ]
    assert json.loads((tmp_path / "state" / "status.json").read_text())["state"] == "stopped"
    published = [(m["topic"], m["state"]) for m in jsonl(tmp_path)]
    assert published == [("status", "ready"), ("status", "stopping")]
    assert list((tmp_path / "state").glob(".status-*")) == []  # atomic writes left no temp


def test_state_directory_from_systemd_unless_configured(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"}
    assert resolve_state_dir(AgentConfig(), env) == tmp_path / "a"
    assert resolve_state_dir(make_config(tmp_path), env) == tmp_path / "state"
    assert resolve_state_dir(AgentConfig(), {}) == AgentConfig().state_dir


def test_unusable_state_dir_fails_start_and_undoes(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    agent = Agent(make_config(tmp_path, state_dir=str(blocker / "state")), environ={})
    with pytest.raises(StateDirError, match="cannot be created") as info:
        agent.start()
    assert "set state_dir" in str(info.value)
    assert agent.stop_event.is_set()
    assert not (tmp_path / "out.jsonl").exists()  # reporting never opened


def test_reporting_failure_undoes_earlier_steps(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = make_config(tmp_path, reporting={"jsonl": {"path": str(blocker / "x.jsonl")}})
    agent = Agent(config, environ={})
    with pytest.raises(ReportingError, match="cannot open"):
        agent.start()
    assert agent.sink is None
    assert not agent.watchdog.pinging


def test_stop_requested_during_start_skips_remaining_steps(tmp_path: Path) -> None:
    agent = Agent(make_config(tmp_path), environ={})
    agent.request_stop()
    agent.start()
    assert agent.state == "starting"  # never became ready
    assert agent.state_dir is None
    agent.stop()
    assert agent.state == "stopped"


def test_frozen_supervisor_stops_beating(tmp_path: Path) -> None:
    freeze = tmp_path / "freeze"
    config = make_config(
        tmp_path, watchdog={"default_interval_s": 0.2, "test_freeze_file": str(freeze)}
    )
    agent = Agent(config, environ={})
    agent.start()
    runner = threading.Thread(target=agent.run)
    runner.start()
    try:
        wait_for(lambda: SUPERVISOR_WORKER in agent.watchdog.status()["workers"], "registration")
        assert agent.watchdog.stale_workers() == []
        freeze.touch()
        wait_for(lambda: agent.watchdog.stale_workers() == [SUPERVISOR_WORKER], "stale")
        freeze.unlink()
        wait_for(lambda: agent.watchdog.stale_workers() == [], "beating again")
    finally:
        agent.request_stop()
        runner.join(30)
        agent.stop()
    assert not runner.is_alive()
    assert SUPERVISOR_WORKER not in agent.watchdog.status()["workers"]


def test_run_returns_after_duration(tmp_path: Path) -> None:
    agent = Agent(make_config(tmp_path), environ={})
    agent.start()
    agent.run(duration_s=0.1)
    assert not agent.stop_event.is_set()  # the bound ended it, not a stop request
    agent.stop()


def test_stop_step_that_overruns_is_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    with caplog.at_level(logging.WARNING, logger="agent.process"):
        run_bounded("stuck", lambda: release.wait(30) and None, 0.05)
    release.set()
    assert any("'stuck' overran its 0.1 s timeout" in r.getMessage() for r in caplog.records)


def test_stop_step_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise OSError("disk gone")

    with caplog.at_level(logging.ERROR, logger="agent.process"):
        run_bounded("broken", boom, 5)
    assert any("'broken' failed: disk gone" in r.getMessage() for r in caplog.records)


# -- with real pipelines (real model store, ONNX Runtime, video) -----------------------------


def vision(name: str, model: str, video: Path, **extra: Any) -> dict[str, Any]:
    return {
        "type": "vision",
        "name": name,
        "model": model,
        "engine": {"type": "onnxruntime"},
        "sources": [{"type": "file", "path": str(video)}],
        **extra,
    }


@pytest.fixture
def store_env(models_dir: Path, data_dir: Path) -> dict[str, str]:
    return {"EDGE_AGENT_MODEL_PATH": str(models_dir), "EDGE_AGENT_DATA_PATH": str(data_dir)}


def test_failed_pipeline_degrades_and_others_keep_going(
    tmp_path: Path,
    data_dir: Path,
    store_env: dict[str, str],
    notify_socket: NotifyListener,
) -> None:
    video = data_dir / "videos" / "bikes.mp4"
    config = make_config(
        tmp_path,
        models={"allow_download": False},
        pipelines=[
            vision("street", "yolox_nano_416", video, max_frames=3),
            vision("broken", "no_such_model", video),
        ],
    )
    assert isinstance(config.pipelines[0], VisionPipelineConfig)
    agent = Agent(config, environ={**store_env, "NOTIFY_SOCKET": notify_socket.address})
    agent.start()
    try:
        assert agent.state == "degraded"
        status = agent.status()
        states = {p["name"]: (p["state"], p["reason"]) for p in status["pipelines"]}
        assert states["broken"] == ("failed", "model_not_found")
        assert states["street"][1] is None
        assert status["failed_models"] == [
            {
                "model": "no_such_model",
                "pipeline": "broken",
                "reason": "model_not_found",
                "error": status["pipelines"][1]["error"],
            }
        ]
        messages = notify_socket.take("READY=1")
        assert ["EXTEND_TIMEOUT_USEC=300000000"] in messages
        ready = [m for m in messages if m[0] == "READY=1"]
        assert len(ready) == 1
        assert ready[0][1].startswith("STATUS=degraded: 1 pipeline(s) running, failed: broken")
        agent.run(until_finished=True)
    finally:
        agent.stop()
    detections = [m for m in jsonl(tmp_path) if m["topic"] == "vision/street/detections"]
    assert len(detections) == 3
    final = json.loads((tmp_path / "state" / "status.json").read_text())
    assert final["state"] == "stopped"
    assert final["pipelines"][1]["reason"] == "model_not_found"


def test_status_carries_each_reporters_own_figures(tmp_path: Path) -> None:
    """The HID reporter's drop counters reach the agent's status (and so status.json)."""
    hid = {"gadget": {"device": str(tmp_path / "hidg0"), "wait_for_device": True}}
    config = make_config(
        tmp_path, reporting={"jsonl": {"path": str(tmp_path / "out.jsonl")}, "hid": hid}
    )
    agent = Agent(config, environ={})
    agent.start()
    try:
        reporters = agent.status()["reporters"]
        written = json.loads((tmp_path / "state" / "status.json").read_text(encoding="utf-8"))
    finally:
        agent.stop()
    assert reporters["HidSink"]["vendor"]["transport"]["state"] == "missing"
    assert "dropped" in reporters["HidSink"]["vendor"]
    assert "HidSink" in written["reporters"]
