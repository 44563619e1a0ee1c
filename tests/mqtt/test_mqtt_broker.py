"""The MQTT reporter against a real mosquitto (password auth + the deploy ACL): stamped results,
retained status, ACL-denied publishes, MQTT 3.1.1 fallback, TLS, outbox replay on restart,
telemetry."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from broker_support import (
    MosquittoBroker,
    Received,
    close_monitor,
    device_settings,
    free_port,
    open_monitor,
    running_broker,
)
from v311_proxy import V311OnlyProxy

from agent.reporting.messages import StatusMessage, TelemetryMessage
from agent.reporting.mqtt import MqttReporter, TlsSettings
from agent.reporting.outbox import Outbox
from pipelines.errors import SinkError


def _json(m: Received) -> dict:
    return json.loads(m.payload)


def _reporter(broker: MosquittoBroker, device: str, tmp_path: Path, **kw: object) -> MqttReporter:
    settings = device_settings(broker, device, **kw)
    return MqttReporter(settings, Outbox(tmp_path / f"{device}.sqlite"), version="9.9-test")


def test_results_arrive_stamped_and_in_order(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    mon = open_monitor(broker, f"edge/{device}/#")
    rep = _reporter(broker, device, tmp_path)
    rep.start()
    try:
        assert rep.wait_connected(10), rep.stats()
        for i in range(300):
            rep.publish("vision/street/detections", {"frame": i, "detections": []})
            if i % 100 == 0:
                rep.publish("vision/street/events", {"event": "enter", "frame": i})
        assert rep.flush(10)
        got = mon.wait_count(lambda m: "/vision/" in m.topic, 303)
    finally:
        rep.stop()
        rep.outbox.close()
        close_monitor(mon)
    frames = [_json(m)["frame"] for m in got if m.topic.endswith("/detections")]
    assert frames == list(range(300))
    stamps = [_json(m) for m in got]
    assert {s["boot_id"] for s in stamps} == {rep.boot_id}
    assert {s["device_id"] for s in stamps} == {device}
    seqs = [s["seq"] for s in stamps]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert rep.stats()["protocol"] == "5"


def test_status_is_retained_online_then_offline_on_clean_stop(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    rep = _reporter(broker, device, tmp_path)
    rep.set_status("degraded", reason="camera_lost", models=["yolox_nano"])
    rep.start()
    assert rep.wait_connected(10)
    mon = open_monitor(broker, f"edge/{device}/status")  # subscribes after the birth: retained
    try:
        (birth,) = mon.wait_for(lambda m: m.retain)
        status = StatusMessage.model_validate_json(birth.payload)
        assert (status.state, status.reason, status.models) == (
            "degraded",
            "camera_lost",
            ["yolox_nano"],
        )
        assert (status.boot_id, status.version) == (rep.boot_id, "9.9-test")
        rep.stop()
        offline = mon.wait_for(lambda m: _json(m)["state"] == "offline")
        assert offline
        assert _json(offline[0])["reason"] == "shutdown"
    finally:
        rep.stop()
        rep.outbox.close()
        close_monitor(mon)
    late = open_monitor(broker, f"edge/{device}/status")
    try:
        (retained,) = late.wait_for(lambda m: m.retain)
        assert _json(retained)["state"] == "offline"
    finally:
        close_monitor(late)


def test_bad_pipeline_messages_are_sink_errors(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    rep = _reporter(broker, device, tmp_path)
    try:
        with pytest.raises(SinkError, match="reserved key"):
            rep.publish("vision/a/detections", {"seq": 1})
        with pytest.raises(SinkError, match="JSON"):
            rep.publish("vision/a/detections", {"x": float("nan")})
        with pytest.raises(SinkError, match="not a valid MQTT topic level"):
            rep.publish("vision/+/detections", {"x": 1})
        with pytest.raises(SinkError, match="empty"):
            rep.publish("", {"x": 1})
    finally:
        rep.stop()
        rep.outbox.close()
    with pytest.raises(SinkError, match="closed"):
        rep.publish("vision/a/detections", {"x": 1})


def test_acl_denied_publish_is_detected_and_dead_lettered(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    """mosquitto answers an ACL-denied QoS 1 publish with PUBACK 0x87 under MQTT 5 (and then
    drops the connection); the reporter dead-letters that message, reconnects and goes on."""
    mon = open_monitor(broker, f"edge/{device}/#")
    rep = _reporter(broker, device, tmp_path, loss_event_interval_s=0.05)
    rep.start()
    try:
        assert rep.wait_connected(10)
        rep.publish("vision/street/events", {"n": 1})
        rep.publish("misc/not-in-acl", {"n": 2})  # the ACL lets a device write only its topics
        rep.publish("vision/street/events", {"n": 3})
        assert rep.flush(10), rep.stats()
        events = mon.wait_count(lambda m: m.topic.endswith("/vision/street/events"), 2)
        losses = mon.wait_for(lambda m: m.topic.endswith("/events") and b"dead_letter" in m.payload)
    finally:
        rep.stop()
        rep.outbox.close()
        close_monitor(mon)
    assert sorted(_json(m)["n"] for m in events) == [1, 3]
    assert not [m for m in mon.snapshot() if "misc" in m.topic]
    with Outbox(tmp_path / f"{device}.sqlite") as reopened:  # dead letters are durable
        (dead,) = reopened.dead_letters()
    assert (dead.topic, dead.reason_code, dead.reason) == (
        f"edge/{device}/misc/not-in-acl",
        0x87,
        "not_authorized",
    )
    event = _json(losses[0])
    assert (event["kind"], event["what"], event["reason_code"], event["topic"]) == (
        "outbox",
        "dead_letter",
        0x87,
        f"edge/{device}/misc/not-in-acl",
    )
    assert rep.stats()["connects"] >= 2  # mosquitto closed the connection after the denial


def test_falls_back_to_mqtt_311_when_the_broker_refuses_v5(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    proxy = V311OnlyProxy(broker.port)
    mon = open_monitor(broker, f"edge/{device}/#")
    rep = _reporter(broker, device, tmp_path, port=proxy.port)
    rep.start()
    try:
        assert rep.wait_connected(10), rep.stats()
        rep.publish("vision/street/events", {"via": "3.1.1"})
        assert rep.flush(10)
        assert mon.wait_for(lambda m: m.topic.endswith("/vision/street/events"))
    finally:
        rep.stop()
        rep.outbox.close()
        close_monitor(mon)
        proxy.close()
    assert rep.protocol == "3.1.1"
    assert proxy.refused_v5 >= 1
    assert proxy.forwarded >= 1


def test_tls_listener_with_client_certificate(device: str, tmp_path: Path) -> None:
    with running_broker(tls=True) as tls_broker:
        files = tls_broker.tls_files
        tls = TlsSettings(
            ca_file=files["ca"], cert_file=files["client_cert"], key_file=files["client_key"]
        )
        mon = open_monitor(tls_broker, f"edge/{device}/#")
        rep = _reporter(tls_broker, device, tmp_path, port=tls_broker.tls_port, tls=tls)
        rep.start()
        try:
            assert rep.wait_connected(10), rep.stats()
            rep.publish("vision/street/events", {"secure": True})
            assert rep.flush(10)
            assert mon.wait_for(lambda m: m.topic.endswith("/vision/street/events"))
        finally:
            rep.stop()
            rep.outbox.close()
            close_monitor(mon)
        # without the CA the broker certificate is not trusted: no connection
        bad = _reporter(
            tls_broker, device, tmp_path / "bad", port=tls_broker.tls_port, tls=TlsSettings()
        )
        bad.start()
        try:
            assert not bad.wait_connected(1.5)
            assert "certificate" in (bad.last_error or "").lower()
        finally:
            bad.stop()
            bad.outbox.close()


def test_outbox_replays_messages_of_a_previous_run(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on: the first run never connects
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    first = _reporter(broker, device, tmp_path, port=dead_port)
    first.start()
    for i in range(50):
        first.publish("vision/street/events", {"i": i})
        first.publish("vision/street/detections", {"i": i})
    first.stop()
    first.outbox.close()
    mon = open_monitor(broker, f"edge/{device}/vision/#")
    second = _reporter(broker, device, tmp_path)
    second.start()
    try:
        assert second.flush(10), second.stats()
        got = mon.wait_count(lambda _m: True, 100)
    finally:
        second.stop()
        second.outbox.close()
        close_monitor(mon)
    assert len(got) == 100
    assert {_json(m)["boot_id"] for m in got} == {first.boot_id}
    assert [_json(m)["i"] for m in got if m.topic.endswith("events")] == list(range(50))
    assert second.boot_id != first.boot_id


def test_telemetry_carries_system_outbox_and_pipeline_figures(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    mon = open_monitor(broker, f"edge/{device}/telemetry")
    rep = _reporter(broker, device, tmp_path)
    rep.start()
    try:
        assert rep.wait_connected(10)
        busy = time.process_time() + 0.05
        while time.process_time() < busy:
            pass
        rep.publish_telemetry(
            {"street": {"fps": 12.5, "latency_ms": {"p50": 20.0}}}, llm={"tok_s": 7}
        )
        (msg,) = mon.wait_for(lambda _m: True)
    finally:
        rep.stop()
        rep.outbox.close()
        close_monitor(mon)
    tel = TelemetryMessage.model_validate_json(msg.payload)
    assert tel.pipelines == {"street": {"fps": 12.5, "latency_ms": {"p50": 20.0}}}
    assert tel.llm == {"tok_s": 7}
    assert tel.system.rss_bytes > 10_000_000
    assert tel.system.cpu_percent > 0
    assert tel.outbox.connected


def test_unreachable_broker_keeps_everything_for_later(device: str, tmp_path: Path) -> None:
    from broker_support import PASSWORD

    from agent.reporting.mqtt import MqttSettings

    settings = MqttSettings(
        host="127.0.0.1",
        port=free_port(),
        device_id=device,
        client_id=device,
        prefix=f"edge/{device}",
        username=device,
        password=PASSWORD,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )
    rep = MqttReporter(settings, Outbox(tmp_path / "o.sqlite"), version="t")
    rep.start()
    try:
        for i in range(500):
            rep.publish("vision/x/detections", {"i": i})  # returns without a broker
        deadline = time.monotonic() + 10
        while rep.stats()["connect_failures"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rep.stats()["connect_failures"] >= 2
        assert not rep.connected
        assert "failed" in (rep.last_error or "")
    finally:
        rep.stop()
        rep.outbox.close()
    with Outbox(tmp_path / "o.sqlite") as reopened:
        assert reopened.depth == 500  # all kept for the next connection
