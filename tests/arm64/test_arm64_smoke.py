"""The agent on ARM64 (Debian bookworm arm64, aarch64 wheels from PyPI, run under qemu-user as a
Cortex-A72) against the same code on x86-64, in two steps (measured values:
docs/benchmarks/arm64_smoke.json):

1. ``test_arm64_libraries_match_x86``, the libraries on their own:
   - ONNX Runtime runs YOLOX-nano 416 on the *same* input tensor on both sides; the raw outputs
     agree to KERNEL_BOX_TOL / KERNEL_SCORE_TOL. They cannot be equal: the MLAS kernels of
     x86-64 (AVX2/AVX-512 FMA) and aarch64 (NEON) sum the same float32 products in another
     order, so each layer's output differs in its last bits (measured: 4e-5 in box units of the
     416-pixel input, 1e-5 in scores; the tolerances are 20x and 8x that).
   - OpenCV's 8-bit image operations are not bit-exact across the two: the street video
     (H.264) decodes to BGR frames that differ by up to 2 levels of 255 (H.264 decoding is
     bit-exact by the standard; the YUV -> BGR conversion after it is not), and ``cv2.resize``
     (bilinear, as the agent's letterbox uses it) of identical frames differs by up to 1 level.
     A lossless FFV1 clip that keeps BGR decodes to identical pixels on both.
2. ``test_arm64_agent_detections_match_x86``, the whole agent: both run one vision pipeline
   (YOLOX-nano 416 on ONNX Runtime) over FRAMES frames of the street video (from CLIP_START,
   cut losslessly into that FFV1 clip so both agents see the same pixels: each frame's
   fingerprint must match) and publish to one real mosquitto on the host. The detections that
   arrive over MQTT must agree: same frames and frame sizes; each x86 detection paired with an
   arm64 one of its class whose box corners lie within BOX_TOL_PX source pixels and whose score
   is within SCORE_TOL; a detection reported by one side only allowed just when it scores below
   SCORE_THRESHOLD + SCORE_TOL (the other side scored it just under the threshold). These
   tolerances come from the resize: 1-level differences at ~19 % of the network's input values
   move YOLOX-nano's scores by up to 0.016 and its boxes by up to 1.2 px on these frames, while
   a wrong class, a misplaced box or a lost object (a layout, byte-order or kernel bug) is far
   outside them.

Emulation is ~180x slower than native, hence a handful of frames, policy `all` (every frame is
processed, none dropped) and no real-time pacing, so both runs see exactly the same frames.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import rootfs_probe
from agent_process_support import AgentProcess, base_env
from arm64_harness import VENV, Arm64Rootfs, agent_command, emulated, stop
from broker_support import PASSWORD, Monitor, close_monitor, open_monitor, running_broker
from nspawn_harness import run

pytestmark = [pytest.mark.arm64, pytest.mark.slow, pytest.mark.timeout(3600)]

FRAMES = 4
MODEL = "yolox_nano_416"
VIDEO = "videos/bikes.mp4"
CLIP_START = 110  # a person, a bicycle, a motorbike and a bus in each of the next FRAMES frames
KERNEL_FRAMES = 2
KERNEL_BOX_TOL = 1e-3  # raw output, pixels of the 416x416 input
KERNEL_SCORE_TOL = 1e-4  # raw objectness / class scores
PIXEL_TOL_LEVELS = 3  # 8-bit image operations (colour conversion, resize)
BOX_TOL_PX = 2.0  # source pixels (640 x 272 frames)
SCORE_TOL = 0.03
SCORE_THRESHOLD = 0.3  # the vision pipeline's default score_threshold, which both runs use
X86_DEVICE = "dev090"
ARM64_DEVICE = "dev091"
AGENT_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def street_clip(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Frames CLIP_START.. of the street video, losslessly re-encoded (FFV1, BGR kept): both
    sides decode it to the same pixels, so any difference in the detections is the agent's."""
    capture = cv2.VideoCapture(str(data_dir / VIDEO))
    try:
        capture.set(cv2.CAP_PROP_POS_FRAMES, CLIP_START)
        frames = [capture.read()[1] for _ in range(FRAMES)]
    finally:
        capture.release()
    height, width = frames[0].shape[:2]
    clip = tmp_path_factory.mktemp("clip") / "street.mkv"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"FFV1"), 25.0, (width, height))
    try:
        assert writer.isOpened(), "OpenCV cannot write FFV1"
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return clip


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_arm64_libraries_match_x86(
    arm64_rootfs: Arm64Rootfs,
    models_dir: Path,
    data_dir: Path,
    street_clip: Path,
    measurements: dict[str, object],
) -> None:
    model = models_dir / f"{MODEL}.onnx"
    x86_video = rootfs_probe.decode(str(data_dir / VIDEO), FRAMES)
    x86_clip = rootfs_probe.decode(str(street_clip), FRAMES)
    height, width = x86_clip.shape[1:3]
    size = int(MODEL.rsplit("_", 1)[1])
    scaled = (size, round(height * size / width))  # the letterbox's resize of a wide frame
    x86_resized = rootfs_probe.resize(x86_clip, *scaled)
    tensor = np.stack(
        [cv2.resize(f, (size, size)).transpose(2, 0, 1) for f in x86_clip[:KERNEL_FRAMES]]
    ).astype(np.float32)
    x86_out = rootfs_probe.infer(str(model), tensor)

    work = arm64_rootfs.path / "root/probe"  # the rootfs is a host tmpfs: read back directly
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "input.npy", tensor)
    started = time.monotonic()
    run(
        emulated(
            arm64_rootfs.path,
            [
                f"{VENV}/bin/python",
                "/mnt/probe/rootfs_probe.py",
                f"/mnt/data/{VIDEO}",
                f"/mnt/clip/{street_clip.name}",
                str(FRAMES),
                *(str(v) for v in scaled),
                f"/mnt/models/{model.name}",
                "/root/probe/input.npy",
                "/root/probe",
            ],
            binds={
                Path(rootfs_probe.__file__).parent: "/mnt/probe",
                models_dir: "/mnt/models",
                data_dir: "/mnt/data",
                street_clip.parent: "/mnt/clip",
            },
            env={},
        ),
        timeout=AGENT_TIMEOUT_S,
    )
    probe_s = time.monotonic() - started
    video = _levels(np.load(work / "video.npy"), x86_video)
    clip = _levels(np.load(work / "clip.npy"), x86_clip)
    resized = _levels(np.load(work / "resized.npy"), x86_resized)
    arm_out = np.load(work / "outputs.npy")
    assert arm_out.shape == x86_out.shape
    raw = np.abs(arm_out - x86_out)  # YOLOX rows: cx, cy, w, h, objectness, 80 class scores
    measurements["libraries"] = {
        "h264_decode_max_diff_levels": int(video.max()),
        "h264_decode_share_of_values_differing": round(float((video > 0).mean()), 3),
        "ffv1_clip_decode_max_diff_levels": int(clip.max()),
        "resize_max_diff_levels": int(resized.max()),
        "resize_share_of_values_differing": round(float((resized > 0).mean()), 4),
        "kernel_frames": KERNEL_FRAMES,
        "kernel_max_box_diff": float(raw[..., :4].max()),
        "kernel_max_score_diff": float(raw[..., 4:].max()),
        "kernel_box_tolerance": KERNEL_BOX_TOL,
        "kernel_score_tolerance": KERNEL_SCORE_TOL,
        "arm64_probe_wall_s": round(probe_s, 1),
    }
    assert clip.max() == 0, measurements["libraries"]  # lossless BGR: the same pixels
    assert video.max() <= PIXEL_TOL_LEVELS, measurements["libraries"]
    assert resized.max() <= PIXEL_TOL_LEVELS, measurements["libraries"]
    assert raw[..., :4].max() <= KERNEL_BOX_TOL, measurements["libraries"]
    assert raw[..., 4:].max() <= KERNEL_SCORE_TOL, measurements["libraries"]
    # not trivially equal: the frames hold objects the model is sure of
    assert x86_out[..., 4].max() > 0.5, "no confident object in the probe frames"


