"""Class-aware NMS: hand-checked cases and agreement with a plain per-class reference."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.vision.nms import batched_nms, nms


def _boxes(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float) -> set[int]:
    """Greedy NMS written the slow obvious way: per class, best first, pairwise IoU."""
    kept: set[int] = set()
    for c in np.unique(classes):
        members = sorted(np.flatnonzero(classes == c), key=lambda i: (-scores[i], i))
        chosen: list[int] = []
        for i in members:
            if all(_iou(boxes[i], boxes[j]) <= thr for j in chosen):
                chosen.append(int(i))
        kept.update(chosen)
    return kept


def test_overlapping_same_class_keeps_the_best() -> None:
    boxes = _boxes((0, 0, 10, 10), (1, 1, 11, 11), (50, 50, 60, 60))
    scores = np.array([0.6, 0.9, 0.5], dtype=np.float32)
    keep = batched_nms(boxes, scores, np.zeros(3, np.int32), 0.45)
    assert keep.tolist() == [1, 2]


def test_overlapping_boxes_of_different_classes_both_survive() -> None:
    boxes = _boxes((0, 0, 10, 10), (0, 0, 10, 10))
    scores = np.array([0.9, 0.8], dtype=np.float32)
    keep = batched_nms(boxes, scores, np.array([3, 7], np.int32), 0.45)
    assert keep.tolist() == [0, 1]
    # the same pair within one class: only the best remains
    assert batched_nms(boxes, scores, np.array([3, 3], np.int32), 0.45).tolist() == [0]


def test_iou_equal_to_threshold_is_kept_above_is_suppressed() -> None:
    # IoU of (0,0,10,10) and (5,0,15,10) = 50 / 150 = 1/3
    boxes = _boxes((0, 0, 10, 10), (5, 0, 15, 10))
    scores = np.array([0.9, 0.8], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.3).tolist() == [0]


def test_max_keep_returns_best_first() -> None:
    boxes = _boxes(*[(i * 20, 0, i * 20 + 10, 10) for i in range(6)])
    scores = np.array([0.1, 0.6, 0.3, 0.9, 0.2, 0.5], dtype=np.float32)
    keep = batched_nms(boxes, scores, np.zeros(6, np.int32), 0.5, max_keep=3)
    assert keep.tolist() == [3, 1, 5]


def test_empty_input() -> None:
    empty = np.zeros((0, 4), np.float32)
    assert batched_nms(empty, np.zeros(0, np.float32), np.zeros(0, np.int32), 0.5).size == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.45, 0.6])
def test_matches_per_class_reference(seed: int, thr: float) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(5, 120, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    classes = rng.integers(0, 6, n).astype(np.int32)
    keep = batched_nms(boxes, scores, classes, thr)
    assert set(keep.tolist()) == _reference(boxes, scores, classes, thr)
    assert np.all(np.diff(scores[keep]) <= 0)  # best first
