"""Built-in commands: ``status.get`` and ``config.get`` (secrets redacted)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from agent.commands.registry import CommandContext, CommandRegistry, CommandSpec
from engines.configbase import StrictModel

__all__ = ["NoArgs", "redact", "register_builtins"]

REDACTED = "***"
_SECRET_KEY = re.compile(r"(password|passphrase|secret|token|api_key|private_key)", re.IGNORECASE)


class NoArgs(StrictModel):
    """A command without arguments (``args`` must be empty)."""


def redact(value: Any) -> Any:
    """A copy of ``value`` with every non-null value under a secret-looking key replaced."""
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED
                if value[k] is not None and _SECRET_KEY.search(str(k))
                else redact(value[k])
            )
            for k in value
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def register_builtins(
    registry: CommandRegistry,
    *,
    status: Callable[[], Mapping[str, Any]],
    config: Callable[[], BaseModel | Mapping[str, Any]],
) -> None:
    """Register ``status.get`` (the agent's status) and ``config.get`` (effective config)."""

    def status_get(_ctx: CommandContext) -> Mapping[str, Any]:
        return dict(status())

    def config_get(_ctx: CommandContext) -> Mapping[str, Any]:
        cfg = config()
        data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
        redacted: dict[str, Any] = redact(data)
        return redacted

    registry.register(
        CommandSpec(
            "status.get",
            status_get,
            "read",
            "The agent's status: state, pipelines, models.",
            NoArgs,
        )
    )
    registry.register(
        CommandSpec(
            "config.get",
            config_get,
            "read",
            "The effective configuration, secrets redacted.",
            NoArgs,
        )
    )
