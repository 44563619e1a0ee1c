"""Ultralytics YOLOv8 / YOLO11: one output ``[B, 4 + C, N]`` (channels first).

Per anchor point (one per grid cell over strides 8/16/32, or 8/16/32/64 for P6 models):
``cx, cy, w, h`` already in model-input pixels, then C sigmoided class scores; no objectness.
Score = best class score (one class per box), then class-aware NMS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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
    pick_anchors,
    select_scores,
    single_output,
    single_output_spec,
    xywh_to_xyxy,
)
from pipelines.vision.detections import Detections
from pipelines.vision.preprocess import FrameMeta

__all__ = ["Yolov8Decoder"]


class Yolov8Decoder(BaseDecoder):
    """Decoder for YOLOv8 / YOLO11 detection exports (see the module docstring)."""

    name = "yolov8"

    def __init__(self, spec: InputSpec, num_classes: int) -> None:
        self.num_classes = num_classes
        self._counts = anchor_counts(spec)
        self._scratch: dict[int, npt.NDArray[np.float32]] = {}

    @override
    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None:
        meaning = f"cx, cy, w, h + {self.num_classes} class scores, channels first"
        spec = single_output_spec(self.name, outputs, meaning)
        n = pick_anchors(spec.shape, 2, self._counts)
        check_shape(self.name, spec, (-1, 4 + self.num_classes, n), meaning)

    @override
    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]:
        raw = single_output(self.name, outputs)
        n = pick_anchors(raw.shape, 2, self._counts)
        check_runtime_shape(self.name, "output", raw, (-1, 4 + self.num_classes, n), len(metas))
        score = self._scratch.get(n)
        if score is None:
            score = self._scratch[n] = np.empty(n, dtype=np.float32)
        results = []
        for b, meta in enumerate(metas):
            pred = raw[b]
            np.max(pred[4:], axis=0, out=score)
            idx, invalid = select_scores(score, params.score_threshold)
            cand = pred[:, idx]
            results.append(
                finish(
                    xywh_to_xyxy(np.ascontiguousarray(cand[:4].T)),
                    score[idx],
                    np.argmax(cand[4:], axis=0),
                    meta,
                    params,
                    invalid=invalid,
                    num_classes=self.num_classes,
                )
            )
        return results
