"""Ultralytics YOLOv5: one output ``[B, N, 5 + C]`` with ``N = 3 x`` the grid cells.

Per anchor box: ``cx, cy, w, h`` already in model-input pixels, objectness and C class scores
(both sigmoided in the export). Score = objectness x best class score (one class per box), then
class-aware NMS. ``N`` is three anchors per cell over strides 8/16/32 (P5 models) or 8/16/32/64
(P6 models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt
from typing_extensions import override

from engines.base import TensorSpec
from engines.manifest import InputSpec
from pipelines.vision.decoders.base import (
    BaseDecoder,
    DecodeParams,
    anchor_counts,
    check_runtime_shape,
    check_shape,
    finish,
    objectness_candidates,
    pick_anchors,
    single_output,
    single_output_spec,
    xywh_to_xyxy,
)
from pipelines.vision.detections import Detections
from pipelines.vision.preprocess import FrameMeta

__all__ = ["Yolov5Decoder"]

ANCHORS_PER_CELL = 3


class Yolov5Decoder(BaseDecoder):
    """Decoder for YOLOv5 exports (see the module docstring)."""

    name = "yolov5"

    def __init__(self, spec: InputSpec, num_classes: int) -> None:
        self.num_classes = num_classes
        self._counts = anchor_counts(spec, ANCHORS_PER_CELL)

    @override
    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None:
        meaning = f"cx, cy, w, h, objectness + {self.num_classes} class scores per box"
        spec = single_output_spec(self.name, outputs, meaning)
        n = pick_anchors(spec.shape, 1, self._counts)
        check_shape(self.name, spec, (-1, n, 5 + self.num_classes), meaning)

    @override
    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]:
        raw = single_output(self.name, outputs)
        n = pick_anchors(raw.shape, 1, self._counts)
        check_runtime_shape(self.name, "output", raw, (-1, n, 5 + self.num_classes), len(metas))
        results = []
        for b, meta in enumerate(metas):
            pred = raw[b]
            idx, scores, class_ids, invalid = objectness_candidates(pred, params.score_threshold)
            results.append(
                finish(
                    xywh_to_xyxy(pred[idx, :4]),
                    scores,
                    class_ids,
                    meta,
                    params,
                    invalid=invalid,
                    num_classes=self.num_classes,
                )
            )
        return results
