"""Commands end to end over a real mosquitto: a controller publishes on cmd/{command} (with
and without an MQTT 5 Response Topic), the agent's MQTT runtime (``open_mqtt`` from config)
decides, replies and audits."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import PASSWORD, Monitor, MosquittoBroker, close_monitor, open_monitor
from commands_support import envelope, make_keys, register_test_commands, signed
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_commands import _commands, _materialise, _payloads

from agent.config import AgentConfig
from agent.mqtt_config import MqttConfig
from agent.reporting.messages import (
    TERMINAL_STATUSES,
    AuditEvent,
    CommandReply,
    StatusMessage,
    TelemetryMessage,
)
from agent.reporting.mqtt_runtime import MqttRuntime, open_mqtt


class Agentish:
    """What a test needs of one device: its MQTT runtime, controller view and signing key."""

    def __init__(
        self,
        broker: MosquittoBroker,
        device: str,
        tmp: Path,
        *,
        mqtt: dict[str, Any] | None = None,
        telemetry: Any = None,
        **commands: Any,
    ) -> None:
        self.device = device
        self.tmp = tmp
        self.key: Ed25519PrivateKey = make_keys(tmp / "keys")
        (tmp / "pw").write_text(PASSWORD + "\n")
        self.cfg = MqttConfig.model_validate(
            {
                "host": "127.0.0.1",
                "port": broker.port,
                "username": device,
                "password_file": str(tmp / "pw"),
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.3,
                "commands": {"trusted_keys_dir": str(tmp / "keys"), **commands},
                **(mqtt or {}),
            }
        )
        agent_cfg = AgentConfig.model_validate(
            {"device_id": device, "reporting": {"mqtt": self.cfg.model_dump(mode="json")}}
        )
        self.loads: list[str] = []
        self.rt: MqttRuntime = open_mqtt(
            self.cfg,
            device_id=device,
            state_dir=tmp / "state",
            version="t",
            status=lambda: {"state": "running", "device": device},
            config=lambda: agent_cfg,
            telemetry=telemetry,
            environ={},
        )
        register_test_commands(self.rt.registry, self.loads)
        self.mon: Monitor = open_monitor(broker, f"edge/{device}/#")
        self.rt.start()
        if not self.rt.reporter.wait_connected(10):
            pytest.fail(f"agent did not connect: {self.rt.reporter.stats()}")

    def topic(self, command: str) -> str:
        return f"edge/{self.device}/cmd/{command}"

    def send(
        self, command: str, payload: Any, *, corr: str | None = None, response: str | None = None
    ) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if corr is not None and response is None:
            response = f"edge/{self.device}/reply/ctl"
        self.mon.send(
            self.topic(command),
            data,
            response_topic=response,
            correlation=corr.encode() if corr else None,
        )

    def replies(self, corr: str) -> list[CommandReply]:
        got = self.mon.wait_for(
            lambda m: (
                "/reply/" in m.topic and m.correlation == corr.encode() and _terminal(m.payload)
            )
        )
        return [CommandReply.model_validate_json(m.payload) for m in got]

    def close(self) -> None:
        self.rt.close()
        close_monitor(self.mon)


def _terminal(payload: bytes) -> bool:
    try:
        return bool(json.loads(payload).get("terminal"))
    except ValueError:
        return False


@pytest.fixture
def agent(broker: MosquittoBroker, device: str, tmp_path: Path) -> Iterator[Agentish]:
    a = Agentish(broker, device, tmp_path)
    try:
        yield a
    finally:
        a.close()


def test_round_trips_with_response_topic_and_correlation(agent: Agentish) -> None:
    key, dev = agent.key, agent.device
    now = time.time()
    cases: list[tuple[str, Any, str, str]] = [
        ("status.get", envelope(), "succeeded", "ok"),
        ("config.get", envelope(), "succeeded", "ok"),
        ("no.such", envelope(), "rejected", "unknown_command"),
        ("status.get", b"{oops", "rejected", "bad_json"),
        ("status.get", {"command_id": "only-id"}, "rejected", "schema_invalid"),
        ("status.get", envelope(issued=now - 200, ttl=100), "expired", "expired"),
        ("model.load", envelope(args={"name": "yolox"}), "rejected", "signature_required"),
        (
            "model.load",
            {
                **signed(envelope(args={"name": "a"}), "model.load", key, device=dev),
                "args": {"name": "b"},
            },
            "rejected",
            "signature_invalid",
        ),
        (
            "model.load",
            signed(envelope(args={"name": "yolox"}), "model.load", key, device="other"),
            "rejected",
            "signature_invalid",
        ),
        (
            "model.load",
            signed(envelope(args={"name": "yolox"}), "model.load", key, device=dev),
            "succeeded",
            "ok",
        ),
        ("test.explode", envelope(), "failed", "internal_error"),
        ("status.get", b"x" * 70_000, "rejected", "payload_too_large"),
    ]
    for i, (command, payload, _, _) in enumerate(cases):
        agent.send(command, payload, corr=f"c{i}")
    for i, (command, payload, status, reason) in enumerate(cases):
        (reply,) = agent.replies(f"c{i}")
        assert (reply.status, reply.reason) == (status, reason), (command, reply.message)
        assert reply.command == command
        if isinstance(payload, dict) and "issued_at" in payload:
            assert reply.command_id == payload["command_id"]
    config = next(r for r in agent.replies("c1"))
    assert config.result is not None
    mqtt = config.result["reporting"]["mqtt"]
    assert mqtt["host"] == "127.0.0.1"
    assert mqtt["password_file"] == "***"  # noqa: S105 - the redaction marker
    assert agent.loads == ["yolox"]
    time.sleep(0.2)
    for i in range(len(cases)):  # still exactly one each after a while
        assert len(agent.replies(f"c{i}")) == 1


def test_replies_without_response_topic_go_to_reply_command_id(agent: Agentish) -> None:
    env = envelope()
    agent.send("status.get", env)
    agent.send("status.get", b"not json")
    agent.send("status.get", envelope(), response="elsewhere/inbox")  # outside the prefix
    by_id = agent.mon.wait_for(
        lambda m: m.topic == f"edge/{agent.device}/reply/{env['command_id']}"
    )
    invalid = agent.mon.wait_for(lambda m: m.topic == f"edge/{agent.device}/reply/_invalid")
    assert CommandReply.model_validate_json(by_id[0].payload).status == "succeeded"
    assert CommandReply.model_validate_json(invalid[0].payload).reason == "bad_json"
    assert len(agent.mon.wait_count(lambda m: "/reply/" in m.topic, 3)) == 3


def test_replayed_command_is_not_run_again_and_is_audited(agent: Agentish) -> None:
    env = signed(envelope(args={"name": "yolox"}), "model.load", agent.key, device=agent.device)
    agent.send("model.load", env, corr="first")
    (first,) = agent.replies("first")
    agent.send("model.load", env, corr="again")
    audit = agent.mon.wait_for(lambda m: m.topic.endswith("/events") and b'"replayed"' in m.payload)
    record = AuditEvent.model_validate_json(audit[0].payload).record
    assert (first.status, record.decision, record.reason, record.replied) == (
        "succeeded",
        "rejected",
        "replayed",
        False,
    )
    assert record.command_id == env["command_id"]
    assert (
        agent.mon.wait_for(lambda m: "/reply/" in m.topic and m.correlation == b"again", 0.5) == []
    )
    assert agent.loads == ["yolox"]
    lines = (agent.tmp / "state" / "command-audit.jsonl").read_text().splitlines()
    assert [json.loads(x)["reason"] for x in lines] == ["ok", "replayed"]


def test_rate_limited_commands_are_busy(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    a = Agentish(broker, device, tmp_path, rate_limits={"read": {"rate_per_s": 0.001, "burst": 2}})
    try:
        for i in range(4):
            a.send("status.get", envelope(), corr=f"r{i}")
        reasons = [a.replies(f"r{i}")[0].reason for i in range(4)]
    finally:
        a.close()
    assert reasons == ["ok", "ok", "rate_limited", "rate_limited"]


def test_long_command_reports_accepted_progress_and_result(agent: Agentish) -> None:
    agent.send("job.slow", envelope(), corr="long")
    (final,) = agent.replies("long")
    statuses = [
        json.loads(m.payload)["status"]
        for m in agent.mon.snapshot()
        if "/reply/" in m.topic and m.correlation == b"long"
    ]
    assert statuses == ["accepted", "progress", "progress", "progress", "succeeded"]
    assert final.result == {"steps": 3}


@pytest.mark.slow
@settings(
    max_examples=1,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=st.lists(st.tuples(_commands, _payloads), min_size=300, max_size=300))
def test_fuzz_over_the_broker_one_reply_each_or_audited_replay(
    broker: MosquittoBroker,
    device: str,
    tmp_path_factory: pytest.TempPathFactory,
    batch: list[tuple[str, Any]],
) -> None:
    a = Agentish(
        broker,
        device,
        tmp_path_factory.mktemp("fuzz"),
        rate_limits={
            k: {"rate_per_s": 1000, "burst": 1000} for k in ("read", "control", "critical")
        },
        queue_size=400,
    )
    now = time.time()
    try:
        for i, (command, payload) in enumerate(batch):
            a.send(command, _materialise(payload, now), corr=f"f{i}")
        audits = a.mon.wait_count(
            lambda m: m.topic.endswith("/events") and b"command_audit" in m.payload,
            len(batch),
            timeout=30,
        )
        replies = [
            m
            for m in a.mon.snapshot()
            if "/reply/" in m.topic and m.correlation and _terminal(m.payload)
        ]
    finally:
        a.close()
    per_message = Counter(m.correlation for m in replies)
    assert max(per_message.values()) == 1  # never two terminal replies for one message
    records = [AuditEvent.model_validate_json(m.payload).record for m in audits]
    replayed = [r for r in records if r.reason == "replayed"]
    assert len(records) == len(batch)
    assert len(per_message) + len(replayed) == len(batch)
    assert {
        CommandReply.model_validate_json(m.payload).status for m in replies
    } <= TERMINAL_STATUSES


def test_runtime_turns_agent_status_into_retained_status_and_sends_telemetry(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    """What ``Agent._set_state`` hands every sink (``publish("status", snapshot)``) becomes the
    retained status; the telemetry thread publishes the source's figures every interval."""
    rounds: list[int] = []

    def figures() -> dict[str, dict[str, Any]]:
        rounds.append(1)
        return {"street": {"fps": 9.5, "round": len(rounds)}}

    a = Agentish(broker, device, tmp_path, mqtt={"telemetry_interval_s": 0.1}, telemetry=figures)
    try:
        snapshot = {
            "state": "degraded",
            "boot_id": "agent-boot",
            "device_id": device,
            "pinning": {"process_cpus": [0, 1]},
            "pipelines": [
                {"name": "street", "model": "yolox_nano", "state": "running"},
                {"name": "door", "model": "deimv2", "state": "failed"},
            ],
        }
        a.rt.publish("status", snapshot)
        status = a.mon.wait_for(lambda m: m.topic.endswith("/status") and b"degraded" in m.payload)
        tel = a.mon.wait_count(lambda m: m.topic.endswith("/telemetry"), 2)
    finally:
        a.close()
    got = StatusMessage.model_validate_json(status[-1].payload)
    assert (got.state, got.agent_state, got.reason) == (
        "degraded",
        "degraded",
        "pipelines failed: door",
    )
    assert got.models == ["yolox_nano"]
    assert got.pipelines == {"street": "running", "door": "failed"}
    assert got.pinning == {"process_cpus": [0, 1]}
    rounds_seen = [
        TelemetryMessage.model_validate_json(m.payload).pipelines["street"]["round"] for m in tel
    ]
    assert rounds_seen[:2] == [1, 2]
