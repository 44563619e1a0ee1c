"""Generate docs/asyncapi.yaml (AsyncAPI 3.0) from the pydantic message models.

    .venv/bin/python tools/gen_asyncapi.py           # (re)write docs/asyncapi.yaml
    .venv/bin/python tools/gen_asyncapi.py --check   # exit 1 when the file is out of date

Every payload schema comes from ``agent.reporting.messages`` (the models the reporter and the
dispatcher use), so the document cannot describe a format the code does not send; the test
suite regenerates it and fails on any difference, then validates real messages captured from a
broker against it. The YAML is written by a small emitter below (strings JSON-quoted, which is
valid YAML), so no YAML library is needed to produce or compare it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel, Field, TypeAdapter  # noqa: E402
from pydantic.json_schema import models_json_schema  # noqa: E402

from agent.commands.builtins import register_builtins  # noqa: E402
from agent.commands.registry import CommandRegistry  # noqa: E402
from agent.control import register_agent_commands  # noqa: E402
from agent.reporting import messages as m  # noqa: E402
from agent.reporting.mqtt import PERMANENT_FAILURES  # noqa: E402

OUT = ROOT / "docs" / "asyncapi.yaml"
REF = "#/components/schemas/{model}"

MODELS: list[type[BaseModel]] = [
    m.StatusMessage,
    m.TelemetryMessage,
    m.DetectionsMessage,
    m.VisionEventMessage,
    m.LlmStreamMessage,
    m.LlmResultMessage,
    m.AuditEvent,
    m.OutboxEvent,
    m.CommandEnvelope,
    m.CommandReply,
    m.HaSensorConfig,
]


class Channel(NamedTuple):
    id: str
    address: str
    params: dict[str, str]
    message: str
    schema: str
    summary: str


PIPELINE = {"pipeline": "Pipeline name."}
REQUEST = {"request_id": "LLM request id."}
CHANNELS = [
    Channel(
        "status",
        "edge/{device_id}/status",
        {},
        "status",
        "StatusMessage",
        "Retained device status: birth message on connect, Last Will (offline, "
        "connection_lost), offline on clean shutdown.",
    ),
    Channel(
        "telemetry",
        "edge/{device_id}/telemetry",
        {},
        "telemetry",
        "TelemetryMessage",
        "Periodic system, outbox and pipeline figures. Droppable when the outbox is full.",
    ),
    Channel(
        "events",
        "edge/{device_id}/events",
        {},
        "event",
        "EventMessage",
        "Device events: every command decision (audit) and outbox losses. Never dropped silently.",
    ),
    Channel(
        "detections",
        "edge/{device_id}/vision/{pipeline}/detections",
        PIPELINE,
        "detections",
        "DetectionsMessage",
        "Per-frame detections of a vision pipeline. Droppable (oldest first, counted) when "
        "the outbox is full; Message Expiry Interval set.",
    ),
    Channel(
        "visionEvents",
        "edge/{device_id}/vision/{pipeline}/events",
        PIPELINE,
        "visionEvent",
        "VisionEventMessage",
        "Vision pipeline events. Never dropped silently.",
    ),
    Channel(
        "llmStream",
        "edge/{device_id}/llm/{request_id}/stream",
        REQUEST,
        "llmStream",
        "LlmStreamMessage",
        "LLM answer chunks. Droppable.",
    ),
    Channel(
        "llmResult",
        "edge/{device_id}/llm/{request_id}/result",
        REQUEST,
        "llmResult",
        "LlmResultMessage",
        "Final LLM answers. Never dropped silently.",
    ),
    Channel(
        "command",
        "edge/{device_id}/cmd/{command}",
        {"command": "Command name, e.g. status.get, config.get, pipeline.start, model.load."},
        "command",
        "CommandEnvelope",
        "Commands to the device (the only topics it subscribes). Critical commands must be "
        "signed (Ed25519); a command_id is executed at most once.",
    ),
    Channel(
        "reply",
        "edge/{device_id}/reply/{command_id}",
        {"command_id": "The command's id; _invalid when the request could not be parsed."},
        "reply",
        "CommandReply",
        "Replies when the request carried no MQTT 5 Response Topic under "
        "edge/{device_id}/reply/; otherwise replies go to that Response Topic with the "
        "request's Correlation Data.",
    ),
    Channel(
        "haDiscovery",
        "homeassistant/sensor/{device_id}/{object_id}/config",
        {
            "object_id": "status, <pipeline>_detections or <pipeline>_<label>_count "
            "(lower-case letters, digits, _)."
        },
        "haSensorConfig",
        "HaSensorConfig",
        "Home Assistant MQTT discovery (only with reporting.mqtt.home_assistant; the first "
        "level is its discovery_prefix): retained sensor configs in Home Assistant's own "
        "format, so NOT stamped with device_id/boot_id/seq; an empty retained payload deletes "
        "a sensor.",
    ),
]

SENT = [
    "status",
    "telemetry",
    "events",
    "detections",
    "visionEvents",
    "llmStream",
    "llmResult",
    "haDiscovery",
]
RETAINED = ("status", "haDiscovery")


def command_registry() -> CommandRegistry:
    """Every command the agent registers (handlers never called here)."""
    registry = CommandRegistry()
    register_builtins(registry, status=dict, config=dict)
    register_agent_commands(registry, None)  # type: ignore[arg-type]
    return registry


def build_document() -> dict[str, Any]:
    registry = command_registry()
    specs = [registry.get(name) for name in registry.names()]
    arg_models = sorted(
        {spec.args_model for spec in specs if spec is not None and spec.args_model is not None},
        key=lambda model: model.__name__,
    )
    _, top = models_json_schema(
        [(model, "validation") for model in [*MODELS, *arg_models]], ref_template=REF
    )
    schemas: dict[str, Any] = dict(top["$defs"])
    event_union = TypeAdapter(
        Annotated[m.AuditEvent | m.OutboxEvent, Field(discriminator="kind")]
    ).json_schema(ref_template=REF)
    schemas.update(event_union.pop("$defs", {}))
    schemas["EventMessage"] = event_union
    schemas = {k: schemas[k] for k in sorted(schemas)}

    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for cid, address, params, msg_id, schema, summary in CHANNELS:
        parameters = {"device_id": {"description": "The device id (prefix edge/{device_id})."}}
        parameters.update({k: {"description": v} for k, v in params.items()})
        channels[cid] = {
            "address": address,
            "description": summary,
            "parameters": parameters,
            "messages": {msg_id: {"$ref": f"#/components/messages/{msg_id}"}},
        }
        messages[msg_id] = {
            "name": msg_id,
            "title": schema,
            "contentType": "application/json",
            "payload": {"$ref": REF.format(model=schema)},
            "bindings": {"mqtt": {"payloadFormatIndicator": 1, "bindingVersion": "0.2.0"}},
        }
        if cid in ("detections", "telemetry", "llmStream"):
            messages[msg_id]["bindings"]["mqtt"]["messageExpiryInterval"] = 600
    operations: dict[str, Any] = {}
    for cid in SENT:
        stamp = "not stamped" if cid == "haDiscovery" else "stamped with device_id, boot_id, seq"
        operations[f"send_{cid}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"The agent publishes {cid} (QoS 1"
            + (", retained" if cid in RETAINED else "")
            + f"; {stamp}).",
            "bindings": {"mqtt": {"qos": 1, "retain": cid in RETAINED, "bindingVersion": "0.2.0"}},
        }
    commands: dict[str, Any] = {}
    for spec in specs:
        if spec is None:  # pragma: no cover - names() lists registered specs
            continue
        entry: dict[str, Any] = {
            "description": spec.description,
            "class": spec.command_class,
            "signed": spec.command_class == "critical",
            "longRunning": spec.long_running,
        }
        if spec.args_model is not None:
            entry["args"] = {"$ref": REF.format(model=spec.args_model.__name__)}
        commands[spec.name] = entry
    channels["command"]["x-commands"] = commands
    operations["receive_command"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/command"},
        "summary": "The agent executes commands; each gets exactly one terminal reply "
        "(succeeded | failed | rejected | expired | busy), long ones also accepted/progress.",
        "bindings": {"mqtt": {"qos": 1, "bindingVersion": "0.2.0"}},
        "reply": {
            "channel": {"$ref": "#/channels/reply"},
            "messages": [{"$ref": "#/channels/reply/messages/reply"}],
        },
    }
    dead = ", ".join(f"0x{code:02x} {name}" for code, name in sorted(PERMANENT_FAILURES.items()))
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edge-agent MQTT interface",
            "version": "1.0.0",
            "description": "Topics, messages and commands of an edge-agent device. Payloads are "
            "UTF-8 JSON, generated from the agent's pydantic models (tools/gen_asyncapi.py). "
            "Every outbound message on edge/{device_id}/ carries device_id, boot_id (per agent "
            "run) and seq (per boot, increasing in publish order): consumers detect gaps and "
            "drop duplicates; a re-sent message keeps its (boot_id, seq). Publishes are QoS 1 "
            "through a durable outbox; under MQTT 5 a PUBACK reason code that can never "
            "succeed (" + dead + ") moves the message to the device's dead-letter table.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "fleet": {
                "host": "broker.example.net:8883",
                "protocol": "mqtts",
                "protocolVersion": "5",
                "description": "Fleet broker (deploy/mosquitto): TLS with client certificates, "
                "user name = device_id, ACL confines each device to edge/{device_id}/.",
                "security": [
                    {"$ref": "#/components/securitySchemes/userPassword"},
                    {"$ref": "#/components/securitySchemes/certificates"},
                ],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": schemas,
            "securitySchemes": {
                "userPassword": {"type": "userPassword", "description": "user = device_id"},
                "certificates": {"type": "X509", "description": "Client certificate"},
            },
        },
    }


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML; scalars JSON-encoded (valid YAML 1.2)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for key, item in value.items():
            k = json.dumps(str(key))
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{k}:\n{to_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{k}: {to_yaml(item, indent + 1)}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                body = to_yaml(item, indent + 1).lstrip()
                lines.append(f"{pad}- {body}")
            else:
                lines.append(f"{pad}- {to_yaml(item, indent + 1)}")
        return "\n".join(lines)
    return json.dumps(value, ensure_ascii=False)


def render() -> str:
    header = "# Generated by tools/gen_asyncapi.py from agent/reporting/messages.py: do not edit.\n"
    return header + to_yaml(build_document()) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run tools/gen_asyncapi.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
