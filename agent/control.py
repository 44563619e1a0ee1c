"""The agent's own MQTT commands: pipelines, models, restart.

``register_agent_commands(registry, agent)`` runs in the agent's reporting step, before the
MQTT runtime starts (``Agent._open_mqtt``), next to the built-in ``status.get``/``config.get``::

    command          class     long  args                                   does
    pipeline.start   control   yes   name                                   build + start a stopped
                                                                            or failed pipeline
    pipeline.stop    control   no    name                                   stop it, free its engine
    pipeline.set     control   no    name + any of score_threshold,         live settings (stopped
                                     nms_iou, fps_cap, classes              pipeline: next start)
    model.load       critical  yes   name [, pipeline]                      fetch/verify; with
                                                                            pipeline: swap its model
    model.unload     critical  no    name                                   stop its pipelines
    agent.restart    critical  no    [reason]                               graceful stop, exit 75
    bundle.install   critical  yes   url | path [, allow_downgrade]         install a signed bundle,
                                                                            exit 75 (agent.bundles.
                                                                            command)

Critical commands must be signed (``reporting.mqtt.commands.signed_classes``). Long commands
answer ``accepted`` first, then ``progress`` replies, then their one terminal reply. In
``pipeline.set`` a key left out keeps its value; ``fps_cap: null`` removes the cap and
``classes: null`` keeps every class.

Reason codes of these commands (besides the dispatcher's own): ``ok``; ``pipeline_unknown``,
``model_not_loaded``, ``not_supported``, ``agent_stopping`` (failed); ``control_busy`` (busy:
another pipeline/model command is running); and the reason of any engine/pipeline error raised
while building or starting (``model_not_found``, ``decoder_mismatch``, ``source_open_failed``,
``pipeline_config_invalid``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from agent.bundles.command import register_bundle_commands
from agent.commands.registry import CommandContext, CommandRegistry, CommandSpec
from engines.configbase import StrictModel
from pipelines.base import NAME_PATTERN

if TYPE_CHECKING:
    from agent.process import Agent

__all__ = [
    "ModelArgs",
    "ModelLoadArgs",
    "PipelineArgs",
    "PipelineSetArgs",
    "RestartArgs",
    "register_agent_commands",
]

_MODEL_NAME = r"^[a-z0-9][a-z0-9_.-]{0,127}$"
_SETTINGS = ("score_threshold", "nms_iou", "fps_cap", "classes")


class PipelineArgs(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name (`[[pipelines]] name`).")


class PipelineSetArgs(StrictModel):
    """At least one setting; a setting left out keeps its value."""

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name (`[[pipelines]] name`).")
    score_threshold: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="New detection score threshold."
    )
    nms_iou: float | None = Field(default=None, gt=0.0, le=1.0, description="New NMS IoU.")
    fps_cap: float | None = Field(
        default=None, gt=0.0, description="New frame rate cap of every source; null: no cap."
    )
    classes: list[str | int] | None = Field(
        default=None, description="New class allow-list (labels or ids); null: every class."
    )

    @model_validator(mode="after")
    def _some_setting(self) -> PipelineSetArgs:
        given = self.model_fields_set - {"name"}
        if not given:
            raise ValueError(f"name at least one setting to change: {', '.join(_SETTINGS)}")
        for key in ("score_threshold", "nms_iou"):
            if key in given and getattr(self, key) is None:
                raise ValueError(f"{key} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        """The settings given (null included: it means 'no cap' / 'every class')."""
        return {k: getattr(self, k) for k in _SETTINGS if k in self.model_fields_set}


class ModelArgs(StrictModel):
    name: str = Field(pattern=_MODEL_NAME, description="Model manifest name.")


class ModelLoadArgs(ModelArgs):
    pipeline: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="Pipeline to run the model in (rebuilt on it); unset: only fetch and "
        "verify the model in the store.",
    )


class RestartArgs(StrictModel):
    reason: str | None = Field(
        default=None, max_length=200, description="Why (logged and audited with the command)."
    )


def register_agent_commands(registry: CommandRegistry, agent: Agent) -> None:
    """Register pipeline.*, model.*, agent.restart and bundle.install (see the module
    docstring)."""

    def pipeline_start(ctx: CommandContext) -> dict[str, Any]:
        return agent.start_pipeline(ctx.args.name, ctx.progress)

    def pipeline_stop(ctx: CommandContext) -> dict[str, Any]:
        return agent.stop_pipeline(ctx.args.name)

    def pipeline_set(ctx: CommandContext) -> dict[str, Any]:
        return agent.update_pipeline(ctx.args.name, ctx.args.changes())

    def model_load(ctx: CommandContext) -> dict[str, Any]:
        return agent.load_model(ctx.args.name, ctx.args.pipeline, ctx.progress)

    def model_unload(ctx: CommandContext) -> dict[str, Any]:
        return agent.unload_model(ctx.args.name)

    def agent_restart(ctx: CommandContext) -> dict[str, Any]:
        return agent.request_restart(ctx.args.reason)

    specs = [
        CommandSpec(
            "pipeline.start",
            pipeline_start,
            "control",
            "Build (load the model) and start a stopped or failed pipeline.",
            PipelineArgs,
            long_running=True,
        ),
        CommandSpec(
            "pipeline.stop",
            pipeline_stop,
            "control",
            "Stop a pipeline and release its engine.",
            PipelineArgs,
        ),
        CommandSpec(
            "pipeline.set",
            pipeline_set,
            "control",
            "Change score_threshold, nms_iou, fps_cap or classes of a pipeline.",
            PipelineSetArgs,
        ),
        CommandSpec(
            "model.load",
            model_load,
            "critical",
            "Fetch and verify a model; with `pipeline`, run that pipeline on it.",
            ModelLoadArgs,
            long_running=True,
        ),
        CommandSpec(
            "model.unload",
            model_unload,
            "critical",
            "Stop every pipeline running the model (its engines are closed).",
            ModelArgs,
        ),
        CommandSpec(
            "agent.restart",
            agent_restart,
            "critical",
            "Stop gracefully and exit with status 75 for systemd to start the agent again.",
            RestartArgs,
        ),
    ]
    for spec in specs:
        registry.register(spec)
    register_bundle_commands(registry, agent)
