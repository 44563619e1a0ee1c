"""Engine configuration: a discriminated union on ``type``, one config class per backend file.

Each backend module declares its config with a ``type: Literal[...]`` key and nothing that needs
its runtime, so a Raspberry Pi validates a TensorRT config without TensorRT installed. The
runtime import happens only in ``build_engine`` (see ``engines.registry``).
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from engines.onnxruntime_config import OnnxRuntimeConfig
from engines.tensorrt_config import TensorRTConfig

__all__ = ["EngineConfig", "OnnxRuntimeConfig", "TensorRTConfig"]

EngineConfig = Annotated[
    Union[OnnxRuntimeConfig, TensorRTConfig],  # noqa: UP007 - pydantic discriminated union
    Field(discriminator="type", description="Inference engine; selected by its `type` key."),
]
