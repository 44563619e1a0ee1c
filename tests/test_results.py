"""The result message: schema, JSON round trip, fingerprint and snapshot on real video frames."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from pipelines.vision.detections import Detections, empty_detections
from pipelines.vision.results import (
    SCHEMA,
    SCHEMA_VERSION,
    ResultMessage,
    build_result,
    detections_topic,
    encode_snapshot,
    frame_fingerprint,
)

LABELS = ("person", "bicycle", "car")
LATENCY = {
    "wait": 0.002,
    "preprocess": 0.001,
    "inference": 0.015,
    "postprocess": 0.0007,
    "end_to_end": 0.021,
}


@pytest.fixture(scope="module")
def frames(data_dir: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(data_dir / "videos" / "bikes.mp4"))
    out = []
    try:
        for _ in range(3):
            ok, image = capture.read()
            assert ok
            out.append(image)
    finally:
        capture.release()
    return out


def _detections() -> Detections:
    return Detections(
        boxes=np.array([[10, 20, 110, 220], [300, 0, 640, 272], [5, 5, 15, 25]], np.float32),
        scores=np.array([0.9, 0.8, 0.4], np.float32),
        class_ids=np.array([0, 2, 0], np.int32),
        width=640,
        height=272,
        invalid=1,
    )


def _message(**extra: Any) -> dict[str, Any]:
    return build_result(
        pipeline="street",
        source="cam0",
        frame_index=41,
        wall_time=1_700_000_000.25,
        monotonic=1234.5,
        detections=_detections(),
        labels=LABELS,
        latency_s=LATENCY,
        **extra,
    )


def test_message_carries_every_field_and_validates() -> None:
    message = _message()
    assert message["schema"] == SCHEMA
    assert message["schema_version"] == SCHEMA_VERSION == 1
    assert message["capture"] == {"wall_time": 1_700_000_000.25, "monotonic": 1234.5}
    assert message["frame"] == {"width": 640, "height": 272}
    assert message["latency_ms"] == {
        "wait": 2.0,
        "preprocess": 1.0,
        "inference": 15.0,
        "postprocess": 0.7,
        "end_to_end": 21.0,
    }
    assert message["counts"] == {"person": 2, "car": 1}
    assert message["invalid"] == 1
    first = message["detections"][0]
    assert first == {
        "class_id": 0,
        "label": "person",
        "score": 0.9,
        "box_xyxy": [10.0, 20.0, 110.0, 220.0],
        "box_norm": [
            round(10 / 640, 5),
            round(20 / 272, 5),
            round(110 / 640, 5),
            round(220 / 272, 5),
        ],
    }
    assert "fingerprint" not in message  # off by default
    assert "snapshot" not in message
    parsed = ResultMessage.model_validate(json.loads(json.dumps(message)))
    assert parsed.frame_index == 41
    assert [d.label for d in parsed.detections] == ["person", "car", "person"]


def test_empty_frame_has_no_detections_and_no_counts() -> None:
    message = build_result(
        pipeline="p",
        source="s",
        frame_index=0,
        wall_time=1.0,
        monotonic=1.0,
        detections=empty_detections(320, 240),
        labels=LABELS,
        latency_s=LATENCY,
    )
    assert message["detections"] == []
    assert message["counts"] == {}
    ResultMessage.model_validate(message)


def test_topic_names_the_pipeline() -> None:
    assert detections_topic("street") == "vision/street/detections"


def test_fingerprint_is_sha256_of_the_decoded_pixels(frames: list[np.ndarray]) -> None:
    image = frames[0]
    expected = hashlib.sha256(b"272x640x3:" + image.tobytes()).hexdigest()
    assert frame_fingerprint(image) == f"sha256:{expected}"
    assert frame_fingerprint(image.copy()) == frame_fingerprint(image)
    assert frame_fingerprint(frames[1]) != frame_fingerprint(image)
    # a non-contiguous view of the same pixels has the same fingerprint
    assert frame_fingerprint(np.asfortranarray(image)) == frame_fingerprint(image)
    message = _message(fingerprint=frame_fingerprint(image))
    assert ResultMessage.model_validate(message).fingerprint == f"sha256:{expected}"


def test_snapshot_is_a_decodable_jpeg_of_the_frame(frames: list[np.ndarray]) -> None:
    image = frames[2]
    snapshot = encode_snapshot(image, 90)
    assert snapshot["format"] == "jpeg"
    assert snapshot["quality"] == 90
    jpeg = base64.b64decode(snapshot["data_base64"])
    assert jpeg[:3] == b"\xff\xd8\xff"
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == image.shape
    # lossy but close: mean absolute error of a quality-90 JPEG stays small
    assert float(np.abs(decoded.astype(np.int16) - image.astype(np.int16)).mean()) < 4.0
    ResultMessage.model_validate(_message(snapshot=snapshot))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"schema": "other"}, "schema"),
        ({"frame_index": -1}, "frame_index"),
        ({"fingerprint": "md5:abc"}, "fingerprint"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_schema_rejects_foreign_or_broken_messages(change: dict[str, Any], error: str) -> None:
    message = _message()
    message.update(change)
    with pytest.raises(ValidationError, match=error):
        ResultMessage.model_validate(message)


def test_schema_rejects_a_message_missing_its_latency() -> None:
    message = _message()
    del message["latency_ms"]["end_to_end"]
    with pytest.raises(ValidationError, match="end_to_end"):
        ResultMessage.model_validate(message)
