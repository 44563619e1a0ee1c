"""The agent's own commands (pipeline.start|stop|set, model.load|unload, agent.restart) and its
telemetry, end to end: a real Agent running a real pipeline (ONNX Runtime, YOLOX-nano, the
sample video) reports to a real mosquitto; a controller sends commands (critical ones signed
with Ed25519) and checks each command's replies: exactly one terminal reply, stable reasons,
accepted/progress first for the long ones."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_process_support import AgentProcess, base_env
from broker_support import (
    PASSWORD,
    Monitor,
    MosquittoBroker,
    Received,
    close_monitor,
    open_monitor,
)
from commands_support import envelope, make_keys, signed
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.process import RESTART_EXIT_STATUS, Agent
from agent.reporting.messages import CommandReply, StatusMessage, TelemetryMessage

# Frames already past the decoder when a setting changes (queues + one per worker, see
# tests/test_vision_update.py): results this far beyond the last one seen use the new setting.
IN_FLIGHT_MARGIN = 24
FPS_CAP = 15


def _mqtt(broker: MosquittoBroker, device: str, tmp: Path, **extra: Any) -> dict[str, Any]:
    (tmp / "pw").write_text(PASSWORD + "\n")
    return {
        "port": broker.port,
        "username": device,
        "password_file": str(tmp / "pw"),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "commands": {
            "trusted_keys_dir": str(tmp / "keys"),
            "rate_limits": {
                "read": {"rate_per_s": 50, "burst": 50},
                "control": {"rate_per_s": 50, "burst": 50},
                "critical": {"rate_per_s": 50, "burst": 50},
            },
        },
        **extra,
    }


def _pipeline() -> dict[str, Any]:
    return {
        "type": "vision",
        "name": "street",
        "model": "yolox_nano_416",
        "engine": {"type": "onnxruntime"},
        "sources": [
            {
                "type": "file",
                "name": "bikes",
                "path": "videos/bikes.mp4",
                "loop": True,
                "fps_cap": FPS_CAP,
            }
        ],
        "source_queue_size": 1,
        "stage_queue_size": 1,
        "policy": "all",
        "score_threshold": 0.25,
    }


@dataclass
class Controlled:
    agent: Agent
    mon: Monitor
    key: Ed25519PrivateKey
    device: str
    state: Path

    def send(self, command: str, args: dict[str, Any] | None = None, *, sign: bool = False) -> str:
        """Send a command with its own correlation; returns the correlation."""
        env = envelope(args=args or {})
        if sign:
            env = signed(env, command, self.key, device=self.device)
        corr = uuid.uuid4().hex[:12]
        self.mon.send(
            f"edge/{self.device}/cmd/{command}",
            json.dumps(env).encode(),
            response_topic=f"edge/{self.device}/reply/ctl",
            correlation=corr.encode(),
        )
        return corr

    def replies(self, corr: str, timeout: float = 60.0) -> list[CommandReply]:
        """Every reply of the command once its terminal reply arrived (in arrival order)."""

        def mine(m: Received) -> bool:
            return "/reply/" in m.topic and m.correlation == corr.encode()

        self.mon.wait_for(lambda m: mine(m) and json.loads(m.payload)["terminal"], timeout)
        return [CommandReply.model_validate_json(m.payload) for m in self.mon.snapshot() if mine(m)]

    def call(
        self, command: str, args: dict[str, Any] | None = None, *, sign: bool = False
    ) -> CommandReply:
        """Send and wait; exactly one terminal reply, which is the last one."""
        got = self.replies(self.send(command, args, sign=sign))
        terminal = [r for r in got if r.terminal]
        assert len(terminal) == 1, (command, got)
        assert got[-1].terminal, (command, got)
        return terminal[0]

    def detections(self, after_frame: int = -1) -> list[dict[str, Any]]:
        topic = f"edge/{self.device}/vision/street/detections"
        return [
            json.loads(m.payload)
            for m in self.mon.snapshot()
            if m.topic == topic and json.loads(m.payload)["frame_index"] > after_frame
        ]

    def wait_detections(self, count: int, after_frame: int = -1, timeout: float = 90) -> None:
        topic = f"edge/{self.device}/vision/street/detections"
        got = self.mon.wait_count(
            lambda m: m.topic == topic and json.loads(m.payload)["frame_index"] > after_frame,
            count,
            timeout,
        )
        assert len(got) >= count, f"only {len(got)} of {count} detections after {after_frame}"

    def last_frame(self) -> int:
        return max((d["frame_index"] for d in self.detections()), default=-1)

    def retained_status(self, predicate: Any) -> StatusMessage:
        got = self.mon.wait_for(
            lambda m: m.topic == f"edge/{self.device}/status" and predicate(json.loads(m.payload))
        )
        assert got, "no matching status message"
        return StatusMessage.model_validate_json(got[-1].payload)


@pytest.fixture
def controlled(
    broker: MosquittoBroker, device: str, tmp_path: Path, models_dir: Path, data_dir: Path
) -> Iterator[Controlled]:
    key = make_keys(tmp_path / "keys")
    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "reporting": {
                "jsonl": {"enabled": False},
                "mqtt": _mqtt(broker, device, tmp_path, telemetry_interval_s=0.5),
            },
            "pipelines": [_pipeline()],
        }
    )
    env = {"EDGE_AGENT_MODEL_PATH": str(models_dir), "EDGE_AGENT_DATA_PATH": str(data_dir)}
    mon = open_monitor(broker, f"edge/{device}/#")
    agent = Agent(config, environ=env)
    try:
        agent.start()
        assert agent.mqtt is not None
        assert agent.mqtt.reporter.wait_connected(10)
        yield Controlled(agent, mon, key, device, tmp_path / "state")
    finally:
        agent.stop()
        close_monitor(mon)


def _labels(detections: list[dict[str, Any]]) -> set[str]:
    return {d["label"] for m in detections for d in m["detections"]}


def test_telemetry_carries_pipeline_and_system_figures(controlled: Controlled) -> None:
    c = controlled
    c.wait_detections(5)
    topic = f"edge/{c.device}/telemetry"

    def rich(m: Received) -> bool:
        if m.topic != topic:
            return False
        street = json.loads(m.payload)["pipelines"].get("street", {})
        return street.get("frames", {}).get("published", 0) > 0

    got = c.mon.wait_for(rich, 30)
    assert got, "no telemetry with pipeline figures"
    msg = TelemetryMessage.model_validate_json(got[-1].payload)
    street = msg.pipelines["street"]
    assert street["state"] == "running"
    assert street["model"] == "yolox_nano_416"
    # results over the last whole seconds: never above the source's cap (slack for the
    # fractional start-up window), zero only if the pipeline stalled for that long
    out = street["fps"]["out"]
    assert isinstance(out, float)
    assert 0 <= out <= 2 * FPS_CAP
    assert street["fps"]["out_average"] > 0
    for stage in ("wait", "preprocess", "inference", "postprocess", "sink", "end_to_end"):
        lat = street["latency_ms"][stage]
        assert lat["count"] > 0
        assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] * 1.05
    assert set(street["drops"]) >= {"stale", "rate_limited", "sink_errors"}
    assert msg.system.rss_bytes > 50 * 2**20  # ONNX Runtime + OpenCV loaded
    # decoding and inference run between two samples (>= 0.5 s apart): busy, and at most
    # every CPU (slack for the clock-tick granularity of os.times)
    assert 0 < msg.system.cpu_percent <= 100 * (os.cpu_count() or 1) + 10
    assert msg.outbox.connected
    assert msg.outbox.critical <= msg.outbox.depth
    assert msg.outbox.refused == msg.outbox.dead_letters == 0
    assert (msg.device_id, msg.boot_id) == (c.device, c.agent.boot_id)


def test_pipeline_set_stop_start_round_trips(controlled: Controlled) -> None:
    c = controlled
    c.wait_detections(40)
    assert {"person", "car"} <= _labels(c.detections())

    bad = [
        ("pipeline.set", {"name": "nope", "score_threshold": 0.5}, "failed", "pipeline_unknown"),
        ("pipeline.set", {"name": "street"}, "rejected", "args_invalid"),
        ("pipeline.set", {"name": "street", "nms_iou": None}, "rejected", "args_invalid"),
        ("pipeline.set", {"name": "street", "score_threshold": 2}, "rejected", "args_invalid"),
        (
            "pipeline.set",
            {"name": "street", "classes": ["unicorn"]},
            "failed",
            "pipeline_config_invalid",
        ),
        ("pipeline.stop", {}, "rejected", "args_invalid"),
        ("pipeline.start", {"name": "nope"}, "failed", "pipeline_unknown"),
    ]
    for command, args, status, reason in bad:
        reply = c.call(command, args)
        assert (reply.status, reply.reason) == (status, reason), (command, args, reply.message)

    seen = c.last_frame()
    reply = c.call(
        "pipeline.set",
        {"name": "street", "classes": ["person"], "score_threshold": 0.5, "fps_cap": 20},
    )
    assert (reply.status, reply.reason) == ("succeeded", "ok"), reply.message
    assert reply.result is not None
    assert reply.result["applied"] == "now"
    assert reply.result["settings"]["classes"] == ["person"]
    assert reply.result["settings"]["fps_cap"] == {"bikes": 20}
    c.wait_detections(20, after_frame=seen + IN_FLIGHT_MARGIN)
    later = c.detections(after_frame=seen + IN_FLIGHT_MARGIN)
    assert _labels(later) == {"person"}
    assert min(d["score"] for m in later for d in m["detections"]) > 0.5
    config = c.call("config.get").result
    assert config is not None
    assert config["pipelines"][0]["classes"] == ["person"]
    assert config["pipelines"][0]["sources"][0]["fps_cap"] == 20

    stop = c.call("pipeline.stop", {"name": "street"})
    assert (stop.status, stop.result) == (
        "succeeded",
        {"pipeline": "street", "state": "stopped", "changed": True},
    )
    status = c.retained_status(lambda s: s.get("pipelines") == {"street": "stopped"})
    assert status.models == []
    again = c.call("pipeline.stop", {"name": "street"})
    assert again.result is not None
    assert again.result["changed"] is False

    # a stopped pipeline takes settings for its next start
    later_set = c.call("pipeline.set", {"name": "street", "classes": None, "score_threshold": 0.25})
    assert later_set.result is not None
    assert later_set.result["applied"] == "next_start"

    corr = c.send("pipeline.start", {"name": "street"})
    replies = c.replies(corr)
    assert replies[0].status == "accepted"
    assert "progress" in [r.status for r in replies]
    assert [r.status for r in replies][-1] == "succeeded"
    assert sum(r.terminal for r in replies) == 1
    c.retained_status(lambda s: s.get("pipelines") == {"street": "running"})
    # a new pipeline (frame indices start again at 0) with every class back
    before = len(c.detections())
    c.wait_detections(before + 50)
    assert "car" in _labels(c.detections()[before:])
    assert c.agent.status()["pipelines"][0]["status"]["settings"]["classes"] is None
    running = c.call("pipeline.start", {"name": "street"})
    assert running.result is not None
    assert running.result["changed"] is False


def test_model_load_and_unload_signed(controlled: Controlled) -> None:
    c = controlled
    c.wait_detections(3)
    swap = {"name": "deimv2_hgnetv2_atto_coco", "pipeline": "street"}
    unsigned = c.call("model.load", swap)
    assert (unsigned.status, unsigned.reason) == ("rejected", "signature_required")
    unsigned_unload = c.call("model.unload", {"name": "yolox_nano_416"})
    assert (unsigned_unload.status, unsigned_unload.reason) == ("rejected", "signature_required")

    corr = c.send("model.load", swap, sign=True)
    replies = c.replies(corr, timeout=120)
    statuses = [r.status for r in replies]
    assert statuses[0] == "accepted"
    assert statuses.count("progress") >= 2
    assert statuses[-1] == "succeeded", replies[-1].message
    assert sum(r.terminal for r in replies) == 1
    progress = [r.progress for r in replies if r.status == "progress"]
    assert progress == sorted(progress)
    result = replies[-1].result
    assert result is not None
    assert (result["model"], result["changed"]) == ("deimv2_hgnetv2_atto_coco", True)
    assert len(result["sha256"]) == 64
    status = c.retained_status(lambda s: s.get("models") == ["deimv2_hgnetv2_atto_coco"])
    assert status.pipelines == {"street": "running"}
    entry = c.agent.status()["pipelines"][0]
    assert (entry["model"], entry["status"]["decoder"]) == ("deimv2_hgnetv2_atto_coco", "detr")

    failures = [
        ("model.load", {"name": "no_such_model"}, "model_not_found"),
        ("model.unload", {"name": "yolox_nano_416"}, "model_not_loaded"),
        ("model.load", {"name": "yolox_nano_416", "pipeline": "nope"}, "pipeline_unknown"),
    ]
    for command, args, reason in failures:
        reply = c.call(command, args, sign=True)
        assert (reply.status, reply.reason) == ("failed", reason), (command, reply.message)

    verified = c.call("model.load", {"name": "nanodet_m_416"}, sign=True)
    assert verified.status == "succeeded", verified.message
    assert verified.result is not None
    assert (verified.result["pipeline"], verified.result["changed"]) == (None, False)

    unload = c.call("model.unload", {"name": "deimv2_hgnetv2_atto_coco"}, sign=True)
    assert unload.status == "succeeded", unload.message
    assert unload.result == {
        "model": "deimv2_hgnetv2_atto_coco",
        "pipelines": ["street"],
        "state": "stopped",
    }
    c.retained_status(
        lambda s: s.get("models") == [] and s.get("pipelines") == {"street": "stopped"}
    )
    audit = [json.loads(x) for x in (c.state / "command-audit.jsonl").read_text().splitlines()]
    by_reason = {(a["command"], a["reason"]) for a in audit}
    assert ("model.load", "signature_required") in by_reason
    assert ("model.load", "ok") in by_reason
    assert ("model.unload", "ok") in by_reason
    assert all(a["signed"] for a in audit if a["reason"] == "ok")


def test_a_second_control_command_meanwhile_is_busy(controlled: Controlled) -> None:
    c = controlled
    # hold the agent's control lock as a running model.load would
    assert c.agent._control.acquire(timeout=5)
    try:
        reply = c.call("pipeline.stop", {"name": "street"})
    finally:
        c.agent._control.release()
    assert (reply.status, reply.reason) == ("busy", "control_busy")
    assert c.agent.status()["pipelines"][0]["state"] == "running"


def test_agent_restart_stops_gracefully_and_exits_75(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    key = make_keys(tmp_path / "keys")
    mqtt = _mqtt(broker, device, tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device}"\nstate_dir = "{tmp_path / "state"}"\n'
        "[reporting.jsonl]\nenabled = false\n"
        f'[reporting.mqtt]\nport = {mqtt["port"]}\nusername = "{device}"\n'
        f'password_file = "{mqtt["password_file"]}"\n'
        f'[reporting.mqtt.commands]\ntrusted_keys_dir = "{tmp_path / "keys"}"\n',
        encoding="utf-8",
    )
    mon = open_monitor(broker, f"edge/{device}/#")
    proc = AgentProcess(["run", "--config", str(config)], base_env())
    try:
        ready = mon.wait_for(
            lambda m: m.topic.endswith("/status") and b'"agent_state":"ready"' in m.payload, 60
        )
        assert ready, proc.stderr[-20:] if proc.proc.poll() is not None else "agent not ready"
        c = Controlled(None, mon, key, device, tmp_path / "state")  # type: ignore[arg-type]
        unsigned = c.call("agent.restart", {"reason": "test"})
        assert (unsigned.status, unsigned.reason) == ("rejected", "signature_required")
        assert proc.proc.poll() is None
        reply = c.call("agent.restart", {"reason": "test"}, sign=True)
        assert (reply.status, reply.reason) == ("succeeded", "ok"), reply.message
        assert reply.result == {"exit_status": RESTART_EXIT_STATUS, "stopping": True}
        assert proc.wait(30) == RESTART_EXIT_STATUS
        offline = c.retained_status(lambda s: s["state"] == "offline")
        assert offline.reason == "shutdown"  # a clean stop, not the Last Will
    finally:
        proc.kill()
        close_monitor(mon)
    assert any("exit status 75" in line for line in proc.stderr), proc.stderr[-20:]
    audit = [
        json.loads(x) for x in (tmp_path / "state" / "command-audit.jsonl").read_text().splitlines()
    ]
    assert [(a["command"], a["reason"]) for a in audit] == [
        ("agent.restart", "signature_required"),
        ("agent.restart", "ok"),
    ]
