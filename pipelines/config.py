"""Pipeline configuration: a discriminated union on ``type`` (``vision``, ``llm``).

A vision pipeline reads frames from one or more sources (a discriminated union on the source's
``type``: ``file``, ``stream``, ``v4l2``, ``gstreamer``), runs them through one detector and
publishes one result per processed frame on ``vision/<name>/detections``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from engines.config import EngineConfig
from engines.configbase import StrictModel
from pipelines.base import NAME_PATTERN
from pipelines.llm.config import LlmPipelineConfig

__all__ = [
    "FileSourceConfig",
    "GStreamerSourceConfig",
    "LlmPipelineConfig",
    "PipelineConfig",
    "SourceConfig",
    "StageNames",
    "StreamSourceConfig",
    "V4l2SourceConfig",
    "VisionPipelineConfig",
]


class _SourceBase(StrictModel):
    name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="Source id used in results and status; default: `<type><index>` "
        "(e.g. `file0`). Must be unique within the pipeline.",
    )
    fps_cap: float | None = Field(
        default=None,
        gt=0,
        description="Hand at most this many frames per second to the pipeline: a file source "
        "sleeps between frames, a live source discards the excess (counted as `rate_limited`).",
    )
    retry_initial_s: float = Field(
        default=0.5,
        gt=0,
        description="First wait before reopening a source that failed or dropped; doubled on "
        "each further failure (with +/-25 % jitter) up to `retry_max_s`.",
    )
    retry_max_s: float = Field(
        default=30.0, gt=0, description="Longest wait between two reopen attempts."
    )


class FileSourceConfig(_SourceBase):
    type: Literal["file"] = Field(description="A video file decoded with OpenCV (FFmpeg).")
    path: str = Field(
        min_length=1,
        description="Path of the video, or a data name found through the data search path "
        "(`bikes-video`, `videos/bikes.mp4`). A missing or undecodable file fails at start.",
    )
    loop: bool = Field(
        default=False, description="Start again from the first frame at the end of the file."
    )
    realtime: bool = Field(
        default=False,
        description="Deliver frames at the file's own frame rate, like a camera, instead of as "
        "fast as they decode.",
    )


class StreamSourceConfig(_SourceBase):
    type: Literal["stream"] = Field(
        description="A network stream (RTSP, HTTP(S) MJPEG/MP4) opened with OpenCV (FFmpeg); "
        "reopened with backoff after a drop, each reconnect counted."
    )
    url: str = Field(
        pattern=r"^(rtsp|rtsps|http|https)://\S+$",
        description="Stream URL, e.g. `rtsp://camera.local:554/stream1`.",
    )
    open_timeout_s: float = Field(
        default=10.0, gt=0, description="Give up an open attempt after this long."
    )
    read_timeout_s: float = Field(
        default=5.0, gt=0, description="Treat the stream as dropped when no frame comes this long."
    )


class V4l2SourceConfig(_SourceBase):
    type: Literal["v4l2"] = Field(description="A V4L2 camera (USB/CSI on Linux).")
    device: str = Field(
        pattern=r"^/dev/video[0-9]+$", description="Device node, e.g. `/dev/video0`."
    )
    width: int | None = Field(default=None, gt=0, description="Requested frame width.")
    height: int | None = Field(default=None, gt=0, description="Requested frame height.")
    fps: float | None = Field(default=None, gt=0, description="Requested frame rate.")
    fourcc: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9 ]{4}$",
        description="Requested pixel format as a FourCC, e.g. `MJPG` or `YUYV`.",
    )


class GStreamerSourceConfig(_SourceBase):
    type: Literal["gstreamer"] = Field(
        description="A GStreamer pipeline ending in `appsink` (Jetson CSI: `nvarguscamerasrc`, "
        "Raspberry Pi: `libcamerasrc`); needs an OpenCV built with GStreamer."
    )
    pipeline: str = Field(
        pattern=r"appsink",
        description="GStreamer launch string producing BGR frames into an appsink, e.g. "
        "`nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink drop=true max-buffers=1`.",
    )


SourceConfig = Annotated[
    Union[  # noqa: UP007 - pydantic discriminated union
        FileSourceConfig, StreamSourceConfig, V4l2SourceConfig, GStreamerSourceConfig
    ],
    Field(discriminator="type", description="A frame source; selected by its `type` key."),
]


class StageNames(StrictModel):
    """Which entry of the agent's ``pinning.stages`` each worker thread pins itself to."""

    capture: str = Field(default="capture", description="Pinning stage of capture threads.")
    preprocess: str = Field(
        default="preprocess", description="Pinning stage of the preprocessing thread."
    )
    inference: str = Field(
        default="inference", description="Pinning stage of the inference thread."
    )
    postprocess: str = Field(
        default="postprocess", description="Pinning stage of the decoder/NMS thread."
    )
    sink: str = Field(
        default="reporting", description="Pinning stage of the thread that publishes results."
    )


