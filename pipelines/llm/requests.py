"""What an LLM request carries (the ``llm.generate`` command's ``args`` and the Python API).

Exactly one of ``messages`` (a chat, rendered with the model's template) or ``prompt`` (plain
text completion). With ``session_id`` the pipeline keeps the conversation: a request then sends
only the new message(s), the pipeline adds the earlier turns and their KV state.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from engines.configbase import StrictModel

__all__ = ["REQUEST_ID_PATTERN", "CancelArgs", "ChatMessage", "GenerateRequest"]

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
"""A request id is one MQTT topic level (``llm/{request_id}/stream``)."""


_VERBATIM = ConfigDict(str_strip_whitespace=False)
"""Text is the user's: leading/trailing spaces and newlines of a prompt, message or stop string
matter (a stop string " 16" is not "16")."""


class ChatMessage(StrictModel):
    model_config = _VERBATIM

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(max_length=200_000, description="The text of the message.")


class GenerateRequest(StrictModel):
    model_config = _VERBATIM

    request_id: str | None = Field(
        default=None,
        pattern=REQUEST_ID_PATTERN,
        description="Id used in the stream/result topics and by `llm.cancel`; default: the "
        "command_id (or a random id in the Python API).",
    )
    pipeline: str | None = Field(
        default=None, description="LLM pipeline to use; default: the only (first) one."
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=1024, description="Chat messages, in order."
    )
    prompt: str | None = Field(
        default=None, min_length=1, max_length=400_000, description="Plain text to continue."
    )
    session_id: str | None = Field(
        default=None,
        pattern=REQUEST_ID_PATTERN,
        description="Keep this conversation (chat only): earlier turns and their KV state are "
        "reused, so only the new tokens are evaluated.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=32768, description="Tokens to generate at most."
    )
    temperature: float | None = Field(default=None, ge=0, le=5, description="0 = greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, ge=0, le=10000, description="Candidates kept.")
    repeat_penalty: float | None = Field(
        default=None,
        ge=0.5,
        le=2.0,
        description="Penalty on recently generated tokens (1 = none; ~1.1-1.3 stops small "
        "models from looping).",
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Stop strings: the answer ends before the first one (not included).",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**32 - 1, description="Sampling seed; default: engine.seed."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="Constrain the answer to JSON valid against this schema (grammar-based).",
    )
    grammar: str | None = Field(
        default=None, max_length=100_000, description="Constrain the answer to a GBNF grammar."
    )
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="End the request this many seconds after submission "
        "(`deadline_exceeded`); default: the pipeline's `defaults.deadline_s`.",
    )
    stream: bool | None = Field(
        default=None,
        description="Publish chunks on llm/{request_id}/stream; default: the pipeline's "
        "`result_mode`.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat) or `prompt` (plain text)")
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give at most one of `json_schema` and `grammar`")
        if self.session_id is not None and self.messages is None:
            raise ValueError("`session_id` needs `messages` (sessions are chats)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class CancelArgs(StrictModel):
    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="The request to stop.")
    pipeline: str | None = Field(
        default=None, description="LLM pipeline; default: whichever has the request."
    )
