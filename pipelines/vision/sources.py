"""Frame sources: each runs its own capture thread and stamps every frame with its own clock.

- ``file``: a video decoded with OpenCV/FFmpeg, optionally looped and paced at its frame rate.
  A missing or undecodable file raises ``SourceOpenError`` from ``check()`` (called at start).
- ``stream``: RTSP/HTTP through ``cv2.VideoCapture``; after a drop it is reopened with jittered
  exponential backoff and each successful reopen is counted as a reconnect.
- ``v4l2``: ``/dev/videoN`` with the requested width/height/fps/FourCC; an absent device is
  reported (one clear line in status) and retried with backoff.
- ``gstreamer``: a launch string ending in ``appsink``; only when OpenCV was built with
  GStreamer, otherwise ``check()`` fails with a clear error.

Failures of a live source never raise out of its thread: they are logged, shown in ``status()``
and retried, so one dead camera never stops another source or another pipeline. Frames with
zero size are dropped and counted. A source hands frames to a ``FrameHub`` (see below), which
applies the pipeline's frame policy.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import cv2
import numpy as np
import numpy.typing as npt

from pipelines.base import Heartbeats
from pipelines.config import (
    FileSourceConfig,
    GStreamerSourceConfig,
    SourceConfig,
    StreamSourceConfig,
    V4l2SourceConfig,
)
from pipelines.errors import PipelineConfigError, SourceOpenError
from pipelines.vision.metrics import Counters, RateMeter

__all__ = [
    "Capture",
    "CaptureLink",
    "FileSource",
    "Frame",
    "FrameHub",
    "FrameSource",
    "GStreamerSource",
    "StreamSource",
    "V4l2Source",
    "build_source",
    "gstreamer_available",
]

_log = logging.getLogger(__name__)

Policy = Literal["latest", "all"]


@dataclass(frozen=True)
class Frame:
    """One captured frame (BGR, HxWx3 uint8) with the capture clock of its source."""

    source: str
    index: int
    image: npt.NDArray[np.uint8]
    wall_time: float
    monotonic: float


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` a source uses."""

    def read(self) -> tuple[bool, Any]: ...

    def get(self, prop: int) -> float: ...

    def release(self) -> None: ...


def gstreamer_available() -> bool:
    """True when this OpenCV build has the GStreamer video I/O backend."""
    return re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()) is not None


class FrameHub:
    """Per-source frame slots shared by the capture threads and the preprocessing stage.

    Under ``latest`` each source keeps one frame: a new frame replaces an unread one, which is
    counted as a ``stale`` drop. Under ``all`` each source has a bounded queue and ``put``
    blocks while it is full (back-pressure to the capture thread). ``take`` gathers up to a
    batch of frames round-robin across sources.
    """

    def __init__(self, sources: Sequence[str], policy: Policy, queue_size: int) -> None:
        self._names = list(sources)
        self._policy = policy
        self._capacity = 1 if policy == "latest" else queue_size
        self._slots: list[deque[Frame]] = [deque() for _ in self._names]
        self._stale = [0] * len(self._names)
        self._cond = threading.Condition()
        self._next = 0
        self._closed = False

    def put(self, slot: int, frame: Frame, timeout_s: float) -> bool:
        """Offer ``frame``; False if it could not be queued within ``timeout_s`` (``all``)."""
        with self._cond:
            queue = self._slots[slot]
            if self._policy == "latest":
                if queue:
                    queue.popleft()
                    self._stale[slot] += 1
            elif len(queue) >= self._capacity:
                deadline = time.monotonic() + timeout_s
                while len(queue) >= self._capacity and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            if self._closed:
                return False
            queue.append(frame)
            self._cond.notify_all()
            return True

    def take(self, max_n: int, timeout_s: float, max_wait_s: float) -> list[Frame]:
        """Up to ``max_n`` frames: wait ``timeout_s`` for a first one, then up to
        ``max_wait_s`` more for the batch to fill. Empty on timeout or close."""
        out: list[Frame] = []
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._pending(), timeout_s):
                return out
            deadline = time.monotonic() + max_wait_s
            while True:
                self._gather(out, max_n)
                if len(out) >= max_n or self._closed:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if out:
                self._cond.notify_all()
        return out

    def _pending(self) -> bool:
        return any(self._slots)

    def _gather(self, out: list[Frame], max_n: int) -> None:
        n = len(self._slots)
        progressed = True
        while len(out) < max_n and progressed:
            progressed = False
            for k in range(n):
                if len(out) >= max_n:
                    break
                i = (self._next + k) % n
                if self._slots[i]:
                    out.append(self._slots[i].popleft())
                    progressed = True
            self._next = (self._next + 1) % n

    def stale(self, slot: int) -> int:
        with self._cond:
            return self._stale[slot]

    def depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._slots)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class CaptureLink:
    """What a capture thread needs from its pipeline."""

    hub: FrameHub
    slot: int
    stop: threading.Event
    heartbeats: Heartbeats
    worker: str


