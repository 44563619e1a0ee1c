"""The MQTT topic scheme: every topic the agent publishes or subscribes, under one prefix.

The prefix defaults to ``edge/{device_id}``. Below it::

    status                          retained: online | degraded | offline (birth + last will)
    telemetry                       periodic system / pipeline / outbox figures
    events                          device events: the command audit trail, outbox drops
    vision/{pipeline}/detections    per-frame detection results (droppable when the outbox is full)
    vision/{pipeline}/events        vision events (never dropped silently)
    llm/{request_id}/stream         LLM token stream chunks (droppable)
    llm/{request_id}/result         LLM final results (never dropped silently)
    cmd/{command}                   IN: commands (the only topics the agent subscribes)
    reply/{command_id}              replies when the request named no MQTT 5 Response Topic

Relative topics (what a pipeline hands ``ResultSink.publish``) are validated here: each level
is non-empty, carries no wildcard (``+``, ``#``), no NUL and no leading ``$``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from agent.errors import TopicInvalidError

__all__ = [
    "DEFAULT_PREFIX",
    "INVALID_REPLY_LEVEL",
    "Priority",
    "Topics",
    "classify",
    "priority_of",
    "validate_relative",
]

DEFAULT_PREFIX = "edge/{device_id}"
INVALID_REPLY_LEVEL = "_invalid"
"""``reply/_invalid`` receives replies to commands whose ``command_id`` could not be read (a
valid ``command_id`` never starts with ``_``)."""

_MAX_LEVEL_CHARS = 128
_FORBIDDEN_CHARS = re.compile(r"[+#\x00]")


class Priority(enum.IntEnum):
    """Outbox priority class: ``CRITICAL`` is never dropped silently, ``DROPPABLE`` is dropped
    oldest-first (and counted) when the outbox is full."""

    CRITICAL = 0
    DROPPABLE = 1


def validate_level(level: str, what: str = "topic level") -> str:
    """``level`` if it is a valid single topic level, else ``TopicInvalidError``."""
    if not level or "/" in level or _FORBIDDEN_CHARS.search(level) or level.startswith("$"):
        raise TopicInvalidError(
            f"{what} {level!r} is not a valid MQTT topic level: it must be non-empty and "
            "contain no '/', '+', '#', NUL or a leading '$'"
        )
    if len(level) > _MAX_LEVEL_CHARS:
        raise TopicInvalidError(
            f"{what} {level[:32]!r}... is longer than {_MAX_LEVEL_CHARS} characters"
        )
    return level


def validate_relative(topic: str) -> str:
    """A relative topic such as ``vision/street/detections``, validated level by level."""
    if not isinstance(topic, str) or not topic:
        raise TopicInvalidError(
            f"topic {topic!r} is empty: pass e.g. 'vision/<pipeline>/detections'"
        )
    for level in topic.split("/"):
        validate_level(level, f"level of topic {topic!r}")
    return topic


def classify(relative: str) -> tuple[Priority, str]:
    """The outbox priority class and the expiry kind (a key of the reporter's ``expiry_s``) of
    a relative topic: detections, telemetry and LLM stream chunks are droppable; replies,
    events, status and LLM results are critical. ``vision/*/*`` has the expiry kind
    ``detections``, ``llm/*/*`` ``llm_stream``, any other topic its own name (only droppable
    messages expire, so a critical topic's kind is never looked up)."""
    levels = relative.split("/")
    if len(levels) == 3 and levels[0] == "vision":
        droppable, kind = levels[2] == "detections", "detections"
    elif len(levels) == 3 and levels[0] == "llm":
        droppable, kind = levels[2] == "stream", "llm_stream"
    else:
        droppable, kind = relative == "telemetry", relative
    return (Priority.DROPPABLE if droppable else Priority.CRITICAL), kind


def priority_of(relative: str) -> Priority:
    """The outbox priority class of a relative topic (see ``classify``)."""
    return classify(relative)[0]


@dataclass(frozen=True)
class Topics:
    """Absolute topics for one device."""

    prefix: str

    @classmethod
    def for_device(cls, device_id: str, template: str = DEFAULT_PREFIX) -> Topics:
        """Render ``template`` (may name ``{device_id}``) and validate every level."""
        validate_level(device_id, "device_id")
        try:
            prefix = template.format(device_id=device_id)
        except (KeyError, IndexError, ValueError) as exc:
            raise TopicInvalidError(
                f"mqtt prefix {template!r} is not a valid template: only {{device_id}} may be "
                f"named ({exc})"
            ) from exc
        prefix = prefix.strip("/")
        validate_relative(prefix)
        return cls(prefix)

    def abs(self, relative: str) -> str:
        """``prefix/relative`` after validating ``relative``."""
        return f"{self.prefix}/{validate_relative(relative)}"

    def relative(self, absolute: str) -> str | None:
        """The part of ``absolute`` below the prefix, or None if it lies elsewhere."""
        head = self.prefix + "/"
        return absolute[len(head) :] if absolute.startswith(head) else None

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def cmd_filter(self) -> str:
        """Subscription filter for every command of this device."""
        return f"{self.prefix}/cmd/+"

    def detections(self, pipeline: str) -> str:
        return f"{self.prefix}/vision/{validate_level(pipeline, 'pipeline')}/detections"

    def vision_events(self, pipeline: str) -> str:
        return f"{self.prefix}/vision/{validate_level(pipeline, 'pipeline')}/events"

    def llm_stream(self, request_id: str) -> str:
        return f"{self.prefix}/llm/{validate_level(request_id, 'request_id')}/stream"

    def llm_result(self, request_id: str) -> str:
        return f"{self.prefix}/llm/{validate_level(request_id, 'request_id')}/result"

    def cmd(self, command: str) -> str:
        return f"{self.prefix}/cmd/{validate_level(command, 'command')}"

    def reply(self, command_id: str | None) -> str:
        """``reply/{command_id}``, or ``reply/_invalid`` when the id is unknown."""
        level = INVALID_REPLY_LEVEL if command_id is None else command_id
        return f"{self.prefix}/reply/{validate_level(level, 'command_id')}"

    def command_of(self, absolute: str) -> str | None:
        """The command name of a ``cmd/{command}`` topic, or None for any other topic."""
        rel = self.relative(absolute)
        if rel is None or not rel.startswith("cmd/"):
            return None
        name = rel[4:]
        return name if name and "/" not in name else None

    def accepts_response_topic(self, topic: str) -> bool:
        """True when a request's Response Topic lies under this device's ``reply/`` (the only
        reply topics the broker ACL lets a device write)."""
        rel = self.relative(topic)
        if rel is None or not rel.startswith("reply/"):
            return False
        try:
            validate_relative(rel)
        except TopicInvalidError:
            return False
        return True
