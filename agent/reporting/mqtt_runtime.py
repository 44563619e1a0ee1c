"""Wiring for the agent: ``[reporting.mqtt]`` config -> outbox + reporter + command dispatcher.

    runtime = open_mqtt(config.reporting.mqtt, device_id=..., state_dir=..., version=...,
                        status=agent.status, config=lambda: config)
    runtime.registry.register(CommandSpec("pipeline.start", ...))   # the agent's own commands
    runtime.start()                  # owner, dispatcher and telemetry threads
    sinks.append(runtime)            # a pipelines.base.ResultSink (publish / close)
    runtime.close()                  # retained offline, clean disconnect, close the files

As a sink, ``publish("status", agent_status)`` (what ``Agent._set_state`` sends every sink) is
not a plain message: it updates the retained ``status`` (online/degraded, agent_state, pinning,
models, pipeline states). With ``telemetry=`` a thread publishes telemetry every
``telemetry_interval_s`` with what that callable returns (per-pipeline figures).

``open_mqtt`` reads the password (and TLS key passphrase) through ``agent.credentials``; it
raises ``CredentialError`` / ``ReportingError`` subclasses with one clear line each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.commands.audit import AuditLog
from agent.commands.builtins import register_builtins
from agent.commands.dispatcher import CommandDispatcher, DispatchSettings
from agent.commands.registry import CommandRegistry
from agent.commands.replay import ReplayGuard
from agent.commands.signing import TrustedKeys
from agent.credentials import credential_path, read_secret
from agent.mqtt_config import MqttConfig
from agent.reporting.homeassistant import HomeAssistantDiscovery
from agent.reporting.mqtt import MqttReporter, MqttSettings, TlsSettings
from agent.reporting.outbox import Outbox, OutboxLimits
from agent.reporting.topics import Topics

__all__ = ["MqttRuntime", "open_mqtt", "settings_from_config"]

_log = logging.getLogger(__name__)


def settings_from_config(
    cfg: MqttConfig, device_id: str, *, environ: Mapping[str, str] | None = None
) -> MqttSettings:
    """Runtime settings: prefix rendered, secrets read."""
    password = None
    if cfg.username is not None:
        password = read_secret(cfg.password_credential, cfg.password_file, environ=environ)
    tls = None
    if cfg.tls is not None:
        key_password = None
        if cfg.tls.key_password_credential is not None:
            key_password = read_secret(cfg.tls.key_password_credential, environ=environ)
        tls = TlsSettings(
            ca_file=cfg.tls.ca_file,
            cert_file=cfg.tls.cert_file,
            key_file=(
                credential_path(cfg.tls.key_credential, cfg.tls.key_file, environ=environ)
                if cfg.tls.key_credential is not None
                else cfg.tls.key_file
            ),
            key_password=key_password,
            check_hostname=cfg.tls.check_hostname,
        )
    return MqttSettings(
        host=cfg.host,
        port=cfg.port,
        device_id=device_id,
        client_id=cfg.client_id or device_id,
        prefix=Topics.for_device(device_id, cfg.prefix).prefix,
        username=cfg.username,
        password=password,
        tls=tls,
        keepalive_s=cfg.keepalive_s,
        protocol=cfg.protocol,
        connect_timeout_s=cfg.connect_timeout_s,
        reconnect_min_s=cfg.reconnect_min_s,
        reconnect_max_s=cfg.reconnect_max_s,
        max_inflight=cfg.max_inflight,
        retry_delay_s=cfg.outbox.retry_delay_s,
        max_attempts=cfg.outbox.max_attempts,
        expiry_s={
            "detections": cfg.outbox.detections_expiry_s,
            "telemetry": cfg.outbox.telemetry_expiry_s,
            "llm_stream": cfg.outbox.llm_stream_expiry_s,
        },
        subscribe_commands=cfg.commands.enabled,
    )


@dataclass
class MqttRuntime:
    """The MQTT reporter and command dispatcher of one agent run; a ``ResultSink``."""

    reporter: MqttReporter
    outbox: Outbox
    registry: CommandRegistry
    dispatcher: CommandDispatcher | None
    guard: ReplayGuard | None
    audit: AuditLog | None
    telemetry_interval_s: float
    telemetry: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None
    discovery: HomeAssistantDiscovery | None = None
    """Home Assistant discovery (``home_assistant`` configured and enabled)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _telemetry_thread: threading.Thread | None = None

    def start(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.reporter.start()
        if self.telemetry is not None:
            self._telemetry_thread = threading.Thread(
                target=self._telemetry_loop, name="mqtt-telemetry", daemon=True
            )
            self._telemetry_thread.start()

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        """``ResultSink.publish``; ``status`` updates the retained status (see above)."""
        if topic == "status":
            self._status_from_agent(message)
            return
        self.reporter.publish(topic, message)

    def _status_from_agent(self, status: Mapping[str, Any]) -> None:
        agent_state = str(status.get("state", "unknown"))
        pipelines: dict[str, str] = {}
        models: list[str] = []
        for entry in status.get("pipelines") or []:
            if isinstance(entry, Mapping) and "name" in entry:
                pipelines[str(entry["name"])] = str(entry.get("state", "unknown"))
                if entry.get("state") not in ("failed", "stopped") and entry.get("model"):
                    models.append(str(entry["model"]))
        failed = sorted(name for name, state in pipelines.items() if state == "failed")
        degraded = agent_state == "degraded" or bool(failed)
        pinning = status.get("pinning")
        self.reporter.set_status(
            "degraded" if degraded else "online",
            reason=f"pipelines failed: {', '.join(failed)}" if failed else None,
            agent_state=agent_state,
            pinning=pinning if isinstance(pinning, Mapping) else None,
            models=sorted(set(models)),
            pipelines=pipelines,
        )

    def _telemetry_loop(self) -> None:
        source = self.telemetry
        while source is not None and not self._stop.wait(self.telemetry_interval_s):
            try:
                figures = source()
            except Exception:  # noqa: BLE001 - a failing source skips one round, never the loop
                _log.exception("telemetry source failed; skipping this round")
                continue
            self.reporter.publish_telemetry(figures)

    def publish_telemetry(
        self,
        pipelines: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        llm: Mapping[str, Any] | None = None,
    ) -> None:
        self.reporter.publish_telemetry(pipelines, llm=llm)

    def close(self, timeout: float = 5.0, *, flush_s: float = 2.0) -> None:
        """Stop receiving commands, finish the running ones, send what the outbox holds for
        up to ``flush_s`` while connected (the last replies, e.g. to agent.restart), publish
        offline, disconnect, close the outbox, replay store and audit log. What is not sent
        stays in the outbox for the next start."""
        self._stop.set()
        try:
            if self._telemetry_thread is not None:
                self._telemetry_thread.join(timeout)
            if self.dispatcher is not None:
                self.dispatcher.stop(timeout)
            self.reporter.stop(timeout, flush_s=flush_s)
        finally:
            if self.audit is not None:
                self.audit.close()
            if self.guard is not None:
                self.guard.close()
            self.outbox.close()


def open_mqtt(
    cfg: MqttConfig,
    *,
    device_id: str,
    state_dir: Path,
    version: str,
    status: Callable[[], Mapping[str, Any]],
    config: Callable[[], BaseModel | Mapping[str, Any]],
    boot_id: str | None = None,
    heartbeat: Callable[[], None] | None = None,
    telemetry: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> MqttRuntime:
    """Build (not start) the MQTT runtime from config; see the module docstring."""
    settings = settings_from_config(cfg, device_id, environ=environ)
    ob = cfg.outbox
    outbox = Outbox(
        ob.path or state_dir / "mqtt-outbox.sqlite",
        OutboxLimits(ob.max_messages, ob.max_bytes, ob.max_message_bytes),
        synchronous=ob.synchronous,
    )
    registry = CommandRegistry()
    dispatcher: CommandDispatcher | None = None
    guard: ReplayGuard | None = None
    audit: AuditLog | None = None
    try:
        if cfg.commands.enabled:
            cc = cfg.commands
            guard = ReplayGuard(cc.replay_db or state_dir / "command-replay.sqlite")
            audit = AuditLog(
                cc.audit_log or state_dir / "command-audit.jsonl", fsync=cc.audit_fsync
            )
            keys = TrustedKeys(cc.trusted_keys_dir)
            register_builtins(registry, status=status, config=config)
        reporter = MqttReporter(
            settings,
            outbox,
            version=version,
            boot_id=boot_id,
            heartbeat=heartbeat,
        )
        if cfg.commands.enabled and guard is not None and audit is not None:
            cc = cfg.commands
            dispatcher = CommandDispatcher(
                device_id=device_id,
                registry=registry,
                replies=reporter,
                guard=guard,
                keys=keys,
                audit=audit,
                settings=DispatchSettings(
                    max_payload_bytes=cc.max_payload_bytes,
                    max_clock_skew_s=cc.max_clock_skew_s,
                    max_validity_s=cc.max_validity_s,
                    replay_retention_s=cc.replay_retention_s,
                    queue_size=cc.queue_size,
                    max_long_running=cc.max_long_running,
                    signed_classes=frozenset(cc.signed_classes),
                    rate_limits={k: (v.rate_per_s, v.burst) for k, v in cc.rate_limits.items()},
                ),
            )
            audit.set_publisher(reporter.publish_audit)
            reporter.set_command_handler(dispatcher.submit)
    except BaseException:
        for closable in (audit, guard, outbox):
            if closable is not None:
                closable.close()
        raise
    discovery = None
    if cfg.home_assistant is not None and cfg.home_assistant.enabled:
        discovery = HomeAssistantDiscovery(
            reporter, cfg.home_assistant, device_id=device_id, version=version
        )
    return MqttRuntime(
        reporter=reporter,
        outbox=outbox,
        registry=registry,
        dispatcher=dispatcher,
        guard=guard,
        audit=audit,
        telemetry_interval_s=cfg.telemetry_interval_s,
        telemetry=telemetry,
        discovery=discovery,
    )