SourceState = Literal[
    "created", "opening", "running", "retrying", "reconnecting", "finished", "failed", "stopped"
]


class FrameSource(abc.ABC):
    """A capture thread around one OpenCV capture. Subclasses say how to open it."""

    kind: str = "source"
    live: bool = True

    def __init__(self, name: str, config: SourceConfig, *, seed: int | None = None) -> None:
        self.name = name
        self.config = config
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not cryptography
        self._lock = threading.Lock()
        self._state: SourceState = "created"
        self._last_error: str | None = None
        self._counters = Counters(
            (
                "frames_read",
                "frames_delivered",
                "zero_size",
                "rate_limited",
                "reconnects",
                "open_failures",
                "lost",
                "loops",
            )
        )
        self._fps = RateMeter()
        self._size: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._capture: Capture | None = None
        self._index = 0
        self._last_delivery = -math.inf

    # -- to implement ---------------------------------------------------------------------

    @abc.abstractmethod
    def _open(self) -> Capture:
        """Open the capture or raise ``SourceOpenError`` naming the device/file and the fix."""

    def describe(self) -> str:
        return self.name

    def max_block_s(self) -> float:
        """Longest a single open or read may block (the capture worker's heartbeat must allow
        for it)."""
        return 0.0

    # -- lifecycle ------------------------------------------------------------------------

    def check(self) -> None:  # noqa: B027 - optional hook, most sources need no check
        """Fail fast on what can never work (called at pipeline start). Live sources only
        check static preconditions; their open failures are retried by the thread."""

    def start(self, link: CaptureLink, pin: Callable[[], None]) -> None:
        """Start the capture thread; it pins itself with ``pin`` first."""
        self._thread = threading.Thread(
            target=self._run, args=(link, pin), name=link.worker, daemon=True
        )
        self._thread.start()

    def release(self) -> None:
        """Free a capture opened by ``check()`` when the thread never started."""
        if self._thread is None and self._capture is not None:
            self._capture.release()
            self._capture = None

    def join(self, timeout_s: float) -> bool:
        if self._thread is None:
            self.release()
            return True
        self._thread.join(max(0.0, timeout_s))
        return not self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return self._state in ("finished", "failed", "stopped")

    def status(self) -> dict[str, Any]:
        with self._lock:
            state, error, size = self._state, self._last_error, self._size
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.kind,
            "target": self.describe(),
            "state": state,
            "fps": round(self._fps.rate(), 2),
            "last_error": error,
            "width": size[0] if size else None,
            "height": size[1] if size else None,
        }
        out.update(self._counters.snapshot())
        return out

    # -- capture loop ---------------------------------------------------------------------

    def _set_state(self, state: SourceState, error: str | None = None) -> None:
        with self._lock:
            self._state = state
            if error is not None:
                self._last_error = error

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.retry_max_s, self.config.retry_initial_s * (2.0**attempt))
        return float(base * self._rng.uniform(0.75, 1.25))

    def _run(self, link: CaptureLink, pin: Callable[[], None]) -> None:
        try:
            pin()
            self._loop(link)
        except Exception as exc:  # noqa: BLE001 - thread top level: report in status, never die silently
            _log.exception("source %s: capture thread failed", self.name)
            self._set_state("failed", f"{type(exc).__name__}: {exc}")
        finally:
            if self._capture is not None:
                self._capture.release()
                self._capture = None
            if self._state not in ("finished", "failed"):
                self._set_state("stopped")
            # a thread that ended stops promising beats; only a hung one goes stale
            link.heartbeats.unregister(link.worker)

    def _loop(self, link: CaptureLink) -> None:
        attempt = 0
        ever_opened = self._capture is not None
        while not link.stop.is_set():
            link.heartbeats.beat(link.worker)
            if self._capture is None:
                self._set_state("reconnecting" if ever_opened else "opening")
                try:
                    self._capture = self._open()
                except SourceOpenError as exc:
                    self._counters.add("open_failures")
                    delay = self._backoff(attempt)
                    attempt += 1
                    self._set_state("retrying", str(exc))
                    _log.warning("source %s: %s (retry in %.1f s)", self.name, exc, delay)
                    self._sleep(delay, link)
                    continue
                if ever_opened:
                    self._counters.add("reconnects")
                    _log.info("source %s: reconnected", self.name)
                ever_opened = True
                attempt = 0
            if self._state != "running":
                self._set_state("running")
            self._before_read(link)
            ok, image = self._capture.read()
            if link.stop.is_set():
                break
            if not ok:
                if not self._on_end(link, attempt):
                    return
                attempt += 1
                continue
            self._deliver(image, link)

    def _on_end(self, link: CaptureLink, attempt: int) -> bool:
        """A read failed: live sources reconnect after a backoff; returns False to end."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._counters.add("lost")
        delay = self._backoff(attempt)
        message = f"{self.kind} source {self.describe()} stopped delivering frames"
        self._set_state("reconnecting", message)
        _log.warning("source %s: %s (reconnect in %.1f s)", self.name, message, delay)
        self._sleep(delay, link)
        return True

    def _sleep(self, seconds: float, link: CaptureLink) -> None:
        """Wait without missing heartbeats (wakes at least once a second)."""
        deadline = time.monotonic() + seconds
        while not link.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            link.stop.wait(min(remaining, 1.0))
            link.heartbeats.beat(link.worker)

    def _before_read(self, link: CaptureLink) -> None:  # noqa: B027 - optional hook
        """Called before each read; a file source waits here to pace itself."""

    def _rate_ok(self) -> bool:
        """Live sources under ``fps_cap``: False (drop, counted) when a frame comes too soon."""
        cap = self.config.fps_cap
        if cap is None or not self.live:
            return True
        if time.monotonic() >= self._last_delivery + 1.0 / cap:
            return True
        self._counters.add("rate_limited")
        return False

    def _deliver(self, image: Any, link: CaptureLink) -> None:
        wall, mono = time.time(), time.monotonic()
        self._counters.add("frames_read")
        index = self._index
        self._index += 1
        if not isinstance(image, np.ndarray) or image.size == 0 or image.ndim < 2:
            self._counters.add("zero_size")
            return
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if not self._rate_ok():
            return
        self._last_delivery = time.monotonic()
        with self._lock:
            self._size = (int(image.shape[1]), int(image.shape[0]))
        frame = Frame(self.name, index, image, wall, mono)
        while not link.stop.is_set():
            if link.hub.put(link.slot, frame, timeout_s=0.5):
                self._counters.add("frames_delivered")
                self._fps.mark()
                return
            link.heartbeats.beat(link.worker)


class FileSource(FrameSource):
    kind = "file"
    live = False

    def __init__(
        self,
        name: str,
        config: FileSourceConfig,
        resolve: Callable[[str], Path],
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(name, config, seed=seed)
        self._resolve = resolve
        self._path: Path | None = None
        self._frame_period = 0.0
        self._next_due = 0.0

    @property
    def file_config(self) -> FileSourceConfig:
        """``self.config`` as this kind's settings (``update()`` may replace ``config``)."""
        return cast("FileSourceConfig", self.config)

    def describe(self) -> str:
        return str(self._path or self.file_config.path)

    def check(self) -> None:
        """Resolve and open the file and decode its first frame; ``SourceOpenError`` if not."""
        self._path = self._locate()
        probe = self._open()
        try:
            ok, first = probe.read()
        finally:
            probe.release()
        if not ok or first is None or first.size == 0:
            raise SourceOpenError(
                f"video file {self._path} opened but no frame decodes: the file is empty, "
                "truncated or in an unsupported codec"
            )
        self._capture = self._open()

    def _locate(self) -> Path:
        raw = self.file_config.path
        path = Path(raw).expanduser()
        if path.is_file():
            return path
        try:
            found = self._resolve(raw)
        except Exception as exc:
            raise SourceOpenError(
                f"video file {raw!r} not found (not a file, and not in the data search path: "
                f"{exc}): fix the source `path` or set EDGE_AGENT_DATA_PATH"
            ) from exc
        if not found.is_file():
            raise SourceOpenError(f"video file {raw!r} resolved to {found}, which is not a file")
        return found

    def _open(self) -> Capture:
        path = self._path if self._path is not None else self._locate()
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            capture.release()
            raise SourceOpenError(
                f"video file {path} cannot be opened by OpenCV/FFmpeg: is it a video in a "
                "supported container/codec (mp4/h264, mkv, avi, ...)?"
            )
        fps = capture.get(cv2.CAP_PROP_FPS)
        self._frame_period = 1.0 / fps if fps and fps > 0 and math.isfinite(fps) else 0.0
        return capture

    def _on_end(self, link: CaptureLink, attempt: int) -> bool:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        if not self.file_config.loop:
            self._set_state("finished")
            return False
        self._counters.add("loops")
        try:
            self._capture = self._open()
        except SourceOpenError as exc:
            # the file went away or changed under us: retry like a live source
            self._counters.add("open_failures")
            self._set_state("retrying", str(exc))
            self._sleep(self._backoff(attempt), link)
        return True

    def _before_read(self, link: CaptureLink) -> None:
        """Pace like a camera: the file's own rate (``realtime``) and/or ``fps_cap``. The frame
        is read (and stamped) when it is due, so its capture time is its delivery time."""
        now = time.monotonic()
        due = now
        if self.file_config.realtime and self._frame_period > 0:
            if self._next_due == 0.0 or now - self._next_due > 1.0:
                self._next_due = now  # start, or fell far behind: resynchronise
            due = self._next_due
            self._next_due += self._frame_period
        cap = self.config.fps_cap
        if cap is not None:
            due = max(due, self._last_delivery + 1.0 / cap)
        if due > now:
            self._sleep(due - now, link)


