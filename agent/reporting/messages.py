"""Every MQTT message the agent sends or accepts, as pydantic models.

These models are the single source of the message formats: the reporter and the command
dispatcher build and parse messages through them, and ``tools/gen_asyncapi.py`` generates the
payload JSON Schemas of ``docs/asyncapi.yaml`` from them (a test fails when the two drift).

Every outbound message carries the stamp ``device_id``, ``boot_id`` (a random id per agent
start) and ``seq`` (per boot, strictly increasing in publish order), so consumers detect gaps
and drop duplicates: a message re-sent after a reconnect or a restart keeps its (boot_id, seq).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "COMMAND_ID_PATTERN",
    "TERMINAL_STATUSES",
    "AuditEvent",
    "AuditRecord",
    "CommandEnvelope",
    "CommandReply",
    "DetectionsMessage",
    "EventMessage",
    "HaAvailability",
    "HaDevice",
    "HaSensorConfig",
    "LlmResultMessage",
    "LlmStreamMessage",
    "OutboxEvent",
    "OutboxTelemetry",
    "ReplyStatus",
    "Stamp",
    "Stamped",
    "StatusMessage",
    "SystemTelemetry",
    "TelemetryMessage",
    "ThermalZone",
    "VisionEventMessage",
]

COMMAND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

ReplyStatus = Literal["accepted", "progress", "succeeded", "failed", "rejected", "expired", "busy"]
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"succeeded", "failed", "rejected", "expired", "busy"}
)


@dataclass(frozen=True)
class Stamp:
    """What the reporter adds to every outbound message."""

    device_id: str
    boot_id: str
    seq: int
    ts: float

    def fields(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "seq": self.seq,
            "ts": self.ts,
        }


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stamped(_Message):
    """Fields every outbound message carries."""

    device_id: str = Field(description="The device that sent the message.")
    boot_id: str = Field(
        min_length=1, description="Random id of the agent run that created the message."
    )
    seq: int = Field(
        ge=0,
        description="Per-boot sequence number, strictly increasing in publish order across all "
        "topics; a duplicate delivery repeats the same (boot_id, seq).",
    )
    ts: float = Field(description="Unix time (seconds) the message was created.")


class _OpenStamped(Stamped):
    model_config = ConfigDict(extra="allow")


# --- status ----------------------------------------------------------------------------------


class StatusMessage(Stamped):
    """Retained on ``status``: the birth message on every connect, the Last Will (offline) when
    the connection drops without a clean disconnect, and an explicit offline on shutdown."""

    state: Literal["online", "degraded", "offline"] = Field(
        description="online: all well; degraded: running with a problem (see reason); offline: "
        "not connected (Last Will or clean shutdown)."
    )
    version: str = Field(description="Agent version.")
    agent_state: str | None = Field(
        default=None,
        description="The agent's own lifecycle state (starting, ready, degraded, stopping, "
        "stopped) when the agent reported one.",
    )
    reason: str | None = Field(
        default=None, description="Why the state is degraded/offline (stable code or text)."
    )
    started_at: float = Field(description="Unix time the agent run (boot_id) started.")
    pinning: dict[str, Any] | None = Field(
        default=None, description="Applied CPU/NUMA pinning, as the agent reports it."
    )
    models: list[str] = Field(default_factory=list, description="Loaded model names.")
    pipelines: dict[str, str] = Field(
        default_factory=dict, description="Pipeline name -> state (running, stopped, failed)."
    )


# --- telemetry -------------------------------------------------------------------------------


class ThermalZone(_Message):
    name: str = Field(description="Zone directory name, e.g. thermal_zone0.")
    type: str = Field(description="Zone type from sysfs, e.g. cpu-thermal, CPU-therm.")
    temp_c: float = Field(description="Temperature in degrees Celsius.")


class SystemTelemetry(_Message):
    rss_bytes: int = Field(ge=0, description="Resident set size of the agent process.")
    cpu_percent: float = Field(
        ge=0,
        description="Agent process CPU use since the previous sample, in percent of one CPU "
        "(may exceed 100 with several busy threads).",
    )
    load_avg_1m: float = Field(ge=0, description="System 1-minute load average.")
    thermal: list[ThermalZone] = Field(
        default_factory=list, description="Every readable /sys/class/thermal zone."
    )
    throttling: dict[str, Any] = Field(
        default_factory=dict,
        description="Platform throttling flags: Raspberry Pi get_throttled bits, Jetson "
        "per-zone trip state; empty where the platform exposes none.",
    )


class OutboxTelemetry(_Message):
    depth: int = Field(ge=0, description="Messages waiting for a PUBACK.")
    bytes: int = Field(ge=0, description="Payload bytes waiting.")
    critical: int = Field(ge=0, description="Waiting messages of the never-dropped class.")
    inflight: int = Field(ge=0, description="Messages sent and not yet acknowledged.")
    dropped: int = Field(ge=0, description="Droppable messages evicted since start.")
    refused: int = Field(ge=0, description="Critical messages refused (outbox full) since start.")
    expired: int = Field(ge=0, description="Messages expired before delivery since start.")
    dead_letters: int = Field(ge=0, description="Messages in the dead-letter table.")
    connected: bool = Field(description="Whether the MQTT connection is up.")


class TelemetryMessage(Stamped):
    """Periodic figures on ``telemetry``."""

    system: SystemTelemetry = Field(description="Process and platform figures.")
    outbox: OutboxTelemetry = Field(description="Durable outbox figures.")
    pipelines: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per pipeline: fps, stage latency percentiles, drops (from the pipeline).",
    )
    llm: dict[str, Any] | None = Field(default=None, description="LLM figures such as tok/s.")


# --- results handed over by pipelines (their fields are defined by the pipelines) ----------


class DetectionsMessage(_OpenStamped):
    """A vision pipeline's per-frame result on ``vision/{pipeline}/detections``; the fields
    besides the stamp are the pipeline's own (issue #4)."""


