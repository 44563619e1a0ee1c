"""MQTT reporter: one thread owns the paho client; everything else talks to it through the
durable outbox and a work queue.

Threads::

    pipelines / dispatcher / agent            "mqtt-owner" thread (the only one touching paho)
    ------------------------------            ------------------------------------------------
    publish(), send_reply(), ...  -> Outbox  -> pending() -> client.publish()   (QoS 1)
                                  -> wake byte (socketpair)  select([sock, wake], ...)
    set_status()                  -> queue   -> retained status publish
                                             <- callbacks only record results (CONNACK, PUBACK
                                                reason codes, incoming commands); the loop acts
                                                on them after loop_read() returns
    on_command(InboundCommand)    <- incoming cmd/{command} handed to the dispatcher

The owner drives paho's network loop itself (``loop_read``/``loop_write``/``loop_misc`` around a
``select`` that also watches a wake-up socket, paho's documented external-loop API), so a
publish from another thread is sent at once instead of after a poll interval.

Connection: MQTT 5 (clean start) by default; when the broker refuses v5 (CONNACK "unsupported
protocol version", or it closes the connection before any CONNACK) and ``protocol="auto"``, the
reporter falls back to 3.1.1 and stays there. A fresh paho client is made per connection
attempt, so paho keeps no queue of its own: the outbox is the only store, and after every
(re)connect its rows are re-sent in order. Reconnect delays grow exponentially with full
jitter between ``reconnect_min_s`` and ``reconnect_max_s``.

Status: a retained ``online`` birth message on every connect, a retained ``offline`` Last
Will, and an explicit retained ``offline`` on clean shutdown.

PUBACK reason codes (MQTT 5): success deletes the row; a code that can never succeed
(``PERMANENT_FAILURES``: not authorized, topic name invalid, packet too large, ...) moves the
row to the dead-letter table; other failures are retried after ``retry_delay_s`` up to
``max_attempts`` times. Under 3.1.1 a broker cannot report a refused publish (mosquitto acks
ACL-denied messages as if delivered); only MQTT 5 detects it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.commands.inbound import InboundCommand, ReplyBody
from agent.errors import ReportingError
from agent.reporting.jsonutil import compact_json
from agent.reporting.messages import (
    AuditEvent,
    AuditRecord,
    CommandReply,
    OutboxEvent,
    OutboxTelemetry,
    Stamp,
    StatusMessage,
    SystemTelemetry,
    TelemetryMessage,
)
from agent.reporting.outbox import Outbox, OutboxMessage
from agent.reporting.telemetry import SystemSampler
from agent.reporting.topics import Priority, Topics, classify, validate_relative
from pipelines.errors import SinkError

__all__ = [
    "PERMANENT_FAILURES",
    "RESERVED_KEYS",
    "MqttReporter",
    "MqttSettings",
    "TlsSettings",
]

_log = logging.getLogger(__name__)

PERMANENT_FAILURES: dict[int, str] = {
    0x87: "not_authorized",
    0x90: "topic_name_invalid",
    0x95: "packet_too_large",
    0x99: "payload_format_invalid",
    0x9A: "retain_not_supported",
    0x9B: "qos_not_supported",
}
"""PUBACK reason codes after which a re-send cannot succeed: the row goes to dead-letter."""

RESERVED_KEYS = frozenset({"device_id", "boot_id", "seq"})
"""Keys the reporter stamps into every message; a pipeline message may not carry them."""

_UNSUPPORTED_PROTOCOL = 0x84  # CONNACK (v5) "Unsupported Protocol Version"
_V3_REFUSED_PROTOCOL = 1  # CONNACK (v3) "unacceptable protocol version"
_STATUS_MID_NONE = -1


@dataclass(frozen=True)
class TlsSettings:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class MqttSettings:
    """Resolved runtime settings (``agent.mqtt_config.MqttConfig`` documents each)."""

    host: str
    port: int
    device_id: str
    client_id: str
    prefix: str
    username: str | None = None
    password: str | None = None
    tls: TlsSettings | None = None
    keepalive_s: int = 30
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 20
    retry_delay_s: float = 5.0
    max_attempts: int = 10
    expiry_s: Mapping[str, float | None] = field(
        default_factory=lambda: {"detections": 600.0, "telemetry": 600.0, "llm_stream": 300.0}
    )
    """Expiry per droppable kind; critical messages never expire."""
    subscribe_commands: bool = True
    loss_event_interval_s: float = 5.0
    """At most one ``events`` message per kind of loss (dropped, expired, ...) this often."""


@dataclass
class _Callbacks:
    """What paho callbacks hand back to the owner loop (owner thread only)."""

    connack: tuple[int, Properties | None] | None = None
    acks: list[tuple[int, int]] = field(default_factory=list)
    inbound: list[paho.MQTTMessage] = field(default_factory=list)
    disconnected: int | None = None
    suback_failures: list[int] = field(default_factory=list)


class MqttReporter:
    """Durable MQTT reporting; a ``pipelines.base.ResultSink`` and the dispatcher's
    ``ReplySink``."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        version: str,
        boot_id: str | None = None,
        on_command: Callable[[InboundCommand], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
        sampler: SystemSampler | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.outbox = outbox
        self.version = version
        self.boot_id = boot_id or uuid.uuid4().hex
        self.started_at = clock()
        self._on_command = on_command
        self._heartbeat = heartbeat
        self._sampler = sampler or SystemSampler()
        self._clock = clock
        self._rng = random.Random()  # jitter only; not security relevant  # noqa: S311
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.settimeout(0.0)  # non-blocking
        self._wake_w.settimeout(0.0)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._acked = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._flush_on_close_s = 0.0
        # status (guarded by _status_lock; published by the owner)
        self._status_lock = threading.Lock()
        self._status: dict[str, Any] = {"state": "online", "reason": None}
        self._status_dirty = False
        self._status_refused = False  # the broker refused it (ACL): stop re-publishing it
        self._routes: dict[str, tuple[str, Priority, str]] = {}
        self._props_cache: dict[int | None, Properties] = {}
        self._idle = False  # owner is (about to be) asleep in select: publishers must wake it
        self._closed_before_connack = 0
        # owner-thread state
        self._protocol: MQTTProtocolVersion = (
            MQTTProtocolVersion.MQTTv311
            if settings.protocol == "3.1.1"
            else MQTTProtocolVersion.MQTTv5
        )
        self._client: paho.Client | None = None
        self._cb = _Callbacks()
        self._inflight: dict[int, int] = {}  # mid -> outbox row id
        self._cursor = 0
        self._retries: deque[tuple[float, int]] = deque()
        self._receive_max = settings.max_inflight
        self._max_packet: int | None = None
        self._status_mid = _STATUS_MID_NONE
        self._last_event_t = 0.0
        self._next_ack_flush = 0.0
        self._reported = {"dropped": 0, "refused": 0, "expired": 0, "dead_letter": 0}
        self._last_dead_topic: str | None = None
        self._last_dead_code: int | None = None
        # counters (read by stats())
        self.connects = 0
        self.connect_failures = 0
        self.published = 0
        self.acked = 0
        self.dead_lettered = 0
        self.retried = 0
        self.commands_received = 0
        self.last_error: str | None = None

    # --- public API (any thread) -----------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise ReportingError("MQTT reporter already started")
        self._thread = threading.Thread(target=self._run, name="mqtt-owner", daemon=True)
        self._thread.start()

    def set_command_handler(self, on_command: Callable[[InboundCommand], None] | None) -> None:
        """Where received commands go (set before ``start``; must not block)."""
        if self._thread is not None:
            raise ReportingError("set the command handler before starting the MQTT reporter")
        self._on_command = on_command

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        return "3.1.1" if self._protocol == MQTTProtocolVersion.MQTTv311 else "5"

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        """``ResultSink.publish``: stamp, store durably, hand to the owner. Never blocks on the
        network; a droppable message that does not fit is dropped and counted."""
        if self._closed:
            raise SinkError("MQTT reporter is closed; cannot publish")
        clash = RESERVED_KEYS.intersection(message)
        if clash:
            raise SinkError(
                f"message for {topic!r} carries reserved key(s) {sorted(clash)}: the MQTT "
                "reporter stamps them; rename the field"
            )
        try:
            route = self._routes.get(topic)
            if route is None:
                route = self._route(topic)

            def body(stamp: Stamp) -> bytes:
                return compact_json({**stamp.fields(), **message}).encode()

            self._enqueue(route[0], body, route[1], route[2])
        except ReportingError as exc:
            raise SinkError(f"MQTT reporter cannot take a message for {topic!r}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise SinkError(
                f"message for {topic!r} is not JSON-serialisable ({exc}); convert numpy values "
                "and NaN/inf before publishing"
            ) from exc

    def close(self) -> None:
        """``ResultSink.close``: publish offline, disconnect cleanly, stop the owner."""
        self.stop()

    def send_reply(self, inbound: InboundCommand, body: ReplyBody) -> str:
        """``ReplySink.send_reply``: to the request's Response Topic (MQTT 5, under this
        device's ``reply/``) with its Correlation Data, else to ``reply/{command_id}``."""
        use_response = inbound.response_topic is not None and self.topics.accepts_response_topic(
            inbound.response_topic
        )
        if inbound.response_topic is not None and not use_response:
            _log.warning(
                "command %s: Response Topic %r is outside %s/reply/; replying on reply/%s",
                body.command_id,
                inbound.response_topic,
                self.topics.prefix,
                body.command_id,
            )
        topic = (
            inbound.response_topic
            if use_response and inbound.response_topic is not None
            else self.topics.reply(body.command_id)
        )

        def build(stamp: Stamp) -> bytes:
            reply = CommandReply(
                **stamp.fields(),
                command_id=body.command_id,
                command=body.command,
                status=body.status,
                terminal=body.terminal,
                reason=body.reason,
                message=body.message,
                result=dict(body.result) if body.result is not None else None,
                progress=body.progress,
            )
            return reply.model_dump_json().encode()

        self._enqueue(
            topic,
            build,
            Priority.CRITICAL,
            "reply",
            correlation=inbound.correlation if use_response else None,
        )
        return topic

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish ``payload`` exactly as given (no stamp, no ``seq`` taken) on the absolute
        ``topic``, QoS 1, durably, in the never-dropped class: for formats another system owns
        (Home Assistant discovery configs). An empty retained payload deletes a retained
        message."""
        if self._closed:
            raise ReportingError("MQTT reporter is closed; cannot publish")
        validate_relative(topic)
        with self._seq_lock:  # keeps outbox ids in publish order with stamped messages
            self.outbox.put(topic, payload, priority=Priority.CRITICAL, retain=retain)
        if self._idle:
            self._idle = False
            self._wake()

    def publish_audit(self, record: AuditRecord) -> None:
        """``ReplySink.publish_audit``: the record on ``events``."""

        def build(stamp: Stamp) -> bytes:
            return (
                AuditEvent(**stamp.fields(), kind="command_audit", record=record)
                .model_dump_json()
                .encode()
            )

        self._enqueue(self.topics.events, build, Priority.CRITICAL, "events")

    def publish_telemetry(
        self,
        pipelines: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        llm: Mapping[str, Any] | None = None,
        system: SystemTelemetry | None = None,
    ) -> None:
        """The telemetry hook: the agent calls it every N seconds with per-pipeline figures;
        the reporter adds process/platform and outbox figures."""
        sys_fig = system if system is not None else self._sampler.sample()
        outbox = self.outbox_telemetry()

        def build(stamp: Stamp) -> bytes:
            msg = TelemetryMessage(
                **stamp.fields(),
                system=sys_fig,
                outbox=outbox,
                pipelines={k: dict(v) for k, v in (pipelines or {}).items()},
                llm=dict(llm) if llm is not None else None,
            )
            return msg.model_dump_json().encode()

        try:
            self._enqueue(self.topics.telemetry, build, Priority.DROPPABLE, "telemetry")
        except ReportingError as exc:
            _log.warning("telemetry not published: %s", exc)

    def set_status(
        self,
        state: Literal["online", "degraded"],
        *,
        reason: str | None = None,
        agent_state: str | None = None,
        pinning: Mapping[str, Any] | None = None,
        models: list[str] | None = None,
        pipelines: Mapping[str, str] | None = None,
    ) -> None:
        """Change the retained status; published at once when connected, else on connect."""
        with self._status_lock:
            self._status["state"] = state
            self._status["reason"] = reason
            if agent_state is not None:
                self._status["agent_state"] = agent_state
            if pinning is not None:
                self._status["pinning"] = dict(pinning)
            if models is not None:
                self._status["models"] = list(models)
            if pipelines is not None:
                self._status["pipelines"] = dict(pipelines)
            self._status_dirty = True
        self._wake()

    def outbox_telemetry(self) -> OutboxTelemetry:
        s = self.outbox.stats()
        return OutboxTelemetry(
            depth=s.depth,
            bytes=s.bytes,
            critical=s.critical,
            inflight=len(self._inflight),
            dropped=s.dropped,
            refused=s.refused,
            expired=s.expired,
            dead_letters=s.dead_letters,
            connected=self.connected,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "protocol": self.protocol,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "published": self.published,
            "acked": self.acked,
            "retried": self.retried,
            "dead_lettered": self.dead_lettered,
            "commands_received": self.commands_received,
            "last_error": self.last_error,
            "outbox": self.outbox_telemetry().model_dump(),
        }

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every message acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._acked:
            while self.outbox.depth > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._acked.wait(min(left, 0.1))
        return True

    def stop(self, timeout: float = 5.0, *, flush_s: float = 0.0) -> None:
        """Stop: optionally wait ``flush_s`` for the outbox to drain, publish the retained
        offline status, disconnect cleanly (no Last Will), join the owner thread. What is
        still in the outbox stays there for the next start."""
        if self._closed:
            return
        self._closed = True
        self._flush_on_close_s = flush_s
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout + flush_s)
            if self._thread.is_alive():
                _log.error("MQTT owner thread did not stop within %.1f s", timeout + flush_s)
        self._wake_r.close()
        self._wake_w.close()

    # --- enqueue -------------------------------------------------------------------------

    def _next_stamp(self) -> Stamp:
        stamp = Stamp(self.settings.device_id, self.boot_id, self._seq, round(self._clock(), 6))
        self._seq += 1
        return stamp

    def _route(self, relative: str) -> tuple[str, Priority, str]:
        """Absolute topic, priority class and expiry kind of a relative topic (validated once,
        then cached; pipelines publish on a handful of topics)."""
        route = (self.topics.abs(relative), *classify(relative))
        if len(self._routes) < 1024:
            self._routes[relative] = route
        return route

    def _enqueue(
        self,
        topic: str,
        body: Callable[[Stamp], bytes],
        priority: Priority,
        kind: str,
        *,
        correlation: bytes | None = None,
    ) -> int | None:
        expiry = self.settings.expiry_s.get(kind) if priority is Priority.DROPPABLE else None
        with self._seq_lock:
            stamp = self._next_stamp()
            payload = body(stamp)
            expires_at = stamp.ts + expiry if expiry else None
            if priority is Priority.DROPPABLE:
                # Group-committed by the owner before it is published (see module docstring).
                self.outbox.stage(topic, payload, expires_at=expires_at, correlation=correlation)
                row: int | None = 0
            else:
                row = self.outbox.put(
                    topic,
                    payload,
                    priority=priority,
                    expires_at=expires_at,
                    correlation=correlation,
                )
        if row is not None and self._idle:
            self._idle = False
            self._wake()
        return row

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\x00")

    # --- owner thread --------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                established = self._session()
            except Exception as exc:  # noqa: BLE001 - the owner must survive and reconnect
                _log.exception("MQTT session failed unexpectedly: %s", exc)
                self.last_error = f"internal: {exc}"
                established = False
            self._connected.clear()
            if self._stop.is_set():
                break
            failures = 0 if established else failures + 1
            delay = self._backoff(failures)
            _log.info("MQTT: reconnecting in %.2f s", delay)
            self._idle_wait(delay)
        self._connected.clear()
        self._commit_staged()

    def _idle_wait(self, delay: float) -> None:
        """Sleep ``delay`` s while disconnected, still group-committing staged messages."""
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            self._commit_staged()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._heartbeat is not None:
                self._heartbeat()
            self._idle = True
            if self.outbox.staged:
                left = 0.0
            try:
                readable, _, _ = select.select([self._wake_r], [], [], min(left, 0.5))
            finally:
                self._idle = False
            if readable:
                self._drain_wake()

    def _commit_staged(self) -> None:
        if not self.outbox.staged:
            return
        try:
            self.outbox.commit_staged()
        except ReportingError as exc:
            self.last_error = str(exc)
            _log.error("MQTT outbox: %s", exc)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _backoff(self, failures: int) -> float:
        s = self.settings
        cap = min(s.reconnect_max_s, s.reconnect_min_s * (2 ** min(failures, 16)))
        return s.reconnect_min_s + self._rng.uniform(0, max(cap - s.reconnect_min_s, 0.0))

    def _new_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=self._protocol,
            clean_session=True if self._protocol == MQTTProtocolVersion.MQTTv311 else None,
        )
        client.max_inflight_messages_set(0)  # the reporter keeps its own window
        client.max_queued_messages_set(0)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set(
                ca_certs=str(s.tls.ca_file) if s.tls.ca_file else None,
                certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
                keyfile=str(s.tls.key_file) if s.tls.key_file else None,
                keyfile_password=s.tls.key_password,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(not s.tls.check_hostname)
        client.connect_timeout = s.connect_timeout_s
        client.will_set(
            self.topics.status,
            self._status_payload("offline", "connection_lost"),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _session(self) -> bool:
        """One connection: connect, run the loop until it drops or stop; True if established."""
        s = self.settings
        self._cb = _Callbacks()
        self._inflight.clear()
        self._retries.clear()
        self._status_mid = _STATUS_MID_NONE
        client = self._new_client()
        self._client = client
        try:
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                client.connect(s.host, s.port, s.keepalive_s, clean_start=True)
            else:
                client.connect(s.host, s.port, s.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.connect_failures += 1
            self.last_error = f"connect to {s.host}:{s.port} failed: {exc}"
            _log.warning("MQTT: %s", self.last_error)
            self._close_socket(client)
            return False
        deadline = time.monotonic() + s.connect_timeout_s
        established = False
        try:
            while True:
                if self._heartbeat is not None:
                    self._heartbeat()
                if self._stop.is_set():
                    if established:
                        self._graceful_disconnect(client)
                    return established
                if not established and time.monotonic() > deadline:
                    self.connect_failures += 1
                    self.last_error = (
                        f"no CONNACK from {s.host}:{s.port} within {s.connect_timeout_s} s"
                    )
                    _log.warning("MQTT: %s", self.last_error)
                    return False
                alive = self._step(client, timeout=0.5 if established else 0.1)
                self._commit_staged()
                if self._cb.connack is not None and not established:
                    code, props = self._cb.connack
                    self._cb.connack = None
                    self._closed_before_connack = 0
                    if code != 0:
                        self.connect_failures += 1
                        self.last_error = f"broker refused the connection: {_code_name(code)}"
                        _log.warning("MQTT: %s", self.last_error)
                        self._maybe_fall_back(refused_code=code)
                        return False
                    if alive:
                        established = True
                        self._on_established(client, props)
                if not alive:
                    if established:
                        self._handle_results(client)  # acks read just before the drop
                    else:
                        self.connect_failures += 1
                        self._closed_before_connack += 1
                        self.last_error = f"{s.host}:{s.port} closed the connection before CONNACK"
                        self._maybe_fall_back()
                    return established
                if established:
                    self._handle_results(client)
                    self._pump(client)
                    self._maybe_publish_status(client)
                    self._maybe_report_losses()
        finally:
            self._connected.clear()
            self._client = None
            self._close_socket(client)

    def _step(self, client: paho.Client, timeout: float) -> bool:
        """One select + read/write/misc round; False when the connection is gone."""
        sock = client.socket()
        if sock is None:
            return False
        wlist = [sock] if client.want_write() else []
        # Dekker-style handshake with _enqueue: announce sleep, then re-check for work.
        self._idle = True
        if self._connected.is_set() and self._has_work():
            timeout = 0.0
        try:
            readable, writable, _ = select.select([sock, self._wake_r], wlist, [], timeout)
        except (OSError, ValueError):
            return False
        finally:
            self._idle = False
        if self._wake_r in readable:
            self._drain_wake()
        if sock in readable and client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        if (
            sock in writable or client.want_write()
        ) and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        return self._cb.disconnected is None

    def _has_work(self) -> bool:
        if self.outbox.staged:
            return True
        room = len(self._inflight) < self._receive_max
        due = bool(self._retries) and self._retries[0][0] <= self._clock()
        return room and (self.outbox.last_id > self._cursor or due)

    def _on_established(self, client: paho.Client, props: Properties | None) -> None:
        s = self.settings
        self.connects += 1
        self.last_error = None
        self._receive_max = s.max_inflight
        self._max_packet = None
        if props is not None:
            self._receive_max = min(s.max_inflight, int(getattr(props, "ReceiveMaximum", 65535)))
            max_packet = getattr(props, "MaximumPacketSize", None)
            self._max_packet = int(max_packet) if max_packet else None
        self._cursor = 0
        _log.info(
            "MQTT connected to %s:%d as %s (MQTT %s, window %d)",
            s.host,
            s.port,
            s.client_id,
            self.protocol,
            self._receive_max,
        )
        if s.subscribe_commands and self._on_command is not None:
            client.subscribe(self.topics.cmd_filter, qos=1)
        with self._status_lock:
            self._status_dirty = True
        self._maybe_publish_status(client)
        self._connected.set()

    def _maybe_fall_back(self, *, refused_code: int | None = None) -> None:
        """Under ``protocol="auto"``: switch to MQTT 3.1.1 for good when the broker refuses v5
        (CONNACK "unsupported protocol version"), or closes v5 connections before any CONNACK
        twice in a row (brokers that cannot even parse a v5 CONNECT)."""
        if self.settings.protocol != "auto" or self._protocol != MQTTProtocolVersion.MQTTv5:
            return
        refused = refused_code in (_UNSUPPORTED_PROTOCOL, _V3_REFUSED_PROTOCOL)
        if refused or self._closed_before_connack >= 2:
            _log.warning(
                "MQTT: broker %s:%d refused MQTT 5 (%s); falling back to MQTT 3.1.1",
                self.settings.host,
                self.settings.port,
                _code_name(refused_code) if refused_code is not None else "closed before CONNACK",
            )
            self._protocol = MQTTProtocolVersion.MQTTv311
            self._closed_before_connack = 0

    def _maybe_publish_status(self, client: paho.Client) -> None:
        with self._status_lock:
            if not self._status_dirty or self._status_refused:
                return
            self._status_dirty = False
            state, reason = self._status["state"], self._status["reason"]
        info = client.publish(
            self.topics.status, self._status_payload(state, reason), qos=1, retain=True
        )
        self._status_mid = info.mid

    def _status_payload(
        self, state: Literal["online", "degraded", "offline"], reason: str | None
    ) -> bytes:
        with self._status_lock:
            extra = {k: v for k, v in self._status.items() if k not in ("state", "reason")}
        with self._seq_lock:
            stamp = self._next_stamp()
        msg = StatusMessage(
            **stamp.fields(),
            state=state,
            version=self.version,
            reason=reason,
            started_at=self.started_at,
            **extra,
        )
        return msg.model_dump_json().encode()

    def _pump(self, client: paho.Client) -> None:
        """Commit staged messages, then send outbox rows (and due retries) while the window
        has room."""
        self._commit_staged()
        window = self._receive_max - len(self._inflight)
        now = self._clock()
        while window > 0 and self._retries and self._retries[0][0] <= now:
            _, row_id = self._retries.popleft()
            row = self.outbox.get(row_id)
            if row is not None and self._send(client, row, now):
                window -= 1
        if window <= 0:
            return
        for row in self.outbox.pending(after_id=self._cursor, limit=window):
            self._cursor = row.id
            self._send(client, row, now)

    def _send(self, client: paho.Client, row: OutboxMessage, now: float) -> bool:
        if row.expires_at is not None and row.expires_at <= now:
            return False  # outbox.expire() deletes and counts it
        props: Properties | None = None
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            expiry = None if row.expires_at is None else max(1, int(row.expires_at - now))
            props = self._publish_properties(expiry, row.correlation)
            if self._max_packet is not None:
                size = len(row.payload) + len(row.topic.encode()) + 64
                if size > self._max_packet:
                    self._dead_letter(
                        row.id, row.topic, 0x95, "over the broker's Maximum Packet Size"
                    )
                    return False
        info = client.publish(
            row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props
        )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            _log.debug(
                "MQTT publish of row %d not sent (%s); replayed after reconnect", row.id, info.rc
            )
            return False
        self._inflight[info.mid] = row.id
        self.published += 1
        return True

    def _publish_properties(self, expiry: int | None, correlation: bytes | None) -> Properties:
        """MQTT 5 PUBLISH properties: UTF-8 JSON, Message Expiry Interval, Correlation Data.
        paho re-serialises a Properties object on every publish (slow, pure Python), so those
        without correlation data are cached per expiry value with their encoding frozen."""
        if correlation is None:
            cached = self._props_cache.get(expiry)
            if cached is not None:
                return cached
        props: Properties = _FrozenProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.PayloadFormatIndicator = 1
        props.ContentType = "application/json"
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        if correlation is not None:
            props.CorrelationData = correlation
            return props
        if len(self._props_cache) >= 4096:
            self._props_cache.clear()
        self._props_cache[expiry] = props
        return props

    def _handle_results(self, client: paho.Client) -> None:
        cb = self._cb
        if cb.acks:
            acks, cb.acks = cb.acks, []
            done: list[int] = []
            for mid, code in acks:
                if mid == self._status_mid:
                    self._status_mid = _STATUS_MID_NONE
                    if code >= 0x80:
                        self._status_refused = True
                        _log.error(
                            "MQTT: retained status on %s refused by the broker (%s): no longer "
                            "published — check the broker ACL",
                            self.topics.status,
                            _code_name(code),
                        )
                    continue
                row_id = self._inflight.pop(mid, None)
                if row_id is None:
                    continue
                if code < 0x80:
                    done.append(row_id)
                elif code in PERMANENT_FAILURES:
                    row = self.outbox.get(row_id)
                    self._dead_letter(
                        row_id, row.topic if row else None, code, PERMANENT_FAILURES[code]
                    )
                else:
                    self._retry(row_id, code)
            if done:
                self.acked += self.outbox.ack(done)
                with self._acked:
                    self._acked.notify_all()
        for code in cb.suback_failures:
            _log.error(
                "MQTT: subscription to %s refused (%s): commands will not arrive — check the "
                "broker ACL",
                self.topics.cmd_filter,
                _code_name(code),
            )
        cb.suback_failures.clear()
        if cb.inbound:
            inbound, cb.inbound = cb.inbound, []
            for msg in inbound:
                self._dispatch(msg)
        del client

    def _flush_acks(self) -> None:
        """DELETE acknowledged rows the outbox batches once the oldest waited long enough
        (looked at every ``ack_delay_s / 2``, not every loop: the call takes the outbox lock)."""
        now = time.monotonic()
        if now < self._next_ack_flush:
            return
        self._next_ack_flush = now + self.outbox.ack_delay_s / 2
        try:
            self.outbox.flush_acks(older_than_s=self.outbox.ack_delay_s)
        except ReportingError as exc:
            self.last_error = str(exc)
            _log.error("MQTT outbox: %s", exc)

    def _dead_letter(self, row_id: int, topic: str | None, code: int, reason: str) -> None:
        if self.outbox.dead_letter(row_id, code, reason):
            self.dead_lettered += 1
            self._last_dead_topic, self._last_dead_code = topic, code
            _log.error(
                "MQTT: broker refused %s for good (0x%02x %s); moved to the dead-letter table",
                topic,
                code,
                reason,
            )

    def _retry(self, row_id: int, code: int) -> None:
        attempts = self.outbox.add_attempt(row_id)
        if attempts >= self.settings.max_attempts:
            row = self.outbox.get(row_id)
            self._dead_letter(
                row_id, row.topic if row else None, code, f"{_code_name(code)} x{attempts}"
            )
            return
        self.retried += 1
        self._retries.append((self._clock() + self.settings.retry_delay_s, row_id))

    def _dispatch(self, msg: paho.MQTTMessage) -> None:
        command = self.topics.command_of(msg.topic)
        if command is None or self._on_command is None:
            return
        self.commands_received += 1
        response_topic: str | None = None
        correlation: bytes | None = None
        props = getattr(msg, "properties", None)
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            corr = getattr(props, "CorrelationData", None)
            correlation = bytes(corr) if corr is not None else None
        inbound = InboundCommand(
            command=command,
            payload=bytes(msg.payload),
            topic=msg.topic,
            response_topic=response_topic,
            correlation=correlation,
            retained=bool(msg.retain),
            received_at=self._clock(),
        )
        try:
            self._on_command(inbound)
        except Exception:  # noqa: BLE001 - a bad handler must not take the connection down
            _log.exception("MQTT: command hand-over failed for %s", msg.topic)

    def _maybe_report_losses(self) -> None:
        self._flush_acks()
        now = time.monotonic()
        if now - self._last_event_t < self.settings.loss_event_interval_s:
            return
        self._last_event_t = now
        expired_topics = self.outbox.expire()
        stats = self.outbox.stats()
        current = {
            "dropped": stats.dropped,
            "refused": stats.refused,
            "expired": stats.expired,
            "dead_letter": self.dead_lettered,
        }
        for what, value in current.items():
            delta = value - self._reported[what]
            if delta <= 0:
                continue
            self._reported[what] = value
            topic = self._last_dead_topic if what == "dead_letter" else None
            if what == "expired" and expired_topics:
                topic = expired_topics[-1]
            code = self._last_dead_code if what == "dead_letter" else None

            def build(
                stamp: Stamp,
                what: str = what,
                delta: int = delta,
                topic: str | None = topic,
                code: int | None = code,
            ) -> bytes:
                return (
                    OutboxEvent(
                        **stamp.fields(),
                        kind="outbox",
                        what=what,
                        count=delta,
                        topic=topic,
                        reason_code=code,
                    )
                    .model_dump_json()
                    .encode()
                )

            try:
                self._enqueue(self.topics.events, build, Priority.CRITICAL, "events")
            except ReportingError as exc:
                _log.warning("outbox %s event not published: %s", what, exc)

    def _graceful_disconnect(self, client: paho.Client) -> None:
        deadline = time.monotonic() + self._flush_on_close_s
        while self.outbox.depth > 0 and time.monotonic() < deadline:
            if not self._step(client, 0.05):
                return
            self._handle_results(client)
            self._pump(client)
        if self._status_refused:
            client.disconnect()
            self._step(client, 0.05)
            return
        info = client.publish(
            self.topics.status, self._status_payload("offline", "shutdown"), qos=1, retain=True
        )
        self._status_mid = info.mid
        deadline = time.monotonic() + 2.0
        while self._status_mid == info.mid and time.monotonic() < deadline:
            if not self._step(client, 0.05):
                return
            self._handle_results(client)
        client.disconnect()
        self._step(client, 0.05)

    def _close_socket(self, client: paho.Client) -> None:
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # --- paho callbacks (owner thread, inside loop_read): record only ------------------------

    def _on_connect(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, props: Properties | None
    ) -> None:
        self._cb.connack = (
            int(rc.value),
            props if self._protocol == MQTTProtocolVersion.MQTTv5 else None,
        )

    def _on_disconnect(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        self._cb.disconnected = int(rc.value)
        if not self._stop.is_set():
            _log.warning("MQTT disconnected: %s", rc)

    def _on_publish(
        self, _c: paho.Client, _u: object, mid: int, rc: ReasonCode, _p: object
    ) -> None:
        self._cb.acks.append((mid, int(rc.value)))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._cb.inbound.append(msg)

    def _on_subscribe(
        self, _c: paho.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        self._cb.suback_failures.extend(int(c.value) for c in codes if c.is_failure)


class _FrozenProperties(Properties):
    """PUBLISH properties whose wire encoding is computed once (set every field first)."""

    _packed: bytes | None = None

    def pack(self) -> bytes:
        if self._packed is None:
            object.__setattr__(self, "_packed", bytes(super().pack()))  # type: ignore[no-untyped-call]
        return self._packed  # type: ignore[return-value]


def _code_name(code: int) -> str:
    names = {
        0x80: "unspecified error",
        0x84: "unsupported protocol version",
        0x85: "client identifier not valid",
        0x86: "bad user name or password",
        0x87: "not authorized",
        0x88: "server unavailable",
        0x90: "topic name invalid",
        0x95: "packet too large",
        0x97: "quota exceeded",
    }
    return f"0x{code:02x} {names.get(code, 'reason code')}"