def _config(device: str, port: int, state_dir: str, password_file: str, video: str) -> str:
    """The agent config of both runs; only the device and its paths differ."""
    return f"""\
device_id = "{device}"
state_dir = "{state_dir}"

[reporting.jsonl]
enabled = false

[reporting.mqtt]
host = "127.0.0.1"
port = {port}
username = "{device}"
password_file = "{password_file}"

[reporting.mqtt.commands]
trusted_keys_dir = "{state_dir}/keys"

[[pipelines]]
type = "vision"
name = "street"
model = "{MODEL}"
policy = "all"
fingerprint = true
# a worker promises a beat this often, and inference is given 0.8x as long: an emulated
# inference takes ~3.5 s, and the default (10 s) left too little room on a busy 2-core runner
heartbeat_interval_s = 30.0

[pipelines.engine]
type = "onnxruntime"
intra_op_threads = 1

[[pipelines.sources]]
type = "file"
name = "bikes"
path = "{video}"
realtime = false
"""


def _detections(mon: Monitor, device: str) -> list[dict[str, Any]]:
    topic = f"edge/{device}/vision/street/detections"
    got = mon.wait_count(lambda m: m.topic == topic, FRAMES, timeout=10)
    return sorted((json.loads(m.payload) for m in got), key=lambda r: r["frame_index"])


