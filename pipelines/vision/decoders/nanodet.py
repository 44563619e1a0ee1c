"""NanoDet (GFL head): per stride ``cls_pred_stride_S [B, N, C]`` and ``dis_pred_stride_S
[B, N, 4 * (reg_max + 1)]``.

Class scores are already sigmoided. Each side's distance (left, top, right, bottom) is a discrete
distribution over ``0..reg_max`` bins (GFL): softmax over the bins, expectation, times the
stride. Distances are measured from the grid-cell centres ``((i + 0.5) * stride)``, the
convention of NanoDet's GFL head (``get_single_level_center_point``, NanoDet 0.x: nanodet-m);
NanoDet-Plus heads use the cell corner instead and are not this decoder. Levels are found from
the output names; ``N = ceil(H / S) * ceil(W / S)`` cells, row-major. One class per box (best
score), then class-aware NMS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import override

from engines.base import TensorSpec
from engines.manifest import InputSpec
from pipelines.errors import DecoderMismatchError
from pipelines.vision.decoders.base import (
    BaseDecoder,
    DecodeParams,
    check_runtime_shape,
    check_shape,
    describe,
    finish,
    select_scores,
)
from pipelines.vision.detections import Detections
from pipelines.vision.preprocess import FrameMeta

__all__ = ["NanodetDecoder"]

_CLS = re.compile(r"^cls_pred_stride_(\d+)$")
CENTER_OFFSET = 0.5


class NanodetDecoder(BaseDecoder):
    """Decoder for NanoDet GFL-head exports (see the module docstring)."""

    name = "nanodet"

    def __init__(self, spec: InputSpec, num_classes: int) -> None:
        self.num_classes = num_classes
        self.width = spec.width
        self.height = spec.height
        self._levels: dict[int, _Level] = {}
        # output names -> strides of the last decoded batch (the names are fixed per engine)
        self._last_strides: tuple[tuple[str, ...], list[int]] | None = None

    def _level(self, stride: int) -> _Level:
        level = self._levels.get(stride)
        if level is None:
            level = self._levels[stride] = _Level(stride, self.width, self.height)
        return level

    @staticmethod
    def _strides(names: Sequence[str]) -> list[int]:
        found = (_CLS.match(n) for n in names)
        return sorted(int(m.group(1)) for m in found if m)

    @override
    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None:
        by_name = {s.name: s for s in outputs}
        strides = self._strides(list(by_name))
        if not strides:
            raise DecoderMismatchError(
                "decoder 'nanodet' expects outputs cls_pred_stride_S [B, N, C] and "
                f"dis_pred_stride_S [B, N, 4*(reg_max+1)] per stride S, the model has "
                f"{describe(outputs)}"
            )
        for s in strides:
            n = self._level(s).cells
            dis = by_name.get(f"dis_pred_stride_{s}")
            if dis is None:
                raise DecoderMismatchError(
                    f"decoder 'nanodet' found cls_pred_stride_{s} but no dis_pred_stride_{s} "
                    f"among {describe(outputs)}"
                )
            check_shape(
                self.name,
                by_name[f"cls_pred_stride_{s}"],
                (-1, n, self.num_classes),
                f"{self.num_classes} class scores per cell of stride {s}",
            )
            bins = dis.shape[2] if len(dis.shape) == 3 else -1
            if bins > 0 and (bins % 4 or bins < 8):
                bins = 32  # name the usual reg_max 7 layout in the error below
            check_shape(self.name, dis, (-1, n, bins), "4 side distributions per cell")

    @override
    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]:
        names = tuple(outputs)
        last = self._last_strides
        if last is not None and last[0] == names:
            strides = last[1]
        else:
            strides = self._strides(names)
            self._last_strides = (names, strides)
        if not strides:
            raise DecoderMismatchError(
                f"decoder 'nanodet' found no cls_pred_stride_* output among "
                f"{', '.join(outputs) or 'none'}"
            )
        batch = len(metas)
        levels = []
        for s in strides:
            level = self._level(s)
            cls = outputs[f"cls_pred_stride_{s}"]
            dis = outputs.get(f"dis_pred_stride_{s}")
            if dis is None:
                raise DecoderMismatchError(f"decoder 'nanodet' got no dis_pred_stride_{s}")
            check_runtime_shape(
                self.name, f"cls_pred_stride_{s}", cls, (-1, level.cells, self.num_classes), batch
            )
            check_runtime_shape(
                self.name, f"dis_pred_stride_{s}", dis, (-1, level.cells, -1), batch
            )
            if dis.shape[2] % 4 or dis.shape[2] < 8:
                raise DecoderMismatchError(
                    f"dis_pred_stride_{s} has {dis.shape[2]} values per cell, not 4 x (reg_max+1)"
                )
            levels.append((level, cls, dis))
        results = []
        for b, meta in enumerate(metas):
            boxes, scores, class_ids = [], [], []
            invalid = 0
            for level, cls, dis in levels:
                np.max(cls[b], axis=1, out=level.best)
                idx, bad = select_scores(level.best, params.score_threshold)
                invalid += bad
                boxes.append(level.boxes(dis[b][idx], idx))
                scores.append(level.best[idx])
                class_ids.append(np.argmax(cls[b][idx], axis=1))
            results.append(
                finish(
                    np.concatenate(boxes),
                    np.concatenate(scores),
                    np.concatenate(class_ids),
                    meta,
                    params,
                    invalid=invalid,
                    num_classes=self.num_classes,
                )
            )
        return results


class _Level:
    """Cell centres and scratch of one stride."""

    def __init__(self, stride: int, width: int, height: int) -> None:
        self.stride = stride
        gw, gh = -(-width // stride), -(-height // stride)
        self.cells = gw * gh
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        self.centers = np.stack(
            [(xs.ravel() + CENTER_OFFSET) * stride, (ys.ravel() + CENTER_OFFSET) * stride], axis=1
        ).astype(np.float32)
        self.best = np.empty(self.cells, dtype=np.float32)

    def boxes(
        self, dis: npt.NDArray[np.float32], idx: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.float32]:
        """xyxy model-input boxes of the cells ``idx`` from their (M, 4*(R+1)) logits."""
        m = idx.shape[0]
        bins = dis.shape[1] // 4
        logits = dis.reshape(m, 4, bins).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            logits -= logits.max(axis=2, keepdims=True)
            np.exp(logits, out=logits)
            logits /= logits.sum(axis=2, keepdims=True)
            dist = logits @ np.arange(bins, dtype=np.float32) * np.float32(self.stride)
        centers = self.centers[idx]
        out = np.empty((m, 4), dtype=np.float32)
        out[:, :2] = centers - dist[:, :2]
        out[:, 2:] = centers + dist[:, 2:]
        return out
