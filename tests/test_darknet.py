"""The classic darknet test images through yolox_nano_416 with the agent's own preprocessing,
engine and decoder: every class EXPECTED.json lists is found, nothing on the painting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from pipelines.vision.decoders import DecodeParams
from tools.coco_eval import Detector, open_store

PARAMS = DecodeParams(score_threshold=0.3, nms_iou=0.45, max_detections=100)


@pytest.fixture(scope="module")
def detector(models_dir: Path) -> Iterator[Detector]:
    with open_store() as store, Detector(store, "yolox_nano_416", threads=2) as opened:
        yield opened


def _expected(data_dir: Path) -> dict[str, list[str]]:
    raw = json.loads((data_dir / "darknet" / "EXPECTED.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _found(detector: Detector, path: Path) -> set[str]:
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert frame is not None, path
    det = detector.detect(frame, PARAMS)
    assert det.invalid == 0
    assert (det.width, det.height) == (frame.shape[1], frame.shape[0])
    return {detector.labels[int(c)] for c in det.class_ids}


def test_every_expected_class_is_found(detector: Detector, data_dir: Path) -> None:
    expected = _expected(data_dir)
    assert len(expected) == 7
    missing = {}
    for image, classes in expected.items():
        found = _found(detector, data_dir / "darknet" / image)
        lost = [c for c in classes if not set(c.split("|")) & found]
        if lost:
            missing[image] = (lost, sorted(found))
    assert not missing, missing


def test_nothing_on_the_painting(detector: Detector, data_dir: Path) -> None:
    assert _expected(data_dir)["scream.jpg"] == []
    assert _found(detector, data_dir / "darknet" / "scream.jpg") == set()


def test_dog_boxes_in_source_pixels(detector: Detector, data_dir: Path) -> None:
    """dog.jpg (768x576): the dog sits in the lower left, the bicycle across the middle."""
    frame = cv2.imread(str(data_dir / "darknet" / "dog.jpg"), cv2.IMREAD_COLOR)
    det = detector.detect(frame, PARAMS)
    labels = [detector.labels[int(c)] for c in det.class_ids]
    dog = det.boxes[labels.index("dog")]
    bike = det.boxes[labels.index("bicycle")]
    h, w = frame.shape[:2]
    assert dog[0] < w / 3  # left third
    assert dog[3] > h * 0.8  # reaching the bottom
    assert bike[2] - bike[0] > w / 3  # a wide box
    assert (det.boxes[:, [0, 2]] <= w).all()
    assert (det.boxes[:, [1, 3]] <= h).all()
