"""Config of the ONNX Runtime engine (importable without onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engines.configbase import StrictModel

__all__ = ["OnnxRuntimeConfig"]

Provider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _default_providers() -> list[Provider]:
    return ["CPUExecutionProvider"]


class OnnxRuntimeConfig(StrictModel):
    type: Literal["onnxruntime"] = Field(description="Selects the ONNX Runtime engine.")
    providers: list[Provider] = Field(
        default_factory=_default_providers,
        min_length=1,
        description="Execution providers in order of preference; missing ones fall back to the "
        "next and the fallback is reported in status.",
    )
    require_provider: bool = Field(
        default=False,
        description="Fail the load instead of falling back when the first provider is missing.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="ONNX Runtime graph optimisation level."
    )
    intra_op_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads; default: the number of CPUs in the inference stage's "
        "pinned set (never os.cpu_count()).",
    )
    warmup_runs: int = Field(
        default=1,
        ge=0,
        description="Inference runs at load time (for an input with dynamic dims: when its shape "
        "is first known).",
    )
    slots: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Buffer sets (inputs, outputs, IOBinding) used round-robin by submit/collect: "
        "one inference runs at a time on a worker thread while the next slot's input buffer is "
        "filled.",
    )
    allow_spinning: bool = Field(
        default=True,
        description="Let idle intra-op threads spin briefly for the next op (lower latency, more "
        "CPU); turn off when the stage shares its CPUs with other work.",
    )
    log_severity: Literal["verbose", "info", "warning", "error", "fatal"] = Field(
        default="error",
        description="Minimum severity of ONNX Runtime's own log messages.",
    )
    profile_path: Path | None = Field(
        default=None, description="Write an ONNX Runtime profile (JSON) under this path prefix."
    )