class VisionPipelineConfig(StrictModel):
    type: Literal["vision"] = Field(description="Selects a vision (detection) pipeline.")
    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name used in topics.")
    model: str = Field(description="Model manifest name, e.g. `yolox_nano_416`.")
    engine: EngineConfig = Field(description="Engine that runs the model.")
    decoder: Literal["yolox", "detr", "nanodet", "yolov8", "yolov5"] | None = Field(
        default=None,
        description="Output decoder; default: the model manifest's `decoder`. A model whose "
        "outputs do not fit it fails at build, naming expected and actual shapes.",
    )
    sources: list[SourceConfig] = Field(
        min_length=1, description="Frame sources; frames of several sources share one engine."
    )
    policy: Literal["latest", "all"] = Field(
        default="latest",
        description="`latest`: real time, each source keeps only its newest frame and stale "
        "ones are dropped (counted); `all`: every frame is processed and a full queue blocks "
        "the source (back-pressure).",
    )
    source_queue_size: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Frames buffered per source under policy `all` (`latest` keeps one).",
    )
    stage_queue_size: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Items buffered between two stages (preprocess, inference, postprocess, sink).",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Frames per inference call; default: the model's batch dimension when "
        "fixed, else the number of sources. Frames of several sources are gathered up to this "
        "many within `batch_max_wait_ms`.",
    )
    batch_max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="How long a partial batch waits for more frames before it runs anyway.",
    )
    score_threshold: float = Field(
        default=0.3, ge=0.0, lt=1.0, description="Detections scoring below this are dropped."
    )
    nms_iou: float = Field(
        default=0.45,
        gt=0.0,
        le=1.0,
        description="Class-aware non-maximum suppression IoU threshold (DETR-style models do "
        "no NMS).",
    )
    max_detections: int = Field(
        default=100, ge=1, le=10_000, description="Most detections kept per frame (best first)."
    )
    classes: list[str | int] | None = Field(
        default=None,
        description="Class allow-list: labels (`person`) or class ids; null keeps all classes.",
    )
    max_frames: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many frames have been processed (the pipeline then reports "
        "state `finished`); null runs until stopped.",
    )
    fingerprint: bool = Field(
        default=False,
        description="Add a sha256 fingerprint of each frame's decoded pixels to its result.",
    )
    snapshot_quality: int = Field(
        default=85,
        ge=1,
        le=100,
        description="JPEG quality of snapshots taken on demand (`snapshot` command).",
    )
    heartbeat_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="Each worker thread promises the watchdog a beat at least this often.",
    )
    stages: StageNames = Field(
        default_factory=StageNames,
        description="Pinning stage of each worker thread (keys of `pinning.stages`).",
    )

    @model_validator(mode="after")
    def _unique_sources(self) -> VisionPipelineConfig:
        names = self.source_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def source_names(self) -> list[str]:
        """The id of each source: its ``name`` or ``<type><index>``."""
        return [s.name or f"{s.type}{i}" for i, s in enumerate(self.sources)]


PipelineConfig = Annotated[
    Union[VisionPipelineConfig, LlmPipelineConfig],  # noqa: UP007 - pydantic discriminated union
    Field(discriminator="type", description="A pipeline; selected by its `type` key."),
]
"""Every pipeline kind, by its ``type`` key (``vision``; ``llm``: see pipelines.llm.config)."""
