"""The live view of ``edge-agent run`` on a terminal: what arrives over MQTT, a line a second.

``edge-agent run`` on a terminal (``--view auto``, the default, when standard output is a TTY and
the local broker runs; or ``--view live``) shows this instead of the JSON Lines it writes to a
pipe. The view is an ordinary MQTT client of the agent's private broker: it connects
anonymously (the broker's ACL lets anonymous clients read ``edge/#`` and write nothing),
subscribes to ``edge/<device_id>/#`` and prints only what it receives, so every figure on the
screen has travelled the MQTT path::

    11:10:03 status: online (agent ready; street running, assistant running)
    11:10:04 street 24.9 fps 37 det/s [bicycle 1, person 1] | temp 51.2°C, load 1.43, agent 92%
      CPU 312 MB | 27 msg/s                                     (one line on the terminal)
    11:10:31 narrator (assistant): Camera 'street' saw mostly bicycles and a few people.

- one line per ``interval_s`` (1 s): per vision pipeline its frames/s and detections/s from
  ``vision/<pipeline>/detections`` with the latest frame's class counts; the latest
  ``telemetry`` (hottest CPU thermal zone, 1-minute load, the agent's CPU % and RSS); the MQTT
  messages per second;
- a line per LLM result (``llm/<request_id>/result``): the narrator's report or an answer to
  ``llm.generate``;
- a line whenever the retained ``status`` changes.

Threads: the caller's thread owns the paho client (``start()`` connects it and starts its
network loop, ``close()`` disconnects and stops it, also after a failed ``start()``); paho's
network thread only runs the callbacks, which parse each message (with
``agent.reporting.messages``' schemas where the agent defines them) and hand the figures over
under a lock; the printing thread only takes those figures and writes to the terminal, waking
once per ``interval_s``. A message the view cannot read is logged and skipped: it never stops
paho's thread.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig
from agent.errors import ReportingError, TopicInvalidError
from agent.reporting.local_broker import find_mosquitto
from agent.reporting.messages import StatusMessage, SystemTelemetry, TelemetryMessage
from agent.reporting.topics import Topics

if TYPE_CHECKING:
    from agent.reporting.local_broker import LocalBroker

__all__ = [
    "LiveView",
    "format_telemetry",
    "live_view_problem",
    "start_live_view",
    "wants_live_view",
    "without_stdout_jsonl",
]

_log = logging.getLogger(__name__)


@dataclass
class _Pipeline:
    """Detections of one vision pipeline received in the current window."""

    frames: int = 0
    detections: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def format_telemetry(system: SystemTelemetry) -> str:
    """``temp 51.2°C, load 1.43, agent 92% CPU 312 MB`` from a telemetry message's ``system``
    part (the hottest zone whose type names the CPU, else the hottest zone), then any
    throttling: the Raspberry Pi firmware's flags, the thermal trip points exceeded."""
    zones = system.thermal
    cpu_zones = [z for z in zones if "cpu" in z.type.lower()]
    hottest = max(cpu_zones or zones, key=lambda z: z.temp_c, default=None)
    temp = "n/a" if hottest is None else f"{hottest.temp_c:.1f}°C"
    text = (
        f"temp {temp}, load {system.load_avg_1m:.2f}, "
        f"agent {system.cpu_percent:.0f}% CPU {system.rss_bytes / 1e6:.0f} MB"
    )
    # ``throttling`` is free-form in the schema: the two keys agent.reporting.telemetry writes
    rpi_flags = system.throttling.get("rpi_flags")
    tripped = system.throttling.get("trip_points_exceeded")
    flags = [str(flag) for flag in rpi_flags] if isinstance(rpi_flags, list) else []
    if isinstance(tripped, dict):
        flags += [f"{zone} {'/'.join(map(str, kinds))}" for zone, kinds in tripped.items()]
    if flags:
        text += f", throttling: {', '.join(flags)}"
    return text


