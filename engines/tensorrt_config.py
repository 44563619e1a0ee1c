"""Config of the TensorRT engine (importable without tensorrt or pycuda)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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
    plan_dir: Path | None = Field(
        default=None,
        description="Plan store folder (plans keyed by model sha256, TensorRT version, GPU, "
        "precision and batch profile, each with a JSON sidecar); default: `plans/` next to the "
        "source ONNX.",
    )
    batch: tuple[int, int, int] = Field(
        default=(1, 1, 1),
        description="Optimisation profile of the batch dimension as (min, opt, max); part of the "
        "plan key.",
    )
    workspace_mib: int = Field(
        default=1024, ge=16, description="Builder workspace memory pool limit in MiB."
    )
    calibration_images: Path | None = Field(
        default=None,
        description="Folder of images for INT8 calibration when a plan is built on the device "
        '(needed with precision = "int8" and build_if_missing).',
    )
    timing_cache: Path | None = Field(
        default=None,
        description="Builder timing cache file, loaded before and saved after a build; default: "
        "`timing.cache` in the plan store.",
    )
    device: int = Field(default=0, ge=0, description="CUDA device index.")
    warmup_runs: int = Field(
        default=1, ge=0, description="Inference runs per slot at load time (opt shapes)."
    )

    @model_validator(mode="after")
    def _check_batch(self) -> TensorRTConfig:
        low, opt, high = self.batch
        if not 1 <= low <= opt <= high:
            msg = f"batch = {list(self.batch)} must be [min, opt, max] with 1 <= min <= opt <= max"
            raise ValueError(msg)
        return self