def _frames_per_s(results: list[dict[str, Any]]) -> float:
    """Frames per second of processing: preprocess + inference + postprocess, one frame a call."""
    busy_ms = sum(
        r["latency_ms"][stage]
        for r in results
        for stage in ("preprocess", "inference", "postprocess")
    )
    return len(results) / (busy_ms / 1000.0)


def _box_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest difference of two detections' box corners, in source pixels."""
    return max(abs(p - q) for p, q in zip(a["box_xyxy"], b["box_xyxy"], strict=True))


def _pair(
    x86: list[dict[str, Any]], arm: list[dict[str, Any]]
) -> tuple[list[tuple[float, float]], list[dict[str, Any]]]:
    """Pair each x86 detection with the closest arm64 one of its class within BOX_TOL_PX:
    the (box, score) differences of the pairs, and the detections left without a partner."""
    left = list(arm)
    diffs: list[tuple[float, float]] = []
    alone: list[dict[str, Any]] = []
    for det in x86:
        near = [
            d for d in left if d["class_id"] == det["class_id"] and _box_diff(d, det) <= BOX_TOL_PX
        ]
        if not near:
            alone.append(det)
            continue
        best = min(near, key=lambda d: _box_diff(d, det))
        left.remove(best)
        diffs.append((_box_diff(best, det), abs(best["score"] - det["score"])))
    return diffs, alone + left


def _run_x86(config: Path, models_dir: Path) -> float:
    env = base_env(EDGE_AGENT_MODEL_PATH=str(models_dir))
    started = time.monotonic()
    agent = AgentProcess(["run", "--config", str(config), "--frames", str(FRAMES)], env)
    try:
        code = agent.wait(AGENT_TIMEOUT_S)
    finally:
        agent.kill()
    assert code == 0, f"x86 agent exited {code}: {agent.stderr[-10:]}"
    return time.monotonic() - started


