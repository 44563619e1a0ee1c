"""Topic scheme, config validation and resolution, system telemetry readers, redaction."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.commands.builtins import redact
from agent.commands.ratelimit import TokenBucket
from agent.errors import CredentialError, TopicInvalidError
from agent.mqtt_config import MqttConfig
from agent.reporting.mqtt_runtime import settings_from_config
from agent.reporting.telemetry import SystemSampler, read_thermal_zones, read_throttling
from agent.reporting.topics import Priority, Topics, classify, priority_of, validate_relative


def test_topics_for_a_device() -> None:
    t = Topics.for_device("cam-7")
    assert t.status == "edge/cam-7/status"
    assert t.detections("street") == "edge/cam-7/vision/street/detections"
    assert t.llm_result("r1") == "edge/cam-7/llm/r1/result"
    assert t.reply("abc") == "edge/cam-7/reply/abc"
    assert t.reply(None) == "edge/cam-7/reply/_invalid"
    assert t.cmd_filter == "edge/cam-7/cmd/+"
    assert t.command_of("edge/cam-7/cmd/status.get") == "status.get"
    assert t.command_of("edge/other/cmd/status.get") is None
    assert t.command_of("edge/cam-7/cmd/a/b") is None
    assert Topics.for_device("x", "fleet/site-1/{device_id}/").prefix == "fleet/site-1/x"


@pytest.mark.parametrize("bad", ["", "a//b", "a/+/b", "a/#", "$SYS/x", "a/\x00", "x" * 129])
def test_invalid_relative_topics_are_refused(bad: str) -> None:
    with pytest.raises(TopicInvalidError):
        validate_relative(bad)


def test_bad_prefix_template_is_a_clear_error() -> None:
    with pytest.raises(TopicInvalidError, match="template"):
        Topics.for_device("x", "edge/{site}/{device_id}")
    with pytest.raises(TopicInvalidError):
        Topics.for_device("bad/id")


def test_priority_classes() -> None:
    assert priority_of("vision/a/detections") is Priority.DROPPABLE
    assert priority_of("telemetry") is Priority.DROPPABLE
    assert priority_of("llm/r/stream") is Priority.DROPPABLE
    for critical in ("vision/a/events", "llm/r/result", "events", "reply/x", "status"):
        assert priority_of(critical) is Priority.CRITICAL


def test_classify_gives_priority_and_expiry_kind() -> None:
    assert classify("vision/a/detections") == (Priority.DROPPABLE, "detections")
    assert classify("vision/a/events") == (Priority.CRITICAL, "detections")
    assert classify("llm/r/stream") == (Priority.DROPPABLE, "llm_stream")
    assert classify("llm/r/result") == (Priority.CRITICAL, "llm_stream")
    assert classify("telemetry") == (Priority.DROPPABLE, "telemetry")
    assert classify("events") == (Priority.CRITICAL, "events")
    assert classify("vision/a") == (Priority.CRITICAL, "vision/a")
    assert classify("vision/a/b/detections") == (Priority.CRITICAL, "vision/a/b/detections")


def test_response_topics_are_honoured_only_under_the_device_reply_tree() -> None:
    t = Topics.for_device("d1")
    assert t.accepts_response_topic("edge/d1/reply/ctl/42")
    assert not t.accepts_response_topic("edge/d2/reply/x")
    assert not t.accepts_response_topic("edge/d1/status")
    assert not t.accepts_response_topic("edge/d1/reply/+")


def test_mqtt_config_validation() -> None:
    cfg = MqttConfig()
    assert (cfg.port, cfg.protocol, cfg.prefix) == (1883, "auto", "edge/{device_id}")
    with pytest.raises(ValidationError, match=r"cert_file and its key"):
        MqttConfig.model_validate({"tls": {"cert_file": "/c.pem"}})
    with pytest.raises(ValidationError, match="wildcards"):
        MqttConfig.model_validate({"prefix": "edge/#"})
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        MqttConfig.model_validate({"reconnect_min_s": 5, "reconnect_max_s": 1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        MqttConfig.model_validate({"pasword": "typo"})


def test_settings_read_the_password_through_credentials(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "mqtt-password").write_text("from-systemd\n")
    (tmp_path / "pw").write_text("from-file\n")
    cfg = MqttConfig.model_validate({"username": "cam", "password_file": str(tmp_path / "pw")})
    s = settings_from_config(cfg, "cam", environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert (s.password, s.client_id, s.prefix) == ("from-systemd", "cam", "edge/cam")
    assert settings_from_config(cfg, "cam", environ={}).password == "from-file"  # noqa: S105
    assert settings_from_config(MqttConfig(), "cam", environ={}).password is None  # no user
    missing = MqttConfig.model_validate({"username": "cam"})
    with pytest.raises(CredentialError, match="mqtt-password"):
        settings_from_config(missing, "cam", environ={})


def test_tls_key_comes_from_the_credential_before_the_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-client-key").write_text("-----BEGIN PRIVATE KEY-----\n")
    fallback = tmp_path / "client.key"
    fallback.write_text("-----BEGIN PRIVATE KEY-----\n")
    cfg = MqttConfig.model_validate(
        {
            "tls": {
                "cert_file": "/c.pem",
                "key_credential": "mqtt-client-key",
                "key_file": str(fallback),
            }
        }
    )
    under_systemd = settings_from_config(cfg, "cam", environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert under_systemd.tls is not None
    assert under_systemd.tls.key_file == creds / "mqtt-client-key"
    elsewhere = settings_from_config(cfg, "cam", environ={})
    assert elsewhere.tls is not None
    assert elsewhere.tls.key_file == fallback
    fallback.unlink()
    with pytest.raises(CredentialError, match="mqtt-client-key"):
        settings_from_config(cfg, "cam", environ={})


def _zone(
    root: Path, n: int, kind: str, millideg: str, trips: dict[str, str] | None = None
) -> None:
    zone = root / "class" / "thermal" / f"thermal_zone{n}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(millideg + "\n")
    for i, (trip_kind, temp) in enumerate((trips or {}).items()):
        (zone / f"trip_point_{i}_type").write_text(trip_kind + "\n")
        (zone / f"trip_point_{i}_temp").write_text(temp + "\n")


def test_thermal_zones_and_throttling_from_sysfs(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "CPU-therm", "81500", {"passive": "80000", "critical": "105000"})
    _zone(tmp_path, 1, "GPU-therm", "45000", {"passive": "80000"})
    _zone(tmp_path, 2, "broken", "n/a")
    zones = read_thermal_zones(tmp_path)
    assert [(z.name, z.type, z.temp_c) for z in zones] == [
        ("thermal_zone0", "CPU-therm", 81.5),
        ("thermal_zone1", "GPU-therm", 45.0),
    ]
    fw = tmp_path / "devices/platform/soc/soc:firmware"
    fw.mkdir(parents=True)
    (fw / "get_throttled").write_text("0x50005\n")
    throttling = read_throttling(tmp_path)
    assert throttling["rpi_get_throttled"] == "0x50005"
    assert throttling["rpi_flags"] == [
        "under_voltage",
        "currently_throttled",
        "under_voltage_occurred",
        "throttling_occurred",
    ]
    assert throttling["trip_points_exceeded"] == {"thermal_zone0": ["passive"]}
    assert read_throttling(tmp_path / "nothing") == {}


def test_system_sampler_reads_this_process(tmp_path: Path) -> None:
    sampler = SystemSampler(sys_root=tmp_path)
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn some CPU so the sample sees it
        pass
    s = sampler.sample()
    assert s.rss_bytes > 10_000_000
    assert s.cpu_percent > 0
    assert s.thermal == []


def test_system_sampler_reads_zones_once_for_thermal_and_throttling(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "CPU-therm", "81500", {"passive": "80000", "hot": "90000"})
    _zone(tmp_path, 1, "GPU-therm", "-1500", {"passive": "80000"})
    s = SystemSampler(sys_root=tmp_path).sample()
    assert [(z.name, z.type, z.temp_c) for z in s.thermal] == [
        ("thermal_zone0", "CPU-therm", 81.5),
        ("thermal_zone1", "GPU-therm", -1.5),
    ]
    assert s.thermal == read_thermal_zones(tmp_path)
    assert (
        s.throttling
        == read_throttling(tmp_path)
        == {"trip_points_exceeded": {"thermal_zone0": ["passive"]}}
    )


def test_redaction_is_recursive_and_keeps_nulls() -> None:
    data = {"mqtt": {"password": "x", "password_file": None, "tls": [{"api_key": "k"}]}, "n": 1}
    assert redact(data) == {
        "mqtt": {"password": "***", "password_file": None, "tls": [{"api_key": "***"}]},
        "n": 1,
    }


def test_token_bucket_refills_at_its_rate() -> None:
    t = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: t[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    t[0] = 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1.0, 0)


def test_token_bucket_takes_n_tokens_whole_or_not_at_all() -> None:
    t = [0.0]
    bucket = TokenBucket(2.0, 5, clock=lambda: t[0])
    assert bucket.take(4)
    assert not bucket.take(2)  # one left: nothing taken
    assert bucket.take(1)
    t[0] = 1.0  # two tokens back
    assert [bucket.take(3), bucket.take(2)] == [False, True]
