"""What travels between the MQTT owner thread and the command dispatcher.

``InboundCommand``: one received ``cmd/{command}`` message (the raw payload, not yet parsed).
``ReplyBody``: one reply the dispatcher wants sent; the reporter stamps it (boot_id, seq) into a
``CommandReply`` and publishes it through the durable outbox.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.reporting.messages import AuditRecord, ReplyStatus

__all__ = ["InboundCommand", "ReplyBody", "ReplySink"]


@dataclass(frozen=True)
class InboundCommand:
    command: str
    """Command name: the last level of the ``cmd/{command}`` topic."""
    payload: bytes
    topic: str
    response_topic: str | None = None
    """MQTT 5 Response Topic of the request, if any."""
    correlation: bytes | None = None
    """MQTT 5 Correlation Data of the request, echoed on the reply."""
    retained: bool = False
    received_at: float = 0.0


@dataclass(frozen=True)
class ReplyBody:
    command_id: str | None
    command: str | None
    status: ReplyStatus
    reason: str
    message: str
    result: Mapping[str, Any] | None = None
    progress: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status not in ("accepted", "progress")


class ReplySink(Protocol):
    """Where the dispatcher sends replies and audit events (the MQTT reporter implements it)."""

    def send_reply(self, inbound: InboundCommand, body: ReplyBody) -> str:
        """Queue the reply durably; returns the topic it goes to."""
        ...

    def publish_audit(self, record: AuditRecord) -> None:
        """Publish an audit record on ``events``."""
        ...
