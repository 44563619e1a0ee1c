"""Config of an LLM pipeline (``type = "llm"``): a GGUF model served through a request queue.

[[pipelines]]
type = "llm"
name = "assistant"
model = "smollm2-135m-instruct-q4_1"
[pipelines.engine]          # engines.llama_config.LlamaCppConfig
n_ctx = 2048
[pipelines.stream]          # how tokens are coalesced into llm/{request_id}/stream chunks
flush_ms = 100
[pipelines.sessions]        # KV state of multi-turn sessions (RAM LRU, optional disk)
[pipelines.prefix_cache]    # KV state of shared system prompts
[pipelines.narrator]        # optional: operator reports from vision detection counts
interval_s = 60
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engines.configbase import StrictModel
from engines.llama_config import LlamaCppConfig
from pipelines.base import NAME_PATTERN

__all__ = [
    "KvCacheConfig",
    "LlmDefaults",
    "LlmPipelineConfig",
    "NarratorConfig",
    "SessionCacheConfig",
    "StreamConfig",
]


class StreamConfig(StrictModel):
    """When buffered tokens become one ``llm/{request_id}/stream`` message."""

    flush_ms: float = Field(
        default=100.0,
        ge=0,
        description="Publish the buffered text once its oldest token waited this long.",
    )
    flush_tokens: int = Field(
        default=16, ge=1, le=4096, description="Publish once this many tokens are buffered."
    )
    sentence_end: bool = Field(
        default=True,
        description="Publish at the end of a sentence or line (`.`, `!`, `?`, `:`, newline).",
    )
    first_token: bool = Field(
        default=True,
        description="Publish the first token at once, so the time to first token seen by a "
        "client is not held back by coalescing.",
    )


class KvCacheConfig(StrictModel):
    """A bounded LRU of saved KV states in RAM."""

    max_entries: int = Field(default=8, ge=0, le=4096, description="Most states kept; 0 = off.")
    max_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=0,
        description="Most bytes of KV state kept (the least recently used go first).",
    )


class SessionCacheConfig(KvCacheConfig):
    """Multi-turn sessions: their messages and KV state, so turn N+1 evaluates only new tokens."""

    max_entries: int = Field(
        default=16, ge=0, le=4096, description="Most sessions kept in RAM; 0 = no sessions."
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="Most bytes of session KV state in RAM."
    )
    max_messages: int = Field(
        default=64,
        ge=2,
        le=4096,
        description="Messages kept per session; older turns (not the system messages) are "
        "dropped, which costs one full prompt evaluation.",
    )
    disk_dir: Path | None = Field(
        default=None,
        description="Folder for sessions evicted from RAM (one file per session); unset: an "
        "evicted session starts again without history.",
    )
    max_disk_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=0,
        description="Most bytes of session files in `disk_dir` (the oldest go first).",
    )


class LlmDefaults(StrictModel):
    """Defaults of a request that does not set them."""

    max_tokens: int = Field(default=256, ge=1, le=32768, description="Tokens to generate.")
    temperature: float = Field(default=0.7, ge=0, le=5, description="0 = greedy.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=40, ge=0, le=10000, description="Candidates kept; 0 = all.")
    deadline_s: float = Field(
        default=120.0,
        gt=0,
        description="A request not finished this long after it was submitted ends with "
        "`deadline_exceeded` (queue wait included).",
    )


class NarratorConfig(StrictModel):
    """Operator reports: recent detection counts of vision pipelines turned into a few words."""

    interval_s: float = Field(
        default=60.0, ge=1, description="Write a report this often (when detections came in)."
    )
    on_events: bool = Field(
        default=True,
        description="Also write a report when a vision event arrives (`vision/*/events`), at "
        "most every `min_gap_s`.",
    )
    min_gap_s: float = Field(default=10.0, ge=0, description="Shortest time between two reports.")
    pipelines: list[str] = Field(
        default_factory=list,
        description="Vision pipelines to report on; empty = every vision pipeline.",
    )
    max_tokens: int = Field(default=48, ge=1, le=1024, description="Length limit of a report.")
    system_prompt: str = Field(
        default=(
            "You are the operator assistant of a street camera. Summarise the detection counts "
            "you are given in one or two short, factual sentences. Do not invent objects."
        ),
        description="System message of every report (cached as a prompt prefix).",
    )


class LlmPipelineConfig(StrictModel):
    type: Literal["llm"] = Field(description="Selects an LLM pipeline (llama.cpp, GGUF).")
    name: str = Field(
        pattern=NAME_PATTERN, description="Pipeline name used in status and commands."
    )
    model: str = Field(description="Model manifest name, e.g. `smollm2-135m-instruct-q4_1`.")
    engine: LlamaCppConfig = Field(
        default_factory=LlamaCppConfig, description="llama.cpp settings."
    )
    queue_size: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Requests waiting behind the running one; more are answered `busy`.",
    )
    defaults: LlmDefaults = Field(
        default_factory=LlmDefaults, description="Defaults of requests that do not set them."
    )
    stream: StreamConfig = Field(
        default_factory=StreamConfig, description="Coalescing of streamed tokens."
    )
    sessions: SessionCacheConfig = Field(
        default_factory=SessionCacheConfig, description="Multi-turn session KV states."
    )
    prefix_cache: KvCacheConfig = Field(
        default_factory=KvCacheConfig,
        description="KV states of the system-message part of chat prompts, shared by requests "
        "with the same system prompt.",
    )
    narrator: NarratorConfig | None = Field(
        default=None, description="Operator reports from vision detections; unset: off."
    )
    stage: str = Field(
        default="llm", description="Pinning stage (key of `pinning.stages`) of the LLM worker."
    )
    heartbeat_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="The worker promises the watchdog a beat at least this often (it beats "
        "between prompt chunks and tokens).",
    )
    result_mode: Literal["stream", "result"] = Field(
        default="stream",
        description="`stream`: chunks on llm/{id}/stream and the final result; `result`: only "
        "the final result message.",
    )
