"""``bundle.install`` over MQTT, end to end: a real Agent (in-process, and once as a real
``edge-agent run`` process) on a real mosquitto, real signed bundles (the production writer,
tests/bundles/bundle_support.py), a real HTTP server for URL installs
(tests/bundles/http_support.py). The controller signs the command with Ed25519 (critical) and
checks each command's replies: ``accepted``, ``progress`` with a growing fraction in phase
order, exactly one terminal reply with the slot and version or the bundle error's reason."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_process_support import AgentProcess, base_env
from broker_support import PASSWORD, MosquittoBroker, Received, close_monitor, open_monitor
from commands_support import make_keys
from test_agent_control import Controlled
from wait_support import wait_for

from agent.bundles.signing import SigningKey
from agent.bundles.slots import SlotStore
from agent.config import AgentConfig
from agent.process import RESTART_EXIT_STATUS, Agent
from agent.reporting.messages import CommandReply

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles"))

from bundle_support import make_bundle, make_key
from http_support import serving

CONFIG_TOML = 'device_id = "cam-7"\n'
"""The bundles' config/agent.toml (validated by the installer; this agent never boots it)."""


def _mqtt(broker: MosquittoBroker, device: str, tmp: Path) -> dict[str, Any]:
    (tmp / "pw").write_text(PASSWORD + "\n")
    fast = {"rate_per_s": 50, "burst": 50}
    return {
        "port": broker.port,
        "username": device,
        "password_file": str(tmp / "pw"),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "commands": {
            "trusted_keys_dir": str(tmp / "keys"),
            "rate_limits": {"read": fast, "control": fast, "critical": fast},
        },
    }


@dataclass
class Device(Controlled):
    bundle_key: SigningKey
    tmp: Path

    def bundle(self, version: str, *, key: SigningKey | None = None, **kw: Any) -> Path:
        return make_bundle(
            self.tmp / f"street-{version}-{uuid.uuid4().hex[:6]}.bundle",
            {
                "models/street.onnx": os.urandom(1_500_000),
                "config/agent.toml": CONFIG_TOML.encode(),
            },
            version=version,
            key=self.bundle_key if key is None else key,
            **kw,
        )

    def mine(self, corr: str) -> Any:
        def match(m: Received) -> bool:
            return "/reply/" in m.topic and m.correlation == corr.encode()

        return match

    def install(self, args: dict[str, Any], timeout: float = 60) -> list[CommandReply]:
        """Every reply of one signed bundle.install, once its terminal reply arrived."""
        got = self.replies(self.send("bundle.install", args, sign=True), timeout)
        assert sum(r.terminal for r in got) == 1, got
        assert got[-1].terminal, got
        return got


@pytest.fixture
def dev(broker: MosquittoBroker, device: str, tmp_path: Path) -> Iterator[Device]:
    key = make_keys(tmp_path / "keys")
    bundle_key, _private, public = make_key(tmp_path / "release-keys", "release")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "reporting": {"jsonl": {"enabled": False}, "mqtt": _mqtt(broker, device, tmp_path)},
            "bundles": {"trusted_keys_dir": str(trusted)},
        }
    )
    mon = open_monitor(broker, f"edge/{device}/#")
    agent = Agent(config, environ={})
    try:
        agent.start()
        assert agent.mqtt is not None
        assert agent.mqtt.reporter.wait_connected(10)
        yield Device(agent, mon, key, device, tmp_path / "state", bundle_key, tmp_path)
    finally:
        agent.stop()
        close_monitor(mon)


def _progress(replies: list[CommandReply]) -> list[CommandReply]:
    return [r for r in replies if r.status == "progress"]


def _store(dev: Device) -> SlotStore:
    return SlotStore(dev.state)