def _run_arm64(rootfs: Path, config: str, models_dir: Path, clip: Path, log: Path) -> float:
    (rootfs / "etc/edge-agent").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/edge-agent/agent.toml").write_text(config)
    (rootfs / "etc/edge-agent/mqtt-password").write_text(PASSWORD + "\n")
    cmd = agent_command(
        rootfs,
        ["run", "--config", "/etc/edge-agent/agent.toml", "--frames", str(FRAMES)],
        binds={models_dir: "/mnt/models", clip.parent: "/mnt/clip"},
        env={"EDGE_AGENT_MODEL_PATH": "/mnt/models", "PYTHONUNBUFFERED": "1"},
    )
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            code = proc.wait(AGENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"arm64 agent still running after {AGENT_TIMEOUT_S:.0f} s: {_tail(log)}")
        finally:
            stop(proc)
    assert code == 0, f"arm64 agent exited {code}: {_tail(log)}"
    return time.monotonic() - started


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def test_arm64_agent_detections_match_x86(
    arm64_rootfs: Arm64Rootfs,
    models_dir: Path,
    street_clip: Path,
    tmp_path: Path,
    measurements: dict[str, object],
) -> None:
    # the agent runs without llama-cpp-python (no aarch64 wheel) when no LLM pipeline is set
    assert (arm64_rootfs.machine, arm64_rootfs.llama_cpp_installed) == ("aarch64", False)
    log = tmp_path / "arm64.log"
    with running_broker() as broker:
        mon = open_monitor(broker, "edge/#")
        try:
            (tmp_path / "pw").write_text(PASSWORD + "\n")
            x86_config = tmp_path / "x86.toml"
            x86_config.write_text(
                _config(
                    X86_DEVICE,
                    broker.port,
                    str(tmp_path / "state"),
                    str(tmp_path / "pw"),
                    str(street_clip),
                )
            )
            x86_s = _run_x86(x86_config, models_dir)
            arm_config = _config(
                ARM64_DEVICE,
                broker.port,
                "/var/lib/edge-agent",
                "/etc/edge-agent/mqtt-password",
                f"/mnt/clip/{street_clip.name}",
            )
            arm_s = _run_arm64(arm64_rootfs.path, arm_config, models_dir, street_clip, log)
            x86 = _detections(mon, X86_DEVICE)
            arm = _detections(mon, ARM64_DEVICE)
        finally:
            close_monitor(mon)

    expected = list(range(FRAMES))
    assert [r["frame_index"] for r in x86] == expected
    assert [r["frame_index"] for r in arm] == expected, _tail(log)
    box_diffs: list[float] = []
    score_diffs: list[float] = []
    one_sided: list[dict[str, Any]] = []
    for a, b in zip(x86, arm, strict=True):
        assert a["fingerprint"] == b["fingerprint"], f"frame {a['frame_index']} decoded differently"
        assert a["frame"] == b["frame"]
        pairs, alone = _pair(a["detections"], b["detections"])
        box_diffs += [box for box, _ in pairs]
        score_diffs += [score for _, score in pairs]
        one_sided += alone
    assert box_diffs, "no detections in the compared frames: the comparison proves nothing"
    x86_fps, arm_fps = _frames_per_s(x86), _frames_per_s(arm)
    measurements["agent"] = {
        "frames": FRAMES,
        "detections_compared": len(box_diffs),
        "one_sided_near_threshold": [(d["label"], d["score"]) for d in one_sided],
        "labels": sorted({label for r in x86 for label in r["counts"]}),
        "max_box_diff_px": round(max(box_diffs), 3),
        "max_score_diff": round(max(score_diffs), 4),
        "box_tolerance_px": BOX_TOL_PX,
        "score_tolerance": SCORE_TOL,
        "x86_agent_wall_s": round(x86_s, 2),
        "arm64_agent_wall_s": round(arm_s, 2),
        "x86_frames_per_s": round(x86_fps, 3),
        "arm64_emulated_frames_per_s": round(arm_fps, 4),
        "x86_over_arm64_emulated_fps": round(x86_fps / arm_fps, 1),
    }
    assert max(score_diffs) <= SCORE_TOL, measurements["agent"]
    # a detection only one side reports must be one the other side scored just below the
    # threshold: anything more confident is a real disagreement
    assert all(d["score"] < SCORE_THRESHOLD + SCORE_TOL for d in one_sided), measurements["agent"]
