"""Home Assistant MQTT discovery against a real mosquitto (deploy ACL): retained sensor configs
for the agent status and per-pipeline counts, kept in step with pipeline.set, readable by a
client that connects later."""

from __future__ import annotations

import json
from pathlib import Path

from broker_support import MosquittoBroker, close_monitor, open_monitor
from commands_support import make_keys
from test_agent_control import Controlled, _mqtt, _pipeline

from agent.config import AgentConfig
from agent.process import Agent
from agent.reporting.homeassistant import object_id
from agent.reporting.messages import HaSensorConfig


def _retained_configs(broker: MosquittoBroker, device: str, count: int) -> dict[str, bytes]:
    """The retained discovery configs a newly connecting client gets (empty ones deleted)."""
    mon = open_monitor(broker, f"homeassistant/sensor/{device}/#")
    try:
        got = mon.wait_count(lambda m: m.retain, count, 10)
        return {m.topic: m.payload for m in got}
    finally:
        close_monitor(mon)


def test_discovery_configs_follow_the_pipelines(
    broker: MosquittoBroker, device: str, tmp_path: Path, models_dir: Path, data_dir: Path
) -> None:
    key = make_keys(tmp_path / "keys")
    pipeline = {**_pipeline(), "classes": ["person", "car"]}
    mqtt = _mqtt(broker, device, tmp_path, home_assistant={})
    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "reporting": {"jsonl": {"enabled": False}, "mqtt": mqtt},
            "pipelines": [pipeline],
        }
    )
    env = {"EDGE_AGENT_MODEL_PATH": str(models_dir), "EDGE_AGENT_DATA_PATH": str(data_dir)}
    mon = open_monitor(broker, f"edge/{device}/#")
    agent = Agent(config, environ=env)
    base = f"homeassistant/sensor/{device}"
    try:
        agent.start()
        c = Controlled(agent, mon, key, device, tmp_path / "state")
        assert agent.mqtt is not None
        assert agent.mqtt.reporter.flush(10)
        configs = _retained_configs(broker, device, 4)
        assert set(configs) == {
            f"{base}/status/config",
            f"{base}/street_detections/config",
            f"{base}/street_person_count/config",
            f"{base}/street_car_count/config",
        }
        sensors = {t: HaSensorConfig.model_validate_json(p) for t, p in configs.items()}
        for sensor in sensors.values():
            assert sensor.device.identifiers == [f"edge-agent-{device}"]
            assert sensor.device.sw_version == agent.version
        status = sensors[f"{base}/status/config"]
        assert status.state_topic == f"edge/{device}/status"
        assert status.value_template == "{{ value_json.state }}"
        person = sensors[f"{base}/street_person_count/config"]
        assert person.state_topic == f"edge/{device}/vision/street/detections"
        assert person.value_template == "{{ value_json.counts.get('person', 0) }}"
        assert person.unique_id == f"{device}_street_person_count"
        assert person.availability[0].topic == f"edge/{device}/status"
        assert "value_json.state == 'offline'" in person.availability[0].value_template
        # the fields the templates read are what the agent really publishes
        c.wait_detections(45)
        detections = c.detections()
        assert all(isinstance(d["counts"], dict) for d in detections)
        assert any(d["counts"].get("person", 0) > 0 for d in detections)
        assert all(set(d["counts"]) <= {"person", "car"} for d in detections)
        state = c.retained_status(lambda _s: True)
        assert state.state in ("online", "degraded")

        # narrowing the allow-list deletes the car sensor (empty retained payload), nothing else
        reply = c.call("pipeline.set", {"name": "street", "classes": ["person"]})
        assert reply.status == "succeeded", reply.message
        assert agent.mqtt.reporter.flush(10)
        configs = _retained_configs(broker, device, 3)
        assert f"{base}/street_car_count/config" not in configs
        assert set(configs) == {
            f"{base}/status/config",
            f"{base}/street_detections/config",
            f"{base}/street_person_count/config",
        }
    finally:
        agent.stop()
        close_monitor(mon)
    # still retained after the agent stopped (Home Assistant shows the entities unavailable)
    assert len(_retained_configs(broker, device, 3)) == 3


def test_discovery_needs_no_pipelines_and_quotes_odd_labels(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    mqtt = _mqtt(broker, device, tmp_path, home_assistant={"discovery_prefix": "homeassistant"})
    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "reporting": {"jsonl": {"enabled": False}, "mqtt": mqtt},
        }
    )
    agent = Agent(config, environ={})
    try:
        agent.start()
        assert agent.mqtt is not None
        discovery = agent.mqtt.discovery
        assert discovery is not None
        assert agent.mqtt.reporter.flush(10)
        configs = _retained_configs(broker, device, 1)
        assert list(configs) == [f"homeassistant/sensor/{device}/status/config"]
        # a label with a quote and spaces: a valid object id, an escaped Jinja literal
        assert discovery.update({"yard": ["o'neil sign"]}) == 2  # status unchanged
        assert discovery.update({"yard": ["o'neil sign"]}) == 0  # unchanged: nothing re-sent
        assert agent.mqtt.reporter.flush(10)
        oid = object_id("yard", "o'neil sign", "count")
        assert oid == "yard_o_neil_sign_count"
        configs = _retained_configs(broker, device, 3)
        sensor = HaSensorConfig.model_validate_json(
            configs[f"homeassistant/sensor/{device}/{oid}/config"]
        )
        assert sensor.value_template == "{{ value_json.counts.get('o\\'neil sign', 0) }}"
        assert json.loads(configs[f"homeassistant/sensor/{device}/{oid}/config"])["name"] == (
            "yard o'neil sign"
        )
        # Home Assistant's format: not stamped
        assert all("boot_id" not in json.loads(p) for p in configs.values())
    finally:
        agent.stop()
