"""Output decoders, one module per format, and the registry that picks one by manifest name.

``build_decoder(name, spec, num_classes)`` returns a fresh decoder (decoders keep scratch
buffers: one per post-processing thread). The registry is a read-only mapping fixed at import:
adding a format means adding a module and a line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from engines.manifest import InputSpec
from pipelines.errors import PipelineConfigError
from pipelines.vision.decoders.base import DecodeParams, Decoder
from pipelines.vision.decoders.detr import DetrDecoder
from pipelines.vision.decoders.nanodet import NanodetDecoder
from pipelines.vision.decoders.yolov5 import Yolov5Decoder
from pipelines.vision.decoders.yolov8 import Yolov8Decoder
from pipelines.vision.decoders.yolox import YoloxDecoder

__all__ = ["DECODERS", "DecodeParams", "Decoder", "build_decoder"]

DECODERS: Mapping[str, Callable[[InputSpec, int], Decoder]] = MappingProxyType(
    {
        "yolox": YoloxDecoder,
        "detr": DetrDecoder,
        "nanodet": NanodetDecoder,
        "yolov8": Yolov8Decoder,
        "yolov5": Yolov5Decoder,
    }
)


def build_decoder(name: str, spec: InputSpec, num_classes: int) -> Decoder:
    """A new decoder of format ``name`` for a model fed by ``spec`` with ``num_classes``."""
    factory = DECODERS.get(name)
    if factory is None:
        known = ", ".join(sorted(DECODERS))
        raise PipelineConfigError(f"unknown decoder '{name}': known decoders are {known}")
    if num_classes < 1:
        raise PipelineConfigError(f"decoder '{name}' needs at least one class, got {num_classes}")
    return factory(spec, num_classes)
