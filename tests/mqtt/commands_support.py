"""Helpers for the command tests: keys, envelopes, a dispatcher on real files."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field

from agent.commands.audit import AuditLog
from agent.commands.builtins import register_builtins
from agent.commands.dispatcher import CommandDispatcher, DispatchSettings
from agent.commands.inbound import InboundCommand, ReplyBody
from agent.commands.registry import CommandContext, CommandError, CommandRegistry, CommandSpec
from agent.commands.replay import ReplayGuard
from agent.commands.signing import TrustedKeys, public_key_text, sign_envelope
from agent.reporting.messages import AuditRecord
from engines.configbase import StrictModel

DEVICE = "dev-test"


class LoadArgs(StrictModel):
    name: str = Field(min_length=1, description="Model name.")


@dataclass
class Recorder:
    """A ``ReplySink`` that keeps what the dispatcher sends (for in-process tests)."""

    replies: list[tuple[InboundCommand, ReplyBody]] = field(default_factory=list)
    audits: list[AuditRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send_reply(self, inbound: InboundCommand, body: ReplyBody) -> str:
        with self.lock:
            self.replies.append((inbound, body))
        return f"edge/{DEVICE}/reply/{body.command_id or '_invalid'}"

    def publish_audit(self, record: AuditRecord) -> None:
        with self.lock:
            self.audits.append(record)


def make_keys(folder: Path, name: str = "ops") -> Ed25519PrivateKey:
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    (folder / f"{name}.pub").write_text(public_key_text(key.public_key()), encoding="ascii")
    return key


def make_registry(loads: list[str] | None = None) -> CommandRegistry:
    registry = CommandRegistry()
    register_builtins(
        registry,
        status=lambda: {"state": "running", "pipelines": {"street": "running"}},
        config=lambda: {
            "device_id": DEVICE,
            "reporting": {"mqtt": {"host": "h", "password": "hunter2", "password_file": None}},
        },
    )
    register_test_commands(registry, loads)
    return registry


def register_test_commands(registry: CommandRegistry, loads: list[str] | None = None) -> None:
    """model.load (critical, signed), job.slow and job.other (long-running), test.explode (always
    raises)."""

    def model_load(ctx: CommandContext) -> dict[str, Any]:
        if ctx.args.name == "missing":
            raise CommandError("model_not_found", "no model named 'missing'")
        if loads is not None:
            loads.append(ctx.args.name)
        return {"loaded": ctx.args.name}

    def slow_job(ctx: CommandContext) -> dict[str, Any]:
        for i in range(3):
            ctx.progress((i + 1) / 3, f"step {i + 1}/3")
            time.sleep(0.01)
        return {"steps": 3}

    def explode(_ctx: CommandContext) -> dict[str, Any]:
        raise RuntimeError("handler bug")

    registry.register(CommandSpec("model.load", model_load, "critical", "Load a model.", LoadArgs))
    registry.register(
        CommandSpec("job.slow", slow_job, "control", "A long job.", long_running=True)
    )
    registry.register(
        CommandSpec("job.other", slow_job, "control", "Another long job.", long_running=True)
    )
    registry.register(CommandSpec("test.explode", explode, "read", "Always raises."))


def make_dispatcher(
    tmp: Path,
    replies: Any,
    *,
    settings: DispatchSettings | None = None,
    clock: Any = time.time,
    loads: list[str] | None = None,
) -> CommandDispatcher:
    return CommandDispatcher(
        device_id=DEVICE,
        registry=make_registry(loads),
        replies=replies,
        guard=ReplayGuard(tmp / "replay.sqlite", clock=clock),
        keys=TrustedKeys(tmp / "keys"),
        audit=AuditLog(tmp / "audit.jsonl"),
        settings=settings,
        clock=clock,
    )


def envelope(
    *,
    command_id: str | None = None,
    issued: float | None = None,
    ttl: float = 60.0,
    args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    now = time.time() if issued is None else issued
    return {
        "command_id": command_id or uuid.uuid4().hex,
        "issued_at": now,
        "expires_at": now + ttl,
        "args": args or {},
    }


def signed(
    env: dict[str, Any],
    command: str,
    key: Ed25519PrivateKey,
    key_id: str = "ops",
    device: str = DEVICE,
) -> dict[str, Any]:
    return sign_envelope(env, command, device, key, key_id)


def inbound(command: str, payload: dict[str, Any] | bytes | str, **kw: Any) -> InboundCommand:
    if isinstance(payload, dict):
        data = json.dumps(payload).encode()
    elif isinstance(payload, str):
        data = payload.encode()
    else:
        data = payload
    return InboundCommand(command=command, payload=data, topic=f"edge/{DEVICE}/cmd/{command}", **kw)