class LiveView:
    """An anonymous MQTT client of the agent's broker printing what it receives (see the module
    docstring). ``start()`` connects (``ReportingError`` if the broker does not answer or
    refuses) and starts the printing thread; ``close()`` stops both, and is also what frees
    the client after a failed ``start()``."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        out: TextIO,
        *,
        interval_s: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self._topics = Topics(prefix.strip("/"))
        self.prefix = self._topics.prefix
        self._out = out
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pipelines: dict[str, _Pipeline] = {}
        self._messages = 0
        self._telemetry: SystemTelemetry | None = None
        self._notes: list[str] = []
        self._status: str | None = None
        self._stop = threading.Event()
        self._answered = threading.Event()  # refused (CONNACK/SUBACK) or subscribed
        self._refused: str | None = None
        self._warned: set[str] = set()  # topic kinds (first level) with an unreadable message
        self._thread: threading.Thread | None = None
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-view-{os.getpid()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle (the caller's thread) -------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        where = f"{self.host}:{self.port}"
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ReportingError(f"live view: cannot connect to MQTT {where}: {exc}") from exc
        self._client.loop_start()
        if not self._answered.wait(timeout_s):
            raise ReportingError(f"live view: no answer from MQTT {where} in {timeout_s:g} s")
        if self._refused is not None:
            raise ReportingError(f"live view: MQTT {where} refused: {self._refused}")
        self._write(
            [f"{_now()} live view: subscribed to {self.prefix}/# on MQTT {where} (Ctrl-C stops)"]
        )
        self._thread = threading.Thread(target=self._loop, name="live-view", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the printing thread, disconnect and stop paho's thread, print what is left.
        Safe after a failed ``start()`` and when called twice."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(5.0)
        finally:
            try:
                self._client.disconnect()  # the network thread sends DISCONNECT, closes
            finally:
                self._client.loop_stop()
        self._flush_notes()

    # -- MQTT callbacks (paho's network thread) ----------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            client.disconnect()  # no reconnect loop: start() reports the refusal
            self._answered.set()
        else:  # start() returns once the SUBACK is in: nothing published after it is missed
            client.subscribe(f"{self.prefix}/#", qos=0)

    def _on_subscribe(
        self,
        client: paho.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        failed = [str(reason) for reason in reasons if reason.is_failure]
        if failed and not self._answered.is_set():
            self._refused = f"the subscription to {self.prefix}/#: {', '.join(failed)}"
            client.disconnect()
        elif failed:  # a resubscription after a reconnect
            _log.warning("live view: subscription to %s/# refused: %s", self.prefix, failed)
        self._answered.set()

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        if self._stop.is_set():  # the printing thread is gone: nothing would show it
            return
        relative = self._topics.relative(msg.topic)
        if relative is None:
            return
        try:
            self._take(relative, json.loads(msg.payload))
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            # warned once per kind of topic (a bug would repeat it per frame), then debug
            kind = relative.split("/")[0]
            level = logging.DEBUG if kind in self._warned else logging.WARNING
            self._warned.add(kind)
            _log.log(level, "live view: %s not shown: %s", msg.topic, str(exc).splitlines()[0])

    def _take(self, relative: str, payload: object) -> None:
        """One message into the current window (``ValueError``/``TypeError`` if unreadable)."""
        if not isinstance(payload, dict):
            raise TypeError(f"a JSON {type(payload).__name__}, not an object")
        levels = relative.split("/")
        frame: dict[str, int] | None = None
        detections = 0
        note: str | None = None
        telemetry: SystemTelemetry | None = None
        status: str | None = None
        if len(levels) == 3 and levels[0] == "vision" and levels[2] == "detections":
            found, counts = payload.get("detections", []), payload.get("counts", {})
            if not isinstance(found, list) or not isinstance(counts, dict):
                raise TypeError("'detections' is not a list or 'counts' not an object")
            frame = {str(label): int(n) for label, n in counts.items()}
            detections = len(found)
        elif len(levels) == 3 and levels[0] == "llm" and levels[2] == "result":
            note = _llm_result_line(payload)
        elif relative == "telemetry":
            telemetry = TelemetryMessage.model_validate(payload).system
        elif relative == "status":
            status = _status_text(StatusMessage.model_validate(payload))
        with self._lock:
            self._messages += 1
            if frame is not None:
                seen = self._pipelines.setdefault(levels[1], _Pipeline())
                seen.frames += 1
                seen.detections += detections
                seen.counts = frame
            if note is not None:
                self._notes.append(note)
            if telemetry is not None:
                self._telemetry = telemetry
            if status is not None and status != self._status:
                self._status = status
                self._notes.append(f"{_now()} status: {status}")

    # -- printing ----------------------------------------------------------------------------

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._interval_s):
            now = time.monotonic()
            line = self.render(now - last)
            last = now
            self._flush_notes()
            self._write([line])

    def render(self, elapsed_s: float) -> str:
        """The status line for the window of ``elapsed_s`` seconds just ended (and a new
        window begins)."""
        with self._lock:
            pipelines, self._pipelines = self._pipelines, {}
            messages, self._messages = self._messages, 0
            telemetry = self._telemetry
        per_s = 1.0 / elapsed_s if elapsed_s > 0 else 0.0
        parts = []
        for name, seen in sorted(pipelines.items()):
            counts = ", ".join(f"{label} {n}" for label, n in sorted(seen.counts.items()))
            parts.append(
                f"{name} {seen.frames * per_s:.1f} fps {seen.detections * per_s:.0f} det/s "
                f"[{counts or 'nothing'}]"
            )
        if not parts:
            parts.append("no detections received")
        parts.append("waiting for telemetry" if telemetry is None else format_telemetry(telemetry))
        parts.append(f"{messages * per_s:.0f} msg/s")
        return f"{_now()} " + " | ".join(parts)

    def _flush_notes(self) -> None:
        with self._lock:
            notes, self._notes = self._notes, []
        self._write(notes)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            self._out.write("".join(f"{line}\n" for line in lines))
            self._out.flush()
        except (OSError, ValueError) as exc:  # a closed terminal: the agent keeps running
            _log.warning("live view: cannot write to the terminal (%s); view stopped", exc)
            self._stop.set()


def _llm_result_line(payload: dict[str, Any]) -> str:
    """``narrator (assistant): text`` of an ``llm/<id>/result`` (its fields are the LLM
    pipeline's own, outside the message schema, so they are read leniently)."""
    text = " ".join(str(payload.get("text", "")).split())
    who = f"{payload.get('source') or 'llm'} ({payload.get('pipeline', '?')})"
    if payload.get("status") != "completed":
        text = f"[{payload.get('status')}] {payload.get('error') or text}"
    return f"{_now()} {who}: {text}"


def _status_text(status: StatusMessage) -> str:
    """``online (agent ready; street running, assistant running)``."""
    parts = [f"agent {status.agent_state or '?'}"]
    if status.reason:
        parts.append(status.reason)
    if status.pipelines:
        parts.append(", ".join(f"{name} {state}" for name, state in status.pipelines.items()))
    return f"{status.state} ({'; '.join(parts)})"


def wants_live_view(view: str, local_broker: bool) -> bool:
    """``--view``: live when asked, or (auto) on a terminal when the local broker will run."""
    if view == "live":
        return True
    return view == "auto" and local_broker and sys.stdout.isatty() and find_mosquitto() is not None


def live_view_problem(config: AgentConfig, no_local_broker: bool) -> str | None:
    """Why the live view cannot run (it reads the agent's local broker), or None."""
    if no_local_broker:
        return "it reads the local MQTT broker; drop --no-local-broker or use --view json"
    mqtt = config.reporting.mqtt
    if mqtt is not None:
        return (
            f"the config reports to MQTT {mqtt.host}:{mqtt.port}, so no local broker runs; "
            "watch that broker with mosquitto_sub, or use --view json"
        )
    if find_mosquitto() is None:
        return "no mosquitto binary found; install mosquitto (apt-get install mosquitto)"
    return None


def without_stdout_jsonl(config: AgentConfig) -> AgentConfig:
    """The config without a JSON Lines reporter on standard output (the live view has it)."""
    jsonl = config.reporting.jsonl
    if jsonl is None or jsonl.path != "-":
        return config
    reporting = config.reporting.model_copy(update={"jsonl": None})
    return config.model_copy(update={"reporting": reporting})


def start_live_view(broker: LocalBroker | None, device_id: str, out: TextIO) -> LiveView | None:
    """The live view on the agent's local broker; None (logged) if it cannot run."""
    if broker is None:
        _log.warning(
            "live view off: the local MQTT broker did not start (see above); results are not "
            "shown — rerun with --view json"
        )
        return None
    try:
        mqtt = broker.mqtt_config()  # what the agent itself reports to: host, port, prefix
        topics = Topics.for_device(device_id, mqtt.prefix)
    except (ReportingError, TopicInvalidError) as exc:
        _log.warning("live view off: %s; the agent keeps running", exc)
        return None
    view = LiveView(mqtt.host, mqtt.port, topics.prefix, out)
    try:
        view.start()
    except ReportingError as exc:
        view.close()
        _log.warning("live view off: %s; the agent keeps running", exc)
        return None
    return view


def _now() -> str:
    return time.strftime("%H:%M:%S")
