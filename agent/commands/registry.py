"""The command registry: name -> handler, class (read | control | critical), argument model.

A handler takes a ``CommandContext`` and returns a JSON-serialisable mapping (the reply's
``result``) or None. To fail with a stable reason it raises ``CommandError(reason, message)``
(``status="busy"`` when the command could not run now and may be retried with a new id);
any agent/engine/pipeline error is reported with its own ``reason``; anything else as
``internal_error``. ``long_running`` commands get an ``accepted`` reply first, run on their own
thread, and may send ``progress`` replies through ``ctx.progress(fraction, message)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

__all__ = [
    "COMMAND_NAME_PATTERN",
    "CommandClass",
    "CommandContext",
    "CommandError",
    "CommandRegistry",
    "CommandSpec",
    "Handler",
]

CommandClass = Literal["read", "control", "critical"]
COMMAND_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class CommandError(Exception):
    """Raised by a handler: the command failed (or, ``status="busy"``, could not run now)
    with a stable ``reason`` code."""

    def __init__(
        self, reason: str, message: str, *, status: Literal["failed", "busy"] = "failed"
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status: Literal["failed", "busy"] = status


@dataclass(frozen=True)
class CommandContext:
    command: str
    command_id: str
    args: Any
    """The validated ``args_model`` instance, or the raw args dict without a model."""
    issued_at: float
    expires_at: float
    key_id: str | None
    progress: Callable[[float, str], None]
    """Send a ``progress`` reply: fraction done in [0, 1] and one line of text."""


Handler = Callable[[CommandContext], Mapping[str, Any] | None]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    handler: Handler
    command_class: CommandClass
    description: str
    args_model: type[BaseModel] | None = None
    long_running: bool = False


class CommandRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, CommandSpec] = {}

    def register(self, spec: CommandSpec) -> None:
        if not COMMAND_NAME_PATTERN.match(spec.name):
            raise ValueError(f"command name {spec.name!r} must look like 'pipeline.start'")
        if spec.name in self._specs:
            raise ValueError(f"command {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)