class StreamSource(FrameSource):
    kind = "stream"

    def __init__(self, name: str, config: StreamSourceConfig, *, seed: int | None = None) -> None:
        super().__init__(name, config, seed=seed)

    def max_block_s(self) -> float:
        return max(self.stream_config.open_timeout_s, self.stream_config.read_timeout_s)

    @property
    def stream_config(self) -> StreamSourceConfig:
        """``self.config`` as this kind's settings (``update()`` may replace ``config``)."""
        return cast("StreamSourceConfig", self.config)

    def describe(self) -> str:
        # never show credentials embedded in the URL
        return re.sub(r"//[^/@]*@", "//***@", self.stream_config.url)

    def _open(self) -> Capture:
        cfg = self.stream_config
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(cfg.read_timeout_s * 1000),
        ]
        capture = cv2.VideoCapture(cfg.url, cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            raise SourceOpenError(
                f"stream {self.describe()} cannot be opened (unreachable, refused or not a "
                "video): check the URL and that the camera/server is up"
            )
        return capture


class V4l2Source(FrameSource):
    kind = "v4l2"

    def __init__(self, name: str, config: V4l2SourceConfig, *, seed: int | None = None) -> None:
        super().__init__(name, config, seed=seed)
        self.negotiated: dict[str, Any] = {}

    @property
    def v4l2_config(self) -> V4l2SourceConfig:
        """``self.config`` as this kind's settings (``update()`` may replace ``config``)."""
        return cast("V4l2SourceConfig", self.config)

    def describe(self) -> str:
        return self.v4l2_config.device

    def _open(self) -> Capture:
        cfg = self.v4l2_config
        if not Path(cfg.device).exists():
            raise SourceOpenError(
                f"V4L2 device {cfg.device} does not exist: connect the camera or fix `device` "
                "(list cameras with `ls /dev/video*`)"
            )
        if not os.access(cfg.device, os.R_OK | os.W_OK):
            raise SourceOpenError(
                f"V4L2 device {cfg.device} is not accessible: add the agent's user to the "
                "`video` group"
            )
        capture = cv2.VideoCapture(cfg.device, cv2.CAP_V4L2)
        if not capture.isOpened():
            capture.release()
            raise SourceOpenError(
                f"V4L2 device {cfg.device} exists but cannot be opened as a capture device "
                "(busy, or not a video capture node)"
            )
        if cfg.fourcc is not None:
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*cfg.fourcc))
        if cfg.width is not None:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        if cfg.height is not None:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        if cfg.fps is not None:
            capture.set(cv2.CAP_PROP_FPS, cfg.fps)
        self.negotiated = {
            "width": int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "fps": capture.get(cv2.CAP_PROP_FPS),
        }
        return capture

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["negotiated"] = dict(self.negotiated)
        return out


