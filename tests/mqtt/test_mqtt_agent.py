"""The agent with ``[reporting.mqtt]`` against a real mosquitto: retained status follows the
agent's lifecycle, status.get answers with the agent's status, a clean stop leaves it offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broker_support import PASSWORD, MosquittoBroker, close_monitor, open_monitor
from commands_support import envelope

from agent.config import AgentConfig
from agent.errors import CredentialError
from agent.process import Agent
from agent.reporting.messages import CommandReply, StatusMessage


def _config(broker: MosquittoBroker, device: str, tmp_path: Path, **mqtt: object) -> AgentConfig:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    return AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "reporting": {
                "jsonl": {"path": str(tmp_path / "results.jsonl")},
                "mqtt": {
                    "port": broker.port,
                    "username": device,
                    "password_file": str(tmp_path / "pw"),
                    "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.3,
                    "commands": {"trusted_keys_dir": str(tmp_path / "keys")},
                    **mqtt,
                },
            },
        }
    )


def test_agent_reports_over_mqtt_and_answers_status_get(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    mon = open_monitor(broker, f"edge/{device}/#")
    agent = Agent(_config(broker, device, tmp_path), environ={})
    try:
        agent.start()
        assert agent.mqtt is not None
        assert agent.mqtt.reporter.wait_connected(10)
        ready = mon.wait_for(
            lambda m: m.topic.endswith("/status") and b'"agent_state":"ready"' in m.payload
        )
        status = StatusMessage.model_validate_json(ready[-1].payload)
        assert (status.state, status.boot_id) == ("online", agent.boot_id)
        mon.send(
            f"edge/{device}/cmd/status.get",
            json.dumps(envelope()),
            response_topic=f"edge/{device}/reply/ctl",
            correlation=b"q",
        )
        (reply,) = mon.wait_for(lambda m: "/reply/" in m.topic and m.correlation == b"q")
        body = CommandReply.model_validate_json(reply.payload)
        assert body.status == "succeeded"
        assert body.result is not None
        assert (body.result["state"], body.result["boot_id"]) == ("ready", agent.boot_id)
    finally:
        agent.stop()
    offline = mon.wait_for(lambda m: m.topic.endswith("/status") and b'"offline"' in m.payload)
    close_monitor(mon)
    assert json.loads(offline[-1].payload)["reason"] == "shutdown"
    audit = (tmp_path / "state" / "command-audit.jsonl").read_text().splitlines()
    assert [json.loads(x)["reason"] for x in audit] == ["ok"]
    assert (tmp_path / "state" / "mqtt-outbox.sqlite").exists()


def test_agent_start_fails_clearly_without_the_mqtt_password(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    config = _config(broker, device, tmp_path, password_file=str(tmp_path / "missing"))
    agent = Agent(config, environ={})
    with pytest.raises(CredentialError, match="mqtt-password"):
        agent.start()
    agent.stop()
    assert agent.mqtt is None
