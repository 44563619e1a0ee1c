"""Greedy non-maximum suppression, class-aware, vectorised with NumPy.

Class-aware NMS runs as one greedy pass: every box is shifted by ``class_id * offset`` (an offset
larger than any coordinate), so boxes of different classes can never overlap and only same-class
boxes suppress each other. IoU uses continuous coordinates (area = w * h, no ``+1``), like
torchvision's ``nms``. Each loop iteration keeps the best remaining box and drops, in one
vectorised step, every remaining box that overlaps it by more than the threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["batched_nms", "nms"]


def nms(
    boxes: npt.NDArray[np.floating[Any]],
    scores: npt.NDArray[np.floating[Any]],
    iou_threshold: float,
    max_keep: int | None = None,
) -> npt.NDArray[np.intp]:
    """Indices of the boxes kept by greedy NMS, best score first.

    ``boxes`` is (N, 4) xyxy, ``scores`` (N,) finite. A box is suppressed when its IoU with an
    already kept box is strictly greater than ``iou_threshold``. ``max_keep`` stops early once
    that many boxes are kept.
    """
    n = int(scores.shape[0])
    if n == 0:
        return np.zeros((0,), dtype=np.intp)
    limit = n if max_keep is None else max(0, min(n, max_keep))
    # float64 for the IoU arithmetic so the class offset cannot eat coordinate precision
    x1 = boxes[:, 0].astype(np.float64)
    y1 = boxes[:, 1].astype(np.float64)
    x2 = boxes[:, 2].astype(np.float64)
    y2 = boxes[:, 3].astype(np.float64)
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0 and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if rest.size == 0:
            break
        iw = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        ih = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def batched_nms(
    boxes: npt.NDArray[np.floating[Any]],
    scores: npt.NDArray[np.floating[Any]],
    class_ids: npt.NDArray[np.int32],
    iou_threshold: float,
    max_keep: int | None = None,
) -> npt.NDArray[np.intp]:
    """Class-aware NMS: only boxes of the same class suppress each other.

    Returns the kept indices, best score first (at most ``max_keep``).
    """
    if scores.shape[0] == 0:
        return np.zeros((0,), dtype=np.intp)
    lo = float(boxes.min())
    hi = float(boxes.max())
    offset = (hi - lo) + 1.0
    shifted = boxes.astype(np.float64) - lo
    shifted += (class_ids.astype(np.float64) * offset)[:, None]
    return nms(shifted, scores, iou_threshold, max_keep)
