"""Pipeline configuration: a discriminated union on ``type`` (vision now, llm later)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.config import EngineConfig
from engines.configbase import StrictModel

__all__ = ["PipelineConfig", "VisionPipelineConfig"]


class VisionPipelineConfig(StrictModel):
    type: Literal["vision"] = Field(description="Selects a vision (detection) pipeline.")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Pipeline name used in topics.")
    model: str = Field(description="Model manifest name, e.g. `yolox_nano_416`.")
    engine: EngineConfig = Field(description="Engine that runs the model.")


PipelineConfig = VisionPipelineConfig
