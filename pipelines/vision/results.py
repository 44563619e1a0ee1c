"""The result message a vision pipeline publishes for every processed frame.

Topic ``vision/<pipeline>/detections``; the message is a JSON-ready dict, versioned by
``schema`` + ``schema_version`` (a consumer checks both; a field is only ever added within a
version, never renamed or removed)::

    {
      "schema": "edge-agent.vision.detections", "schema_version": 1,
      "pipeline": "street", "source": "file0", "frame_index": 42,
      "capture": {"wall_time": 1717171717.123, "monotonic": 5123.456},
      "frame": {"width": 640, "height": 272},
      "latency_ms": {"wait": .., "preprocess": .., "inference": .., "postprocess": ..,
                     "end_to_end": ..},
      "detections": [{"class_id": 0, "label": "person", "score": 0.91,
                      "box_xyxy": [x1, y1, x2, y2], "box_norm": [..]}],
      "counts": {"person": 3, "bicycle": 2},
      "invalid": 0,
      "fingerprint": "sha256:…",                       # only with `fingerprint = true`
      "snapshot": {"format": "jpeg", "quality": 85, "data_base64": "…"}   # only on demand
    }

``latency_ms``: ``wait`` is capture to the start of preprocessing (time queued),
``preprocess``/``inference``/``postprocess`` the stage times of the call that carried the frame,
``end_to_end`` capture to the moment the message was built. ``box_xyxy`` is in source pixels,
``box_norm`` the same box divided by the frame size. ``invalid`` counts candidates the decoder
dropped for NaN/inf values.

The fingerprint is the sha256 of the decoded frame (BGR, 8-bit, row-major, prefixed by
``"<height>x<width>x3:"``): decoding is deterministic, JPEG encoders are not across builds, so
a fingerprint of the pixels is what lets two devices agree that they saw the same frame.

``ResultMessage`` (pydantic) validates a message; pipelines build plain dicts with
``build_result`` (cheap) and tests/consumers validate them with ``ResultMessage``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import Field

from engines.configbase import StrictModel
from pipelines.errors import PipelineError
from pipelines.vision.detections import Detections

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "CaptureTime",
    "DetectionRecord",
    "FrameSize",
    "ResultMessage",
    "Snapshot",
    "build_result",
    "detections_topic",
    "encode_snapshot",
    "frame_fingerprint",
]

SCHEMA = "edge-agent.vision.detections"
SCHEMA_VERSION = 1
LATENCY_KEYS = ("wait", "preprocess", "inference", "postprocess", "end_to_end")


def detections_topic(pipeline: str) -> str:
    """The relative topic of a pipeline's detections."""
    return f"vision/{pipeline}/detections"


def frame_fingerprint(image: npt.NDArray[np.uint8]) -> str:
    """``sha256:<hex>`` of a decoded frame's pixels (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(f"{image.shape[0]}x{image.shape[1]}x{image.shape[2]}:".encode())
    digest.update(np.ascontiguousarray(image).data)
    return "sha256:" + digest.hexdigest()


def encode_snapshot(image: npt.NDArray[np.uint8], quality: int) -> dict[str, Any]:
    """The ``snapshot`` field: the frame as a base64 JPEG."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise PipelineError(f"JPEG encoding of a {image.shape} frame failed")
    return {
        "format": "jpeg",
        "quality": int(quality),
        "data_base64": base64.b64encode(buffer.tobytes()).decode("ascii"),
    }


def build_result(
    *,
    pipeline: str,
    source: str,
    frame_index: int,
    wall_time: float,
    monotonic: float,
    detections: Detections,
    labels: Sequence[str],
    latency_s: Mapping[str, float],
    fingerprint: str | None = None,
    snapshot: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One result message (plain JSON-ready dict, see the module docstring)."""
    message: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "pipeline": pipeline,
        "source": source,
        "frame_index": frame_index,
        "capture": {"wall_time": round(wall_time, 6), "monotonic": round(monotonic, 6)},
        "frame": {"width": detections.width, "height": detections.height},
        "latency_ms": {k: round(latency_s[k] * 1e3, 3) for k in LATENCY_KEYS if k in latency_s},
        "detections": detections.to_records(labels),
        "counts": detections.counts_by_label(labels),
        "invalid": detections.invalid,
    }
    if fingerprint is not None:
        message["fingerprint"] = fingerprint
    if snapshot is not None:
        message["snapshot"] = dict(snapshot)
    return message


# -- schema (validation) -------------------------------------------------------------------


class CaptureTime(StrictModel):
    wall_time: float = Field(description="Capture time, seconds since the Unix epoch.")
    monotonic: float = Field(description="Capture time on the agent's monotonic clock (s).")


class FrameSize(StrictModel):
    width: int = Field(gt=0, description="Source frame width in pixels.")
    height: int = Field(gt=0, description="Source frame height in pixels.")


class Latency(StrictModel):
    wait: float = Field(ge=0, description="Capture to start of preprocessing (ms).")
    preprocess: float = Field(ge=0, description="Preprocessing of the call's batch (ms).")
    inference: float = Field(ge=0, description="Engine call (submit to collect) (ms).")
    postprocess: float = Field(ge=0, description="Decoding + NMS of the call's batch (ms).")
    end_to_end: float = Field(ge=0, description="Capture to result (ms).")


class DetectionRecord(StrictModel):
    class_id: int = Field(ge=0, description="Index into the model's class list.")
    label: str = Field(description="Class label.")
    score: float = Field(ge=0, le=1, description="Confidence.")
    box_xyxy: tuple[float, float, float, float] = Field(
        description="Box corners x1, y1, x2, y2 in source pixels."
    )
    box_norm: tuple[float, float, float, float] = Field(
        description="The box divided by the frame width/height (0..1)."
    )


class Snapshot(StrictModel):
    format: Literal["jpeg"] = Field(description="Image format.")
    quality: int = Field(ge=1, le=100, description="JPEG quality.")
    data_base64: str = Field(min_length=1, description="The encoded image, base64.")


class ResultMessage(StrictModel):
    """Schema of a detections message (version 1)."""

    schema_: Literal["edge-agent.vision.detections"] = Field(
        alias="schema", description="Message kind."
    )
    schema_version: Literal[1] = Field(description="Schema version.")
    pipeline: str = Field(description="Pipeline name.")
    source: str = Field(description="Source id within the pipeline.")
    frame_index: int = Field(ge=0, description="Index of the frame in its source's sequence.")
    capture: CaptureTime = Field(description="When the frame was captured.")
    frame: FrameSize = Field(description="Source frame size.")
    latency_ms: Latency = Field(description="Latency per stage and end to end.")
    detections: list[DetectionRecord] = Field(description="Detections, best first.")
    counts: dict[str, int] = Field(description="Number of detections per label.")
    invalid: int = Field(ge=0, description="Candidates dropped for NaN/inf values.")
    fingerprint: str | None = Field(
        default=None, pattern=r"^sha256:[0-9a-f]{64}$", description="Frame pixel fingerprint."
    )
    snapshot: Snapshot | None = Field(default=None, description="JPEG snapshot on demand.")