class VisionEventMessage(_OpenStamped):
    """A vision pipeline's event on ``vision/{pipeline}/events``."""


class LlmStreamMessage(_OpenStamped):
    """A chunk of an LLM answer on ``llm/{request_id}/stream``."""


class LlmResultMessage(_OpenStamped):
    """The final LLM answer on ``llm/{request_id}/result``."""


# --- commands --------------------------------------------------------------------------------


class CommandEnvelope(_Message):
    """Payload of ``cmd/{command}``. The command name is the last topic level.

    ``signature``: base64 Ed25519 signature over the canonical JSON (sorted keys, separators
    ``,`` ``:``, UTF-8) of the envelope without ``signature``, plus ``"command"`` (the topic's
    command name) and ``"device_id"`` (the target), so a signed command cannot be redirected to
    another command or device. Required for critical commands.
    """

    command_id: str = Field(
        pattern=COMMAND_ID_PATTERN,
        description="Unique id chosen by the sender; replies go to reply/{command_id}. "
        "A command_id is executed at most once.",
    )
    issued_at: float = Field(description="Unix time the command was issued.")
    expires_at: float = Field(description="Unix time after which the command must not run.")
    args: dict[str, Any] = Field(default_factory=dict, description="Command arguments.")
    key_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of the trusted key that signed (file stem in the trusted-keys "
        "directory); without it every trusted key is tried.",
    )
    signature: str | None = Field(
        default=None, max_length=256, description="Base64 Ed25519 signature (see above)."
    )


class CommandReply(Stamped):
    """Payload of a reply: to the request's MQTT 5 Response Topic (with its Correlation Data)
    when it lies under this device's ``reply/``, else to ``reply/{command_id}``."""

    command_id: str | None = Field(
        description="The command's id; null when the request could not be parsed."
    )
    command: str | None = Field(description="The command name from the request topic.")
    status: ReplyStatus = Field(
        description="accepted/progress are interim; succeeded, failed, rejected, expired, busy "
        "are terminal: each command gets exactly one terminal reply."
    )
    terminal: bool = Field(description="True for the one final reply of a command.")
    reason: str = Field(
        description="Stable machine-readable reason code, e.g. ok, bad_json, unknown_command, "
        "signature_required, rate_limited."
    )
    message: str = Field(description="One human-readable line.")
    result: dict[str, Any] | None = Field(
        default=None, description="The command's result on success."
    )
    progress: float | None = Field(
        default=None, ge=0, le=1, description="Fraction done, on progress replies."
    )


