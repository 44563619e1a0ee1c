"""YOLOX: one output ``[B, N, 5 + C]`` over the grid cells of strides 8, 16 and 32.

Per anchor point: raw ``x, y, w, h``, objectness and C class scores (objectness and classes are
already sigmoided in the exported graph). ``cx = (x + grid_x) * stride``, ``w = exp(w) * stride``;
score = objectness x best class score (one class per box; the class maximum is only taken on
rows whose objectness alone beats the threshold); then class-aware NMS. Anchor order:
stride by stride, row-major within a level (x fastest), as YOLOX's own ``decode_outputs``.
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
    anchor_count,
    check_runtime_shape,
    check_shape,
    finish,
    objectness_candidates,
    single_output,
    single_output_spec,
    xywh_to_xyxy,
)
from pipelines.vision.detections import Detections
from pipelines.vision.preprocess import FrameMeta

__all__ = ["YoloxDecoder"]

STRIDES = (8, 16, 32)


class YoloxDecoder(BaseDecoder):
    """Decoder for YOLOX exports (see the module docstring)."""

    name = "yolox"

    def __init__(self, spec: InputSpec, num_classes: int) -> None:
        self.num_classes = num_classes
        self.anchors = anchor_count(spec.width, spec.height, STRIDES)
        grids, strides = [], []
        for s in STRIDES:
            gw, gh = -(-spec.width // s), -(-spec.height // s)
            ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
            grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
            strides.append(np.full(gw * gh, s))
        self._grid = np.concatenate(grids).astype(np.float32)
        self._stride = np.concatenate(strides).astype(np.float32)
        self._expected = (-1, self.anchors, 5 + num_classes)

    @override
    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None:
        meaning = f"x, y, w, h, objectness + {self.num_classes} class scores per anchor"
        spec = single_output_spec(self.name, outputs, meaning)
        check_shape(self.name, spec, self._expected, meaning)

    @override
    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]:
        raw = single_output(self.name, outputs)
        check_runtime_shape(self.name, "output", raw, self._expected, len(metas))
        results = []
        for b, meta in enumerate(metas):
            pred = raw[b]
            idx, scores, class_ids, invalid = objectness_candidates(pred, params.score_threshold)
            cand = pred[idx]
            stride = self._stride[idx, None]
            xywh = np.empty((idx.shape[0], 4), dtype=np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                xywh[:, :2] = (cand[:, :2] + self._grid[idx]) * stride
                xywh[:, 2:] = np.exp(cand[:, 2:4]) * stride
            results.append(
                finish(
                    xywh_to_xyxy(xywh),
                    scores,
                    class_ids,
                    meta,
                    params,
                    invalid=invalid,
                    num_classes=self.num_classes,
                )
            )
        return results