def test_install_from_a_path_reports_progress_then_restarts(dev: Device) -> None:
    bundle = dev.bundle("1.1.0")
    replies = dev.install({"path": str(bundle)})
    assert replies[0].status == "accepted"
    final = replies[-1]
    assert (final.status, final.reason) == ("succeeded", "ok"), final.message
    assert final.result == {
        "slot": "a",
        "version": "1.1.0",
        "previous_version": None,
        "restarting": True,
    }
    progress = _progress(replies)
    fractions = [r.progress for r in progress]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    texts = [r.message for r in progress]
    assert texts[0].startswith("verifying"), texts
    assert any("extract" in t for t in texts), texts
    assert texts[-1].startswith("installed"), texts
    assert "slot a" in texts[-1], texts
    # then the agent stops to exit 75, for systemd to boot the new slot
    assert dev.agent.stop_event.wait(10)
    assert dev.agent.exit_status == RESTART_EXIT_STATUS
    store = _store(dev)
    assert store.current_slot() == "a"
    state = store.read_state()
    assert state.pending is not None
    assert (state.pending.slot, state.pending.version, state.pending.attempts) == ("a", "1.1.0", 0)
    assert (store.files_dir("a") / "config" / "agent.toml").read_text() == CONFIG_TOML
    # stopping for the restart: another install is refused, nothing else is written
    again = dev.install({"path": str(dev.bundle("1.2.0"))})[-1]
    assert (again.status, again.reason) == ("failed", "agent_stopping"), again.message
    assert store.installed("b") is None


def test_url_install_downloads_first_and_a_second_install_meanwhile_is_busy(
    dev: Device,
) -> None:
    bundle = dev.bundle("1.2.0")
    data = bundle.read_bytes()
    with serving({"/street.bundle": data}) as srv:
        srv.delay_s = 0.05  # ~0.6 MB/s: the download is still running when the second arrives
        srv.chunk = 32 * 1024
        first = dev.send("bundle.install", {"url": srv.url("/street.bundle")}, sign=True)
        downloading = dev.mon.wait_for(
            lambda m: dev.mine(first)(m) and b'"status":"progress"' in m.payload, 30
        )
        assert downloading, "no progress reply from the first install"
        second = dev.install({"path": str(dev.bundle("1.3.0"))})
        assert [r.status for r in second] == ["busy"], second
        assert second[-1].reason == "busy"
        assert "another bundle.install is running" in second[-1].message
        srv.delay_s = 0.0
        replies = dev.replies(first, 60)
        assert srv.requests == [None]
    final = replies[-1]
    assert (final.status, final.reason) == ("succeeded", "ok"), final.message
    assert final.result is not None
    assert (final.result["slot"], final.result["version"]) == ("a", "1.2.0")
    progress = _progress(replies)
    fractions = [r.progress for r in progress]
    assert fractions == sorted(fractions)
    texts = [r.message for r in progress]
    downloads = [n for n, t in enumerate(texts) if t.startswith("download")]
    verifying = [n for n, t in enumerate(texts) if t.startswith("verifying")]
    assert downloads, texts
    assert verifying, texts
    assert max(downloads) < min(verifying), texts
    assert f"download {len(data)}/{len(data)} bytes" in texts
    assert dev.agent.exit_status == RESTART_EXIT_STATUS
    left = sorted(p.name for p in _store(dev).downloads_dir.iterdir())
    assert [n for n in left if not n.endswith(".lock")] == []  # the installed file removed


def test_install_while_the_cli_holds_the_slots_is_busy(dev: Device) -> None:
    bundle = dev.bundle("1.1.0")
    with _store(dev).lock():  # as a running `edge-agent bundle install` holds it
        replies = dev.install({"path": str(bundle)})
    assert (replies[-1].status, replies[-1].reason) == ("busy", "busy"), replies[-1].message
    assert "lock" in replies[-1].message
    assert dev.agent.exit_status == 0
    assert not dev.agent.stop_event.is_set()
    assert _store(dev).current_slot() is None


def test_failures_answer_the_bundle_reason_and_change_nothing(dev: Device) -> None:
    other_key, _, _ = make_key(dev.tmp / "other-keys", "release")
    garbage = dev.tmp / "garbage.bundle"
    garbage.write_bytes(os.urandom(4096))
    with serving({}) as srv:
        wrong_board = dev.bundle("1.1.0", compat={"boards": ["rpi4"], "machine": "aarch64"})
        cases = [
            ({"path": str(dev.bundle("1.1.0", key=other_key))}, "bundle_signature_invalid"),
            ({"path": str(garbage)}, "bundle_malformed"),
            ({"path": str(dev.tmp / "nowhere.bundle")}, "bundle_invalid"),
            ({"url": srv.url("/missing.bundle")}, "bundle_download_failed"),
            ({"path": str(wrong_board)}, "bundle_incompatible"),
        ]
        for args, reason in cases:
            final = dev.install(args)[-1]
            assert (final.status, final.reason) == ("failed", reason), (args, final.message)
            assert "\n" not in final.message
    for args in (
        {"path": "relative/b.bundle"},
        {"url": "ftp://example.com/b.bundle"},
        {"url": "http://example.com/b.bundle", "path": "/tmp/b.bundle"},
        {},
    ):
        final = dev.call("bundle.install", args, sign=True)
        assert (final.status, final.reason) == ("rejected", "args_invalid"), args
    unsigned = dev.call("bundle.install", {"path": str(garbage)})
    assert (unsigned.status, unsigned.reason) == ("rejected", "signature_required")
    assert _store(dev).current_slot() is None
    assert dev.agent.exit_status == 0
    assert not dev.agent.stop_event.is_set()