class GStreamerSource(FrameSource):
    kind = "gstreamer"

    def __init__(
        self, name: str, config: GStreamerSourceConfig, *, seed: int | None = None
    ) -> None:
        super().__init__(name, config, seed=seed)

    @property
    def gst_config(self) -> GStreamerSourceConfig:
        """``self.config`` as this kind's settings (``update()`` may replace ``config``)."""
        return cast("GStreamerSourceConfig", self.config)

    def describe(self) -> str:
        return self.gst_config.pipeline.split("!")[0].strip()

    def check(self) -> None:
        if not gstreamer_available():
            raise SourceOpenError(
                f"source {self.name}: this OpenCV ({cv2.__version__}) was built without "
                "GStreamer (cv2.getBuildInformation() shows 'GStreamer: NO'): use a v4l2/stream "
                "source, or an OpenCV built with GStreamer (e.g. the distribution's python3-opencv)"
            )

    def _open(self) -> Capture:
        capture = cv2.VideoCapture(self.gst_config.pipeline, cv2.CAP_GSTREAMER)
        if not capture.isOpened():
            capture.release()
            raise SourceOpenError(
                f"GStreamer pipeline starting with {self.describe()!r} did not start: run it "
                "with gst-launch-1.0 to see why (camera missing or caps not negotiated)"
            )
        return capture


def build_source(
    name: str, config: SourceConfig, resolve: Callable[[str], Path], *, seed: int | None = None
) -> FrameSource:
    """The source object for one config entry."""
    if isinstance(config, FileSourceConfig):
        return FileSource(name, config, resolve, seed=seed)
    if isinstance(config, StreamSourceConfig):
        return StreamSource(name, config, seed=seed)
    if isinstance(config, V4l2SourceConfig):
        return V4l2Source(name, config, seed=seed)
    if isinstance(config, GStreamerSourceConfig):
        return GStreamerSource(name, config, seed=seed)
    raise PipelineConfigError(f"source {name}: unknown source type {config!r}")  # pragma: no cover
