"""``[reporting.mqtt]``: the MQTT reporter, its durable outbox, and remote commands.

Example (agent.toml)::

    [reporting.mqtt]
    host = "broker.example.net"
    port = 8883
    username = "cam-17"                 # the deploy ACL expects user name = device_id
    password_credential = "mqtt-password"
    [reporting.mqtt.tls]
    ca_file = "/etc/edge-agent/mqtt-ca.crt"
    cert_file = "/etc/edge-agent/mqtt-client.crt"
    key_file = "/etc/edge-agent/mqtt-client.key"
    [reporting.mqtt.commands]
    trusted_keys_dir = "/etc/edge-agent/trusted-keys"

The password is never inline: it is read with ``agent.credentials.read_secret`` from the
systemd credential ``password_credential`` (``LoadCredential=``), else from ``password_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from engines.configbase import StrictModel

__all__ = [
    "CommandsConfig",
    "HomeAssistantConfig",
    "MqttConfig",
    "MqttTlsConfig",
    "OutboxConfig",
    "RateLimitConfig",
]

CommandClassName = Literal["read", "control", "critical"]


class MqttTlsConfig(StrictModel):
    ca_file: Path | None = Field(
        default=None, description="CA certificates (PEM) to verify the broker; unset: system CAs."
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM) when the broker requires one."
    )
    key_file: Path | None = Field(default=None, description="Private key (PEM) of cert_file.")
    key_credential: str | None = Field(
        default=None,
        description="Credential holding the private key of cert_file (e.g. `mqtt-client-key`, "
        "loaded by the unit's LoadCredential=); taken before key_file when present.",
    )
    key_password_credential: str | None = Field(
        default=None,
        description="Credential name holding key_file's passphrase (unset: key not encrypted).",
    )
    check_hostname: bool = Field(
        default=True,
        description="Verify that the broker certificate names `host`; disable only for brokers "
        "addressed by an IP the certificate does not list.",
    )

    @model_validator(mode="after")
    def _key_with_cert(self) -> MqttTlsConfig:
        has_key = self.key_file is not None or self.key_credential is not None
        if (self.cert_file is None) == has_key:
            raise ValueError(
                "tls.cert_file and its key (tls.key_file or tls.key_credential) go together"
            )
        return self


class OutboxConfig(StrictModel):
    path: Path | None = Field(
        default=None,
        description="SQLite file of the durable outbox; unset: <state_dir>/mqtt-outbox.sqlite.",
    )
    max_messages: int = Field(
        default=100_000, ge=10, description="Most messages the outbox holds (all classes)."
    )
    max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=65536, description="Most payload bytes the outbox holds."
    )
    max_message_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="Largest single message; a bigger one is refused with message_too_large.",
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description='SQLite durability: "normal" survives a crash of the agent; "full" also '
        "the last messages over a power cut (an fsync per critical message).",
    )
    detections_expiry_s: float | None = Field(
        default=600.0,
        gt=0,
        description="Detections older than this are not sent any more (also the MQTT 5 "
        "Message Expiry Interval); null: never expire.",
    )
    telemetry_expiry_s: float | None = Field(
        default=600.0, gt=0, description="Expiry of telemetry messages; null: never expire."
    )
    llm_stream_expiry_s: float | None = Field(
        default=300.0, gt=0, description="Expiry of LLM stream chunks; null: never expire."
    )
    max_attempts: int = Field(
        default=10,
        ge=1,
        description="A message the broker keeps refusing with a retryable PUBACK reason code "
        "goes to the dead-letter table after this many attempts.",
    )
    retry_delay_s: float = Field(
        default=5.0, gt=0, description="Wait before re-sending a message after such a refusal."
    )


class RateLimitConfig(StrictModel):
    rate_per_s: float = Field(ge=0, description="Commands per second refilled into the bucket.")
    burst: int = Field(ge=1, description="Bucket size: commands accepted back to back.")


def _default_rate_limits() -> dict[CommandClassName, RateLimitConfig]:
    return {
        "read": RateLimitConfig(rate_per_s=5.0, burst=20),
        "control": RateLimitConfig(rate_per_s=1.0, burst=5),
        "critical": RateLimitConfig(rate_per_s=0.2, burst=3),
    }


def _default_signed_classes() -> list[CommandClassName]:
    return ["critical"]


class CommandsConfig(StrictModel):
    enabled: bool = Field(
        default=True, description="Subscribe to cmd/+ and execute commands; false: report only."
    )
    trusted_keys_dir: Path = Field(
        default=Path("/etc/edge-agent/trusted-keys"),
        description="Ed25519 public keys (*.pub base64 raw key, or *.pem) allowed to sign "
        "commands; the key id is the file name without suffix.",
    )
    signed_classes: list[CommandClassName] = Field(
        default_factory=_default_signed_classes,
        description="Command classes that must carry a valid signature (critical: model load, "
        "restart, config change, bundle install).",
    )
    audit_log: Path | None = Field(
        default=None,
        description="Append-only JSON Lines audit log of every command and decision; unset: "
        "<state_dir>/command-audit.jsonl.",
    )
    audit_fsync: bool = Field(default=False, description="fsync the audit log after every record.")
    replay_db: Path | None = Field(
        default=None,
        description="SQLite file remembering decided command ids; unset: "
        "<state_dir>/command-replay.sqlite.",
    )
    max_payload_bytes: int = Field(
        default=65536, ge=256, description="Larger command payloads are rejected unread."
    )
    max_clock_skew_s: float = Field(
        default=30.0, ge=0, description="How far issued_at may lie in the future."
    )
    max_validity_s: float = Field(
        default=3600.0, gt=0, description="Longest allowed expires_at - issued_at."
    )
    replay_retention_s: float = Field(
        default=86400.0,
        ge=0,
        description="How long a decided command_id is remembered beyond its expires_at.",
    )
    queue_size: int = Field(
        default=64, ge=1, description="Commands waiting for the dispatcher; beyond: busy."
    )
    max_long_running: int = Field(
        default=1, ge=1, description="Long-running commands at once; beyond: busy."
    )
    rate_limits: dict[CommandClassName, RateLimitConfig] = Field(
        default_factory=_default_rate_limits,
        description="Token bucket per command class; an empty bucket answers busy.",
    )


class HomeAssistantConfig(StrictModel):
    enabled: bool = Field(default=True, description="Publish the discovery configs.")
    discovery_prefix: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Home Assistant's MQTT discovery prefix (its `discovery_prefix`); the "
        "broker ACL must let the device write <prefix>/sensor/<device_id>/#.",
    )
    classes: list[str] | None = Field(
        default=None,
        description="Labels that get a per-pipeline count sensor; unset: the pipeline's "
        "`classes` allow-list, else every label of its model.",
    )


class MqttConfig(StrictModel):
    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host name or IP.")
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (1883 plain, 8883 TLS)."
    )
    client_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="MQTT client id; unset: the device_id.",
    )
    prefix: str = Field(
        default="edge/{device_id}",
        description="Topic prefix of every topic of this device; may name {device_id}.",
    )
    username: str | None = Field(
        default=None, description="User name (the deploy ACL expects the device_id); unset: none."
    )
    password_credential: str = Field(
        default="mqtt-password",
        description="Name of the secret holding the password: $CREDENTIALS_DIRECTORY/<name> "
        "(systemd LoadCredential=) first, then password_file.",
    )
    password_file: Path | None = Field(
        default=None, description="File holding the password when no credential is loaded."
    )
    tls: MqttTlsConfig | None = Field(default=None, description="TLS settings; unset: plain TCP.")
    keepalive_s: int = Field(
        default=30, ge=5, le=3600, description="MQTT keepalive (PINGREQ interval), seconds."
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description='"auto": MQTT 5, falling back to 3.1.1 when the broker refuses v5 (ACL-'
        'denied publishes are only detectable under 5); "5" or "3.1.1": that version only.',
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="TCP/TLS connect plus CONNACK wait, seconds."
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0, description="First reconnect delay; doubles per failure (jittered)."
    )
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Largest reconnect delay.")
    max_inflight: int = Field(
        default=20,
        ge=1,
        le=65535,
        description="QoS 1 messages sent and not yet acknowledged (capped by the broker's "
        "Receive Maximum).",
    )
    telemetry_interval_s: float = Field(
        default=10.0, gt=0, description="How often the agent publishes telemetry."
    )
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, description="Durable store-and-forward outbox."
    )
    commands: CommandsConfig = Field(
        default_factory=CommandsConfig, description="Remote commands over cmd/{command}."
    )
    home_assistant: HomeAssistantConfig | None = Field(
        default=None,
        description="Home Assistant MQTT discovery: retained sensor configs for the agent "
        "status and per-pipeline detection counts (total and per class); unset: none.",
    )

    @model_validator(mode="after")
    def _delays(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if "/" in self.prefix.strip("/") and any(
            not level for level in self.prefix.strip("/").split("/")
        ):
            raise ValueError(f"prefix {self.prefix!r} has an empty topic level")
        if any(c in self.prefix for c in "+#"):
            raise ValueError(f"prefix {self.prefix!r} may not contain MQTT wildcards + or #")
        return self