def test_a_real_agent_exits_75_after_an_install_and_boots_the_new_slot(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    key = make_keys(tmp_path / "keys")
    bundle_key, _private, public = make_key(tmp_path / "release-keys", "release")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    mqtt = _mqtt(broker, device, tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device}"\nstate_dir = "{tmp_path / "state"}"\n'
        "[reporting.jsonl]\nenabled = false\n"
        f'[reporting.mqtt]\nport = {mqtt["port"]}\nusername = "{device}"\n'
        f'password_file = "{mqtt["password_file"]}"\n'
        f'[reporting.mqtt.commands]\ntrusted_keys_dir = "{tmp_path / "keys"}"\n'
        f'[bundles]\ntrusted_keys_dir = "{trusted}"\n',
        encoding="utf-8",
    )
    # the bundle's config: this one under another device id (the restarted agent reads it)
    slot_config = config.read_text("utf-8").replace(f'"{device}"\nstate_dir', '"cam-9"\nstate_dir')
    bundle = make_bundle(
        tmp_path / "street-2.0.0.bundle",
        {"config/agent.toml": slot_config.encode()},
        version="2.0.0",
        key=bundle_key,
    )
    mon = open_monitor(broker, f"edge/{device}/#")
    proc = AgentProcess(["run", "--config", str(config)], base_env())
    try:
        ready = mon.wait_for(
            lambda m: m.topic.endswith("/status") and b'"agent_state":"ready"' in m.payload, 60
        )
        assert ready, proc.stderr[-20:] if proc.proc.poll() is not None else "agent not ready"
        c = Device(None, mon, key, device, tmp_path / "state", bundle_key, tmp_path)  # type: ignore[arg-type]
        replies = c.install({"path": str(bundle)})
        final = replies[-1]
        assert (final.status, final.reason) == ("succeeded", "ok"), final.message
        assert final.result is not None
        assert (final.result["slot"], final.result["version"]) == ("a", "2.0.0")
        assert proc.wait(30) == RESTART_EXIT_STATUS
        offline = c.retained_status(lambda s: s["state"] == "offline")
        assert offline.reason == "shutdown"  # a clean stop, not the Last Will
    finally:
        proc.kill()
        close_monitor(mon)
    assert any("exit status 75" in line for line in proc.stderr), proc.stderr[-20:]
    store = SlotStore(tmp_path / "state")
    assert store.current_slot() == "a"
    audit = [
        json.loads(x) for x in (tmp_path / "state" / "command-audit.jsonl").read_text().splitlines()
    ]
    assert [(a["command"], a["reason"]) for a in audit] == [("bundle.install", "ok")]

    # what systemd does next: start the agent again; the launcher boots slot a on trial (a
    # bundle without wheels runs this code with the slot's config) and its gate commits it
    again = AgentProcess(["run", "--config", str(config)], base_env())
    status_file = tmp_path / "state" / "status.json"
    try:
        wait_for(
            lambda: store.read_state().committed is not None or again.proc.poll() is not None,
            "version 2.0.0 committed",
            60,
        )
        state = store.read_state()
        assert state.committed is not None, (state, again.stderr[-20:])
        assert (state.committed.slot, state.committed.version) == ("a", "2.0.0")
        assert state.pending is None
        committed = {"slot": "a", "version": "2.0.0", "pending": False}
        wait_for(
            lambda: json.loads(status_file.read_text("utf-8"))["bundle"] == committed,
            "status.json showing version 2.0.0 committed",
            30,
        )
        status = json.loads(status_file.read_text("utf-8"))
        assert status["device_id"] == "cam-9"
    finally:
        again.signal(signal.SIGTERM)
        code = again.wait(30)
    assert code == 0, again.stderr[-20:]