# --- events ----------------------------------------------------------------------------------


class AuditRecord(_Message):
    """One line of the append-only audit log: a command and the decision taken."""

    ts: float = Field(description="Unix time of the decision.")
    command_id: str | None = Field(description="The command's id, when readable.")
    command: str | None = Field(description="The command name, from the topic.")
    decision: ReplyStatus = Field(description="The status replied (or that would have been).")
    reason: str = Field(description="Stable reason code of the decision.")
    message: str = Field(description="Human-readable line.")
    replied: bool = Field(
        description="False when no reply was sent (a replayed command_id already had its "
        "terminal reply)."
    )
    signed: bool = Field(description="Whether a valid signature was verified.")
    key_id: str | None = Field(default=None, description="The trusted key that verified.")
    payload_bytes: int = Field(ge=0, description="Size of the request payload.")
    payload_sha256: str = Field(description="SHA-256 (hex) of the request payload.")
    response_topic: str | None = Field(default=None, description="Where the reply went.")


class AuditEvent(Stamped):
    kind: Literal["command_audit"] = Field(description="A command audit record.")
    record: AuditRecord = Field(description="The audit record (also in the audit log file).")


class OutboxEvent(Stamped):
    kind: Literal["outbox"] = Field(description="An outbox loss or refusal.")
    what: Literal["dropped", "refused", "expired", "dead_letter"] = Field(
        description="dropped: droppable messages evicted when full; refused: a critical message "
        "did not fit; expired: messages past their expiry; dead_letter: the broker refused a "
        "message for good (reason_code)."
    )
    count: int = Field(ge=1, description="How many messages since the previous such event.")
    topic: str | None = Field(default=None, description="Topic of the (last) message concerned.")
    reason_code: int | None = Field(default=None, description="MQTT reason code (dead_letter).")


EventMessage = AuditEvent | OutboxEvent
"""Payload of ``events`` (discriminated by ``kind``)."""


# --- Home Assistant discovery (not stamped: Home Assistant owns this format) -----------------


class HaAvailability(_Message):
    topic: str = Field(description="Topic whose messages tell whether the device is online.")
    value_template: str = Field(
        description="Jinja template turning such a message into `online` / `offline`."
    )


class HaDevice(_Message):
    identifiers: list[str] = Field(description="Stable ids of the device in Home Assistant.")
    name: str = Field(description="Device name shown in Home Assistant (the device_id).")
    manufacturer: str = Field(description="Always `edge-agent`.")
    model: str = Field(description="Always `edge-agent`.")
    sw_version: str = Field(description="Agent version.")


class HaSensorConfig(_Message):
    """Retained on ``homeassistant/sensor/{device_id}/{object_id}/config`` (the prefix is
    ``home_assistant.discovery_prefix``) when Home Assistant discovery is on: one sensor for the
    agent status and, per pipeline, one for the detections per frame and one per class. Not
    stamped (no device_id/boot_id/seq): Home Assistant defines the format. An empty retained
    payload on the same topic removes the sensor."""

    name: str = Field(description="Entity name (shown under the device).")
    unique_id: str = Field(description="Stable entity id: <device_id>_<object_id>.")
    state_topic: str = Field(description="The agent topic the value is read from.")
    value_template: str = Field(description="Jinja template extracting the value.")
    json_attributes_topic: str | None = Field(
        default=None, description="Topic whose JSON becomes the entity's attributes."
    )
    unit_of_measurement: str | None = Field(default=None, description="Unit of the value.")
    state_class: Literal["measurement"] | None = Field(
        default=None, description="`measurement` for counts (long-term statistics)."
    )
    icon: str | None = Field(default=None, description="Material Design icon.")
    availability: list[HaAvailability] = Field(
        default_factory=list, description="When the entity is available (the agent online)."
    )
    device: HaDevice = Field(description="The device the entity belongs to.")
