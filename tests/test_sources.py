"""Frame sources and the frame hub: real capture threads on the real sample video, a real closed
port, a real absent V4L2 node, this OpenCV's real GStreamer support (or its absence)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from vision_support import vision_config

from agent.health import Watchdog
from agent.notify import Notifier
from pipelines.config import (
    FileSourceConfig,
    GStreamerSourceConfig,
    StreamSourceConfig,
    V4l2SourceConfig,
)
from pipelines.errors import SourceOpenError
from pipelines.vision.sources import (
    Capture,
    CaptureLink,
    FileSource,
    Frame,
    FrameHub,
    FrameSource,
    GStreamerSource,
    StreamSource,
    V4l2Source,
    gstreamer_available,
)


def _frame(source: str, index: int) -> Frame:
    image = np.full((4, 6, 3), index % 255, dtype=np.uint8)
    return Frame(source, index, image, time.time(), time.monotonic())


def _resolver(data_dir: Path):  # type: ignore[no-untyped-def]
    def resolve(name: str) -> Path:
        candidate = data_dir / name
        if not candidate.is_file():
            raise SourceOpenError(f"{name!r} is not under {data_dir}")
        return candidate

    return resolve


class Running:
    """One source's capture thread feeding a hub, stopped and joined on exit."""

    def __init__(self, source: FrameSource, policy: str = "latest", queue_size: int = 4) -> None:
        self.source = source
        self.hub = FrameHub([source.name], policy, queue_size)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.watchdog = Watchdog(Notifier(None), None)
        self.watchdog.register("capture", 5.0)
        self.link = CaptureLink(self.hub, 0, self.stop, self.watchdog, "capture")

    def __enter__(self) -> Running:
        self.source.check()
        self.source.start(self.link, lambda: None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.hub.close()
        assert self.source.join(5.0), "capture thread did not stop"

    def wait(self, predicate: Any, timeout_s: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.source.status()
            if predicate(status):
                return status
            time.sleep(0.02)
        pytest.fail(f"condition not reached: {self.source.status()}")


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- FrameHub --------------------------------------------------------------------------------


def test_latest_hub_keeps_the_newest_frame_and_counts_stale_ones() -> None:
    hub = FrameHub(["a"], "latest", queue_size=8)
    for index in range(3):
        assert hub.put(0, _frame("a", index), timeout_s=0.1)
    frames = hub.take(4, timeout_s=0.1, max_wait_s=0.0)
    assert [f.index for f in frames] == [2]
    assert hub.stale(0) == 2
    assert hub.take(1, timeout_s=0.01, max_wait_s=0.0) == []


def test_all_hub_blocks_the_source_when_full_and_resumes_after_a_take() -> None:
    hub = FrameHub(["a"], "all", queue_size=2)
    assert hub.put(0, _frame("a", 0), timeout_s=0.1)
    assert hub.put(0, _frame("a", 1), timeout_s=0.1)
    assert not hub.put(0, _frame("a", 2), timeout_s=0.05)  # full: back-pressure, not a drop
    accepted = threading.Event()

    def producer() -> None:
        if hub.put(0, _frame("a", 2), timeout_s=10):
            accepted.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not accepted.wait(0.1)
    assert [f.index for f in hub.take(1, timeout_s=1, max_wait_s=0)] == [0]
    assert accepted.wait(5)
    thread.join(5)
    assert [f.index for f in hub.take(5, timeout_s=1, max_wait_s=0)] == [1, 2]
    assert hub.stale(0) == 0


def test_hub_gathers_a_batch_round_robin_across_sources() -> None:
    hub = FrameHub(["a", "b"], "all", queue_size=4)
    for index in range(3):
        hub.put(0, _frame("a", index), timeout_s=0.1)
    hub.put(1, _frame("b", 0), timeout_s=0.1)
    batch = hub.take(3, timeout_s=0.1, max_wait_s=0.0)
    assert sorted((f.source, f.index) for f in batch) == [("a", 0), ("a", 1), ("b", 0)]
    # a partial batch is returned once max_wait passes
    assert [(f.source, f.index) for f in hub.take(4, timeout_s=0.1, max_wait_s=0.05)] == [("a", 2)]


def test_closing_the_hub_releases_a_blocked_source() -> None:
    hub = FrameHub(["a"], "all", queue_size=1)
    hub.put(0, _frame("a", 0), timeout_s=0.1)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(hub.put(0, _frame("a", 1), 30)))
    thread.start()
    time.sleep(0.05)
    hub.close()
    thread.join(5)
    assert result == [False]


# -- file ------------------------------------------------------------------------------------


def test_file_source_stamps_frames_with_its_own_clock(data_dir: Path) -> None:
    config = FileSourceConfig(type="file", path="videos/bikes.mp4")
    source = FileSource("clip", config, _resolver(data_dir))
    with Running(source, policy="all", queue_size=2) as run:
        frames: list[Frame] = []
        while len(frames) < 10:
            frames.extend(run.hub.take(2, timeout_s=5, max_wait_s=0))
        assert [f.index for f in frames] == list(range(10))
        assert all(f.image.shape == (272, 640, 3) for f in frames)
        monos = [f.monotonic for f in frames]
        assert monos == sorted(monos)
        assert abs(frames[-1].wall_time - time.time()) < 60
        assert run.watchdog.status()["workers"]["capture"]["beats"] >= 10


def test_file_source_finishes_at_the_end_without_loop(data_dir: Path) -> None:
    config = FileSourceConfig(type="file", path="videos/bikes.mp4")
    with Running(FileSource("clip", config, _resolver(data_dir))) as run:
        status = run.wait(lambda s: s["state"] == "finished")
    assert status["frames_read"] == 250
    assert status["loops"] == 0
    assert status["last_error"] is None


def test_looped_file_source_starts_again(data_dir: Path) -> None:
    config = FileSourceConfig(type="file", path="videos/bikes.mp4", loop=True)
    with Running(FileSource("clip", config, _resolver(data_dir))) as run:
        status = run.wait(lambda s: s["loops"] >= 1 and s["frames_read"] > 260)
        assert status["state"] == "running"
    assert source_state(run.source) == "stopped"


def source_state(source: FrameSource) -> str:
    return str(source.status()["state"])


def test_realtime_and_fps_cap_space_the_frames(data_dir: Path) -> None:
    config = FileSourceConfig(type="file", path="videos/bikes.mp4", realtime=True, fps_cap=10)
    with Running(FileSource("clip", config, _resolver(data_dir)), policy="all") as run:
        frames: list[Frame] = []
        while len(frames) < 4:
            frames.extend(run.hub.take(4, timeout_s=5, max_wait_s=0))
    gaps = np.diff([f.monotonic for f in frames])
    assert (gaps >= 0.099).all(), gaps  # a file source waits: nothing is dropped
    assert [f.index for f in frames] == list(range(len(frames)))


@pytest.mark.parametrize("name", ["videos/missing.mp4", "/nonexistent/dir/clip.mp4"])
def test_missing_file_fails_check_with_its_name(data_dir: Path, name: str) -> None:
    source = FileSource("clip", FileSourceConfig(type="file", path=name), _resolver(data_dir))
    with pytest.raises(SourceOpenError, match=f"{name}.*not found"):
        source.check()


def test_a_non_video_file_fails_check(data_dir: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.mp4"
    bogus.write_bytes(b"\x00" * 1000)
    source = FileSource("clip", FileSourceConfig(type="file", path=str(bogus)), _resolver(data_dir))
    with pytest.raises(SourceOpenError, match=r"notes\.mp4"):
        source.check()


# -- zero-size frames ------------------------------------------------------------------------


class _EveryThirdEmpty:
    """cv2.VideoCapture (read/get/release) over the real video that returns an empty image on
    every third read, as some capture drivers do."""

    def __init__(self, path: Path) -> None:
        self._capture = cv2.VideoCapture(str(path))
        self._reads = 0

    def read(self) -> tuple[bool, Any]:
        self._reads += 1
        ok, image = self._capture.read()
        if ok and self._reads % 3 == 0:
            return True, np.empty((0, 0, 3), dtype=np.uint8)
        return ok, image

    def get(self, prop: int) -> float:
        return float(self._capture.get(prop))

    def release(self) -> None:
        self._capture.release()


class _GlitchySource(FrameSource):
    kind = "file"
    live = False

    def __init__(self, path: Path) -> None:
        super().__init__("glitchy", FileSourceConfig(type="file", path=str(path)))
        self._path = path

    def _open(self) -> Capture:
        return _EveryThirdEmpty(self._path)

    def _on_end(self, link: CaptureLink, attempt: int) -> bool:
        self._set_state("finished")
        return False


def test_zero_size_frames_are_dropped_and_counted_contract(data_dir: Path) -> None:
    source = _GlitchySource(data_dir / "videos" / "bikes.mp4")
    with Running(source, policy="all", queue_size=300) as run:
        status = run.wait(lambda s: s["state"] == "finished")
        frames = run.hub.take(300, timeout_s=1, max_wait_s=0)
    assert status["frames_read"] == 250
    assert status["zero_size"] == 250 // 3
    assert status["frames_delivered"] == 250 - 250 // 3
    assert len(frames) == status["frames_delivered"]
    assert all(f.image.size > 0 for f in frames)
    assert all(f.index % 3 != 2 for f in frames)  # indices keep counting across the drops


# -- live sources: failures are reported and retried -----------------------------------------


def test_unreachable_stream_is_retried_and_reported(closed_port: int) -> None:
    config = StreamSourceConfig(
        type="stream",
        url=f"http://127.0.0.1:{closed_port}/cam.mjpg",
        retry_initial_s=0.05,
        retry_max_s=0.1,
        open_timeout_s=1,
    )
    with Running(StreamSource("cam", config)) as run:
        status = run.wait(lambda s: s["open_failures"] >= 3)
    assert status["state"] in ("retrying", "opening")
    assert f"127.0.0.1:{closed_port}" in status["last_error"]
    assert "cannot be opened" in status["last_error"]
    assert status["frames_read"] == 0


def test_stream_url_credentials_are_never_shown() -> None:
    config = StreamSourceConfig(type="stream", url="rtsp://admin:s3cret@10.0.0.7:554/live")
    source = StreamSource("cam", config)
    assert "s3cret" not in source.describe()
    assert "s3cret" not in str(source.status())


def test_absent_v4l2_device_is_a_clear_error_and_retried() -> None:
    device = next(f"/dev/video{n}" for n in range(90, 100) if not Path(f"/dev/video{n}").exists())
    config = V4l2SourceConfig(
        type="v4l2",
        device=device,
        width=640,
        height=480,
        fps=30,
        fourcc="MJPG",
        retry_initial_s=0.05,
        retry_max_s=0.1,
    )
    with Running(V4l2Source("usbcam", config)) as run:
        status = run.wait(lambda s: s["open_failures"] >= 2)
    assert status["last_error"] == (
        f"V4L2 device {device} does not exist: connect the camera or fix `device` "
        "(list cameras with `ls /dev/video*`)"
    )


def test_gstreamer_source_needs_an_opencv_with_gstreamer() -> None:
    config = GStreamerSourceConfig(
        type="gstreamer",
        pipeline="videotestsrc num-buffers=30 ! video/x-raw,width=64,height=48 ! videoconvert "
        "! video/x-raw,format=BGR ! appsink",
    )
    source = GStreamerSource("csi", config)
    if not gstreamer_available():
        with pytest.raises(SourceOpenError, match="built without GStreamer"):
            source.check()
        return
    with Running(source, policy="all", queue_size=64) as run:
        frames = run.hub.take(5, timeout_s=10, max_wait_s=1)
    assert frames
    assert frames[0].image.shape == (48, 64, 3)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    config = StreamSourceConfig(
        type="stream", url="rtsp://cam/x", retry_initial_s=0.5, retry_max_s=4.0
    )
    source = StreamSource("cam", config, seed=1)
    for attempt, base in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [source._backoff(attempt) for _ in range(50)]
        assert min(delays) >= 0.75 * base
        assert max(delays) <= 1.25 * base
        assert len(set(delays)) > 1  # jittered, so reconnecting cameras do not stampede


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ({"type": "webcam"}, "does not match any of the expected tags"),
        ({"type": "v4l2", "device": "/dev/sda"}, "String should match pattern"),
        ({"type": "gstreamer", "pipeline": "videotestsrc ! fakesink"}, "appsink"),
        ({"type": "stream", "url": "ftp://cam/x"}, "String should match pattern"),
        ({"type": "file", "path": "a.mp4", "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_source_configs_are_rejected(source: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        vision_config(sources=[source])


def test_source_names_must_be_unique() -> None:
    sources = [
        {"type": "file", "path": "a.mp4", "name": "file1"},
        {"type": "file", "path": "b.mp4"},  # defaults to file1 as well
    ]
    with pytest.raises(ValidationError, match="repeated: file1"):
        vision_config(sources=sources)
