"""The private mosquitto of ``edge-agent run`` on the embedded defaults: ACL (anonymous read
only, the agent writes its own topics, the controller sends commands), clean-up at stop and
after a killed agent, and the README's main command publishing detections to it."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_process_support import AgentProcess, base_env
from child_support import process_alive
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import configfile
from agent.config import AgentConfig
from agent.process import Agent
from agent.reporting import local_broker
from agent.reporting.local_broker import CONTROLLER, LocalBroker


class Client:
    """A paho MQTT 5 client that records PUBACK reason codes and received messages."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None) -> None:
        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"t-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert connected.wait(10), "no CONNACK"

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.cond:
            self.acks[mid] = int(rc.value)
            self.cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def publish(self, topic: str) -> int:
        """PUBACK reason code of one QoS 1 publish (0 ok, 0x87 not authorized)."""
        info = self.client.publish(topic, b"{}", qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, 10), "no PUBACK"
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10)

    def wait(self, predicate: Callable[[str, bytes], bool], count: int, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(
                lambda: sum(predicate(t, p) for t, p in self.messages) >= count, timeout
            )
            return sum(predicate(t, p) for t, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_acl_passwords_and_clean_stop(mosquitto: Path, tmp_path: Path) -> None:
    broker = LocalBroker(mosquitto, device_id="cam-1", state_dir=tmp_path)
    broker.start()
    folder, pid = broker.folder, broker.pid
    assert folder is not None
    assert pid is not None
    clients: list[Client] = []
    try:
        cfg = broker.mqtt_config()
        assert (cfg.host, cfg.port, cfg.username) == ("127.0.0.1", broker.port, "cam-1")
        assert cfg.password_file is not None
        assert oct(cfg.password_file.stat().st_mode & 0o777) == "0o600"
        record = json.loads((tmp_path / "local-broker.json").read_text())
        assert record["pid"] == pid
        anon = Client(broker.port)
        agent = Client(broker.port, "cam-1", cfg.password_file.read_text().strip())
        ctl = Client(broker.port, CONTROLLER, broker.controller_password_file.read_text().strip())
        clients += [anon, agent, ctl]
        anon.subscribe("edge/#")
        assert agent.publish("edge/cam-1/vision/street/detections") == 0
        assert agent.publish("edge/cam-2/status") == 0x87
        assert anon.publish("edge/cam-1/cmd/status.get") == 0x87
        assert ctl.publish("edge/cam-1/cmd/status.get") == 0
        assert ctl.publish("edge/cam-1/status") == 0x87
        got = anon.wait(lambda t, _p: t.startswith("edge/cam-1/"), 2, 10)
        assert got == 2  # the detections and the controller's command; nothing denied
        assert connack_code(broker.port, "cam-1", "wrong") == 0x87  # mosquitto: not authorized
    finally:
        for c in clients:
            c.close()
        broker.stop()
    assert not process_alive(pid)
    assert not folder.exists()
    assert not (tmp_path / "local-broker.json").exists()


def connack_code(port: int, user: str, password: str) -> int:
    """The CONNACK reason code for these credentials."""
    codes: list[int] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(user, password)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        codes.append(int(rc.value))
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    assert codes, "no CONNACK"
    return codes[0]


def test_a_broker_left_by_a_killed_agent_is_ended_at_the_next_start(
    mosquitto: Path, tmp_path: Path
) -> None:
    first = LocalBroker(mosquitto, device_id="cam-1", state_dir=tmp_path)
    first.start()
    old_pid, old_folder = first.pid, first.folder
    assert old_pid is not None
    assert old_folder is not None
    # the agent "dies" here: first.stop() never runs; the record and the process remain
    second = LocalBroker(mosquitto, device_id="cam-1", state_dir=tmp_path)
    try:
        second.start()
        deadline = time.monotonic() + 10
        while process_alive(old_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
            if first._proc is not None:  # reap our own child when it exits
                first._proc.poll()
        assert not process_alive(old_pid)
        assert not old_folder.exists()
        assert second.running
        assert json.loads((tmp_path / "local-broker.json").read_text())["pid"] == second.pid
    finally:
        second.stop()
        first.stop()


def test_an_unrelated_process_in_the_record_is_left_alone(mosquitto: Path, tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        record = {"pid": sleeper.pid, "config": "/tmp/edge-agent-broker-x/mosquitto.conf"}
        (tmp_path / "local-broker.json").write_text(json.dumps(record))
        broker = LocalBroker(mosquitto, device_id="cam-1", state_dir=tmp_path)
        broker.start()
        broker.stop()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(5)


def test_agent_without_a_usable_mosquitto_runs_without_mqtt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.process")
    config = AgentConfig.model_validate(
        {"device_id": "cam-1", "state_dir": str(tmp_path / "state"), "reporting": {"jsonl": None}}
    )
    # a binary that exits at once: the start fails with the reason, the agent goes on
    monkeypatch.setattr(local_broker, "find_mosquitto", lambda _env=None: Path("/bin/false"))
    agent = Agent(config, environ={}, local_broker=True)
    try:
        agent.start()
        assert agent.state == "ready"
        assert agent.mqtt is None
        assert agent.local_broker is None
    finally:
        agent.stop()
    assert "local MQTT broker not started: mosquitto did not start" in caplog.text
    monkeypatch.setattr(local_broker, "find_mosquitto", lambda _env=None: None)
    agent = Agent(config, environ={}, local_broker=True)
    try:
        agent.start()
        assert agent.mqtt is None
    finally:
        agent.stop()
    assert "no mosquitto binary found" in caplog.text


@pytest.fixture
def defaults_env(tmp_path: Path, model_search_path: str, data_dir: Path) -> dict[str, str]:
    if configfile.DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{configfile.DEFAULT_CONFIG_PATH} exists: `run` would not use the defaults")
    return base_env(
        STATE_DIRECTORY=str(tmp_path / "state"),
        EDGE_AGENT_MODEL_PATH=model_search_path,  # detectors + the LLM tests' SmolLM2
        EDGE_AGENT_DATA_PATH=str(data_dir),
    )


def test_readme_command_reports_detections_to_a_local_broker(
    mosquitto: Path, defaults_env: dict[str, str], tmp_path: Path
) -> None:
    del mosquitto  # required: the run only starts a broker when the binary exists
    cli = AgentProcess(["run", "--duration", "120"], defaults_env)
    sub: Client | None = None
    try:
        port = int(cli.wait_stderr_match(r"local MQTT broker on 127\.0\.0\.1:(\d+)")[1])
        record = json.loads((tmp_path / "state" / "local-broker.json").read_text())
        sub = Client(port)  # anonymous, read only
        sub.subscribe("edge/#")

        def detection(topic: str, _payload: bytes) -> bool:
            return topic.endswith("/vision/street/detections")

        assert sub.wait(detection, 5, 90) >= 5
        topic, payload = next((t, p) for t, p in sub.messages if detection(t, p))
        message = json.loads(payload)
        assert message["schema"] == "edge-agent.vision.detections"
        assert {"boot_id", "seq", "device_id"} <= set(message)
        assert topic == f"edge/{message['device_id']}/vision/street/detections"

        # the LLM pipeline's narrator: after 30 s, a report from the street detection counts
        def narration(topic: str, payload: bytes) -> bool:
            return topic.endswith("/result") and b'"source":"narrator"' in payload

        assert sub.wait(narration, 1, 90) >= 1
        report = json.loads(next(p for t, p in sub.messages if narration(t, p)))
        assert (report["status"], report["pipeline"]) == ("completed", "assistant")
        assert report["text"].strip()
        assert report["context"]["pipelines"]["street"]["frames"] > 0
        cli.signal(signal.SIGTERM)
        assert cli.wait() == 0
    finally:
        if sub is not None:
            sub.close()
        cli.kill()
    # JSON Lines on stdout as before
    stdout = [json.loads(line) for line in cli.stdout if line.startswith("{")]
    assert any(m.get("topic") == "vision/street/detections" for m in stdout)
    # the broker went with the agent
    assert not process_alive(int(record["pid"]))
    assert not Path(record["config"]).parent.exists()
    assert not (tmp_path / "state" / "local-broker.json").exists()


def test_no_local_broker_flag(defaults_env: dict[str, str], tmp_path: Path) -> None:
    cli = AgentProcess(["run", "--no-local-broker", "--frames", "2"], defaults_env)
    assert cli.wait(120) == 0, cli.stderr[-5:]
    assert not any("local MQTT broker" in line for line in cli.stderr)
    assert not (tmp_path / "state" / "local-broker.json").exists()
    assert not (tmp_path / "state" / "mqtt-outbox.sqlite").exists()
