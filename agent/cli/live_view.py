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
from agent.errors import ReportingError
from agent.reporting.local_broker import find_mosquitto

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


def format_telemetry(system: dict[str, Any]) -> str:
    """``temp 51.2°C, load 1.43, agent 92% CPU 312 MB`` from a telemetry message's ``system``
    part (the hottest zone whose type names the CPU, else the hottest zone), then any
    throttling: the Raspberry Pi firmware's flags, the thermal trip points exceeded."""
    zones = [z for z in system.get("thermal", []) if isinstance(z, dict) and "temp_c" in z]
    cpu_zones = [z for z in zones if "cpu" in str(z.get("type", "")).lower()]
    hottest = max(cpu_zones or zones, key=lambda z: float(z["temp_c"]), default=None)
    temp = "n/a" if hottest is None else f"{float(hottest['temp_c']):.1f}°C"
    rss_mb = int(system.get("rss_bytes", 0)) / 1e6
    text = (
        f"temp {temp}, load {float(system.get('load_avg_1m', 0.0)):.2f}, "
        f"agent {float(system.get('cpu_percent', 0.0)):.0f}% CPU {rss_mb:.0f} MB"
    )
    throttling = system.get("throttling", {})
    flags = [str(flag) for flag in throttling.get("rpi_flags", [])]
    flags += [
        f"{zone} {'/'.join(kinds)}"
        for zone, kinds in throttling.get("trip_points_exceeded", {}).items()
    ]
    if flags:
        text += f", throttling: {', '.join(flags)}"
    return text


class LiveView:
    """An anonymous MQTT client of the agent's broker printing what it receives (see the module
    docstring). ``start()`` connects (``ReportingError`` if the broker does not answer) and
    starts the printing thread; ``close()`` stops both."""

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
        self.prefix = prefix.strip("/")
        self._out = out
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pipelines: dict[str, _Pipeline] = {}
        self._messages = 0
        self._telemetry: dict[str, Any] | None = None
        self._notes: list[str] = []
        self._status: str | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-view-{os.getpid()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        where = f"{self.host}:{self.port}"
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ReportingError(f"live view: cannot connect to MQTT {where}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self._client.loop_stop()
            raise ReportingError(f"live view: no CONNACK from MQTT {where} in {timeout_s:.0f} s")
        self._write(
            [f"{_now()} live view: subscribed to {self.prefix}/# on MQTT {where} (Ctrl-C stops)"]
        )
        self._thread = threading.Thread(target=self._loop, name="live-view", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._client.disconnect()
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
            _log.warning("live view: MQTT %s:%d refused: %s", self.host, self.port, reason)
            return
        client.subscribe(f"{self.prefix}/#", qos=0)
        self._connected.set()

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        relative = msg.topic[len(self.prefix) + 1 :]
        try:
            payload = json.loads(msg.payload)
        except ValueError as exc:
            _log.debug("live view: %s is not JSON (%s); not shown", msg.topic, exc)
            return
        if not isinstance(payload, dict):
            _log.debug("live view: %s is not a JSON object; not shown", msg.topic)
            return
        levels = relative.split("/")
        with self._lock:
            self._messages += 1
            if len(levels) == 3 and levels[0] == "vision" and levels[2] == "detections":
                seen = self._pipelines.setdefault(levels[1], _Pipeline())
                seen.frames += 1
                seen.detections += len(payload.get("detections", []))
                seen.counts = dict(payload.get("counts", {}))
            elif len(levels) == 3 and levels[0] == "llm" and levels[2] == "result":
                self._note_llm_result(payload)
            elif relative == "telemetry":
                self._telemetry = dict(payload.get("system", {}))
            elif relative == "status":
                self._note_status(payload)

    def _note_llm_result(self, payload: dict[str, Any]) -> None:
        text = " ".join(str(payload.get("text", "")).split())
        source = payload.get("source") or "llm"
        who = f"{source} ({payload.get('pipeline', '?')})"
        if payload.get("status") != "completed":
            text = f"[{payload.get('status')}] {payload.get('error') or text}"
        self._notes.append(f"{_now()} {who}: {text}")

    def _note_status(self, payload: dict[str, Any]) -> None:
        pipelines = payload.get("pipelines") or {}
        parts = [f"agent {payload.get('agent_state') or '?'}"]
        if payload.get("reason"):
            parts.append(str(payload["reason"]))
        if pipelines:
            parts.append(", ".join(f"{name} {state}" for name, state in pipelines.items()))
        status = f"{payload.get('state', '?')} ({'; '.join(parts)})"
        if status != self._status:
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
    view = LiveView("127.0.0.1", broker.port, f"{broker.topic_root}/{device_id}", out)
    try:
        view.start()
    except ReportingError as exc:
        _log.warning("live view off: %s; the agent keeps running", exc)
        return None
    return view


def _now() -> str:
    return time.strftime("%H:%M:%S")
