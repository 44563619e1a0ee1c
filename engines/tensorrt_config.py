"""Config of the TensorRT engine (importable without tensorrt or pycuda)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engines.configbase import StrictModel

__all__ = ["TensorRTConfig"]


class TensorRTConfig(StrictModel):
    type: Literal["tensorrt"] = Field(description="Selects the TensorRT engine (Jetson).")
    plan: Path | None = Field(
        default=None,
        description="Serialized engine (.plan/.engine); default: the plan store's entry for the "
        "model, this device and `precision`.",
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp16", description="Precision of the plan to load or build."
    )
    memory: Literal["pinned", "mapped", "pageable"] = Field(
        default="pinned",
        description="Host buffers: page-locked (pinned), device-mapped page-locked (zero-copy on "
        "Jetson's integrated GPU) or pageable (for comparison).",
    )
    slots: int = Field(
        default=2, ge=1, le=8, description="In-flight slots (context + stream + event each)."
    )
    build_if_missing: bool = Field(
        default=False, description="Build a missing plan from the ONNX at first boot."
    )
    fallback_to_onnxruntime: bool = Field(
        default=True,
        description="On a missing runtime or an incompatible plan, run the source ONNX on ONNX "
        "Runtime instead (reported in status).",
    )
