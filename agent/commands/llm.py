"""LLM commands: ``llm.generate``, ``llm.cancel``, ``llm.session.drop``.

``llm.generate`` (args: ``pipelines.llm.requests.GenerateRequest``) queues the request on an
LLM pipeline and replies ``succeeded`` at once with where the answer will appear; the answer
itself streams on ``llm/{request_id}/stream`` and ends with one ``llm/{request_id}/result``
(see ``pipelines.llm.pipeline``). The request id is ``args.request_id`` or the command_id. A
full queue replies ``busy`` (reason ``llm_queue_full``): retry with a new command_id.

``llm.cancel`` (args: ``request_id``) stops the request wherever it is — waiting in the queue,
evaluating the prompt or decoding — and replies with how far it got: the stage it was in,
prompt tokens evaluated, tokens generated, and its final status.

``llm.session.drop`` forgets a session's history and KV state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from agent.commands.registry import CommandContext, CommandError, CommandRegistry, CommandSpec
from engines.configbase import StrictModel
from pipelines.errors import PipelineBusyError
from pipelines.llm.requests import REQUEST_ID_PATTERN, CancelArgs, GenerateRequest

if TYPE_CHECKING:
    from pipelines.llm.pipeline import LlmPipeline

__all__ = ["SessionDropArgs", "register_llm_commands"]

_CANCEL_WAIT_S = 5.0


class SessionDropArgs(StrictModel):
    session_id: str = Field(pattern=REQUEST_ID_PATTERN, description="The session to forget.")
    pipeline: str | None = Field(default=None, description="LLM pipeline; default: all.")


def register_llm_commands(
    registry: CommandRegistry, pipelines: Callable[[], Sequence[LlmPipeline]]
) -> None:
    """Register the LLM commands; ``pipelines()`` returns the running LLM pipelines."""

    def pick(name: str | None) -> LlmPipeline:
        available = list(pipelines())
        if not available:
            raise CommandError("no_llm_pipeline", "no LLM pipeline is running on this device")
        if name is None:
            return available[0]
        for pipeline in available:
            if pipeline.name == name:
                return pipeline
        known = ", ".join(p.name for p in available)
        raise CommandError("unknown_pipeline", f"no LLM pipeline {name!r} (running: {known})")

    def generate(ctx: CommandContext) -> Mapping[str, Any]:
        args: GenerateRequest = ctx.args
        pipeline = pick(args.pipeline)
        try:
            handle = pipeline.submit(args, request_id=ctx.command_id, source="command")
        except PipelineBusyError as exc:
            raise CommandError("llm_queue_full", str(exc), status="busy") from exc
        rid = handle.request_id
        return {
            "request_id": rid,
            "pipeline": pipeline.name,
            "state": "queued",
            "queue_depth": pipeline.status()["queue"]["depth"],
            "stream_topic": f"llm/{rid}/stream",
            "result_topic": f"llm/{rid}/result",
        }

    def cancel(ctx: CommandContext) -> Mapping[str, Any]:
        args: CancelArgs = ctx.args
        candidates = [pick(args.pipeline)] if args.pipeline else list(pipelines())
        wait_s = max(0.1, min(_CANCEL_WAIT_S, ctx.expires_at - time.time()))
        for pipeline in candidates:
            if pipeline.has_request(args.request_id):
                outcome = pipeline.cancel(args.request_id, wait_s=wait_s)
                if outcome is not None:
                    return {"pipeline": pipeline.name, **outcome}
        raise CommandError(
            "unknown_request",
            f"no LLM request {args.request_id!r} is known (finished long ago, or never submitted)",
        )

    def drop_session(ctx: CommandContext) -> Mapping[str, Any]:
        args: SessionDropArgs = ctx.args
        targets = [pick(args.pipeline)] if args.pipeline else list(pipelines())
        dropped = [p.name for p in targets if p.drop_session(args.session_id)]
        return {"session_id": args.session_id, "dropped_from": dropped}

    registry.register(
        CommandSpec(
            "llm.generate",
            generate,
            "control",
            "Queue an LLM request (chat messages or a prompt); the answer streams on "
            "llm/{request_id}/stream and ends on llm/{request_id}/result.",
            GenerateRequest,
        )
    )
    registry.register(
        CommandSpec(
            "llm.cancel",
            cancel,
            "control",
            "Stop an LLM request (queued, in prompt evaluation or decoding); replies how far "
            "it got.",
            CancelArgs,
        )
    )
    registry.register(
        CommandSpec(
            "llm.session.drop",
            drop_session,
            "control",
            "Forget an LLM session's history and KV state.",
            SessionDropArgs,
        )
    )
