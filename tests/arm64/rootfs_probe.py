"""Run inside the arm64 rootfs (under qemu) by test_arm64_smoke: the two library steps whose
results the x86 side compares, each on its own.

    python rootfs_probe.py VIDEO CLIP FRAMES WIDTH HEIGHT MODEL INPUT OUT_DIR

- decode: the first FRAMES frames of VIDEO and of CLIP with OpenCV, as the agent's file source
  does (``cv2.VideoCapture.read``), saved as ``OUT_DIR/video.npy`` and ``OUT_DIR/clip.npy``
  (uint8, N x H x W x 3);
- resize: the CLIP frames to WIDTH x HEIGHT with ``cv2.resize`` (bilinear), as the agent's
  preprocessing does, saved as ``OUT_DIR/resized.npy``;
- infer: the float32 tensor in INPUT (N x 3 x H x W, made by the x86 side) through MODEL with
  ONNX Runtime's CPU provider and one intra-op thread, one frame per run as the agent runs it,
  the first output of each run saved as ``OUT_DIR/outputs.npy``.

Only numpy, OpenCV and ONNX Runtime: it checks the aarch64 wheels, not the agent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort


def decode(video: str, count: int) -> np.ndarray:
    capture = cv2.VideoCapture(video)
    try:
        frames = []
        for index in range(count):
            ok, frame = capture.read()
            if not ok:
                raise SystemExit(f"{video}: frame {index} could not be decoded")
            frames.append(frame)
    finally:
        capture.release()
    return np.stack(frames)


def resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack(
        [cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames]
    )


def infer(model: str, batch: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.stack([session.run(None, {name: batch[i : i + 1]})[0] for i in range(len(batch))])


def main(argv: list[str]) -> None:
    video, clip, count, width, height, model, tensor, out = argv
    folder = Path(out)
    np.save(folder / "video.npy", decode(video, int(count)))
    clip_frames = decode(clip, int(count))
    np.save(folder / "clip.npy", clip_frames)
    np.save(folder / "resized.npy", resize(clip_frames, int(width), int(height)))
    np.save(folder / "outputs.npy", infer(model, np.load(tensor)))


if __name__ == "__main__":
    main(sys.argv[1:])
