"""Detections of one frame: boxes in source pixels, scores and class ids, plus helpers.

Every decoder returns one ``Detections`` per frame. Boxes are ``xyxy`` float32 in the pixel
coordinates of the *source* frame (letterbox or resize already undone, clipped to the frame),
sorted by descending score. ``invalid`` counts candidates the decoder dropped because a score or
a box coordinate was NaN or infinite (a broken model or engine, reported rather than hidden).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipelines.errors import DecoderError

__all__ = ["Detections", "empty_detections"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Detections:
    """Detections of one frame (all arrays have the same length N)."""

    boxes: FloatArray
    """float32 (N, 4) ``x1, y1, x2, y2`` in source-frame pixels."""
    scores: FloatArray
    """float32 (N,) confidence in [0, 1]."""
    class_ids: IntArray
    """int32 (N,) index into the model's class list."""
    width: int
    """Source frame width (pixels) the boxes refer to."""
    height: int
    """Source frame height (pixels) the boxes refer to."""
    invalid: int = 0
    """Candidates dropped for a NaN/inf score or box."""

    def __post_init__(self) -> None:
        n = self.scores.shape[0]
        if self.boxes.shape != (n, 4) or self.class_ids.shape != (n,):
            msg = (
                f"Detections arrays disagree: boxes {self.boxes.shape}, scores "
                f"{self.scores.shape}, class_ids {self.class_ids.shape}"
            )
            raise DecoderError(msg)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def box_norm(self) -> FloatArray:
        """Boxes divided by the frame size: ``x / width``, ``y / height`` in [0, 1]."""
        scale = np.array(
            [self.width, self.height, self.width, self.height], dtype=np.float32
        ).reshape(1, 4)
        out: FloatArray = self.boxes / scale
        return out

    def counts(self, num_classes: int) -> npt.NDArray[np.int64]:
        """Number of detections per class id (length ``num_classes``)."""
        return np.bincount(self.class_ids, minlength=num_classes).astype(np.int64)

    def counts_by_label(self, labels: Sequence[str]) -> dict[str, int]:
        """``{label: count}`` for the classes present (ids outside ``labels`` appear as
        ``class_<id>``)."""
        ids, counts = np.unique(self.class_ids, return_counts=True)
        return {_label(labels, int(i)): int(c) for i, c in zip(ids, counts, strict=True)}

    def to_records(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """JSON-ready list: ``{class_id, label, score, box_xyxy, box_norm}`` per detection."""
        norm = self.box_norm()
        return [
            {
                "class_id": int(cid),
                "label": _label(labels, int(cid)),
                "score": round(float(score), 4),
                "box_xyxy": [round(float(v), 1) for v in box],
                "box_norm": [round(float(v), 5) for v in nbox],
            }
            for cid, score, box, nbox in zip(
                self.class_ids, self.scores, self.boxes, norm, strict=True
            )
        ]


def _label(labels: Sequence[str], class_id: int) -> str:
    if 0 <= class_id < len(labels):
        return labels[class_id]
    return f"class_{class_id}"


def empty_detections(width: int, height: int, invalid: int = 0) -> Detections:
    """No detections on a ``width`` x ``height`` frame."""
    return Detections(
        boxes=np.zeros((0, 4), dtype=np.float32),
        scores=np.zeros((0,), dtype=np.float32),
        class_ids=np.zeros((0,), dtype=np.int32),
        width=width,
        height=height,
        invalid=invalid,
    )
