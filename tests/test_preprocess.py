"""Preprocessing: equals a straightforward reference, maps geometry exactly, allocates nothing
per frame once warm, and rejects bad frames with one-line errors."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engines.manifest import InputSpec, ModelManifest
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig
from pipelines.errors import PreprocessError
from pipelines.vision.preprocess import FrameMeta, Preprocessor

DETECTORS = ("yolox_nano_416", "deimv2_hgnetv2_femto_coco", "nanodet_m_416")
SIZES = ((640, 272), (333, 1001), (416, 416), (1280, 720))


def _manifest(name: str, tmp_path: Path) -> ModelManifest:
    store = ModelStore(ModelStoreConfig(allow_download=False), tmp_path, env={})
    return store.manifest(name)


def _spec(**changes: Any) -> InputSpec:
    base: dict[str, Any] = {
        "width": 416,
        "height": 416,
        "color": "bgr",
        "resize": "letterbox",
        "tensor": "images",
    }
    return InputSpec(**{**base, **changes})


def _reference(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The obvious implementation: resize, paste on a padded canvas, convert, normalise."""
    h, w = frame.shape[:2]
    if spec.resize == "stretch":
        canvas = cv2.resize(frame, (spec.width, spec.height)).astype(np.float32)
    else:
        r = min(spec.width / w, spec.height / h)
        nw, nh = round(w * r), round(h * r)
        resized = cv2.resize(frame, (nw, nh))
        canvas = np.full((spec.height, spec.width, 3), spec.pad_value, np.float32)
        px, py = (0, 0)
        if spec.letterbox_align == "center":
            px, py = (spec.width - nw) // 2, (spec.height - nh) // 2
        canvas[py : py + nh, px : px + nw] = resized
    if spec.color == "rgb":
        canvas = canvas[:, :, ::-1]
    x = (canvas * spec.scale - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return x.transpose(2, 0, 1) if spec.layout == "nchw" else x


def _frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_real_manifest_specs_match_reference(
    name: str, width: int, height: int, tmp_path: Path
) -> None:
    spec = _manifest(name, tmp_path).input
    assert spec is not None
    pre = Preprocessor(spec)
    out = np.full(pre.input_shape, np.nan, np.float32)
    frame = _frame(width, height)
    pre.prepare(frame, out, 0)
    np.testing.assert_allclose(out[0], _reference(frame, spec), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "changes",
    [
        {"color": "rgb", "letterbox_align": "center", "pad_value": 0.0},
        {"layout": "nhwc", "scale": 1 / 255, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)},
        {"resize": "stretch", "width": 320, "height": 192, "color": "rgb"},
        {"width": 640, "height": 384, "letterbox_align": "center"},
    ],
)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_spec_variants_match_reference(changes: dict[str, Any], width: int, height: int) -> None:
    spec = _spec(**changes)
    pre = Preprocessor(spec)
    out = np.full(pre.input_shape, np.nan, np.float32)
    frame = _frame(width, height, seed=width)
    pre.prepare(frame, out, 0)
    np.testing.assert_allclose(out[0], _reference(frame, spec), rtol=1e-5, atol=1e-4)


def test_batch_slots_are_independent() -> None:
    spec = _spec(letterbox_align="center")
    pre = Preprocessor(spec, batch=2)
    out = np.zeros(pre.input_shape, np.float32)
    a, b = _frame(640, 272, 1), _frame(333, 1001, 2)
    meta_a = pre.prepare(a, out, 0)
    meta_b = pre.prepare(b, out, 1)
    np.testing.assert_allclose(out[0], _reference(a, spec), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[1], _reference(b, spec), rtol=1e-5, atol=1e-4)
    assert (meta_a.width, meta_a.height, meta_b.width, meta_b.height) == (640, 272, 333, 1001)


@pytest.mark.parametrize("align", ["corner", "center"])
@pytest.mark.parametrize(("width", "height"), [(640, 272), (333, 1001)])
def test_meta_locates_the_image_in_the_input(align: str, width: int, height: int) -> None:
    """A white rectangle in the frame lands where FrameMeta says (within a pixel)."""
    spec = _spec(letterbox_align=align, pad_value=0.0)
    pre = Preprocessor(spec)
    frame = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = width // 5, height // 3, width * 3 // 4, height * 5 // 6
    frame[y1:y2, x1:x2] = 255
    out = np.zeros(pre.input_shape, np.float32)
    meta = pre.prepare(frame, out, 0)
    ys, xs = np.nonzero(out[0, 0] > 127.5)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    box = np.array([[x1, y1, x2, y2]], np.float32)
    meta.to_input(box)
    np.testing.assert_allclose(found, box[0], atol=1.0)
    # and back: exactly the source box
    meta.to_source(box)
    np.testing.assert_allclose(box[0], [x1, y1, x2, y2], rtol=1e-6)


def test_meta_values_by_hand() -> None:
    corner = Preprocessor(_spec()).meta_for(640, 272)
    # 416 / 640 = 0.65; 272 * 0.65 = 176.8 -> 177 rows
    assert corner == FrameMeta(640, 272, 416 / 640, 177 / 272, 0, 0)
    center = Preprocessor(_spec(letterbox_align="center")).meta_for(333, 1001)
    # 416 / 1001; 333 * 416 / 1001 = 138.4 -> 138 columns, (416 - 138) // 2 = 139
    assert center == FrameMeta(333, 1001, 138 / 333, 416 / 1001, 139, 0)
    stretch = Preprocessor(_spec(resize="stretch")).meta_for(640, 272)
    assert stretch == FrameMeta(640, 272, 416 / 640, 416 / 272, 0, 0)


def _peak_growth(call: Callable[[], object], repeats: int = 20) -> tuple[int, int]:
    """(peak bytes above the start, net bytes kept) over ``repeats`` calls, after warm-up."""
    for _ in range(3):
        call()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(repeats):
            call()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start, current - start


@pytest.mark.parametrize(
    "changes",
    [{}, {"resize": "stretch", "color": "rgb", "scale": 1 / 255}, {"layout": "nhwc"}],
)
def test_no_frame_sized_allocation_after_warmup(changes: dict[str, Any]) -> None:
    pre = Preprocessor(_spec(**changes))
    out = np.zeros(pre.input_shape, np.float32)
    frame = _frame(640, 272)
    peak, kept = _peak_growth(lambda: pre.prepare(frame, out, 0))
    # a frame-sized temporary would be >= 177*416*3 bytes (uint8) / 4x that as float32
    assert peak < 4 * 1024, f"preprocessing allocated {peak} bytes at peak per call"
    assert kept < 1024


def test_allocation_check_detects_a_copy() -> None:
    """The measurement above is able to fail: a per-call float copy shows up."""
    frame = _frame(640, 272)
    peak, _ = _peak_growth(lambda: frame.astype(np.float32))
    assert peak >= frame.size * 4


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (np.zeros((0, 0, 3), np.uint8), "zero-size"),
        (np.zeros((10, 0, 3), np.uint8), "zero-size"),
        (np.zeros((10, 10, 3), np.float32), "dtype"),
        (np.zeros((10, 10, 3), np.uint16), "dtype"),
        (np.zeros((10, 10), np.uint8), "shape"),
        (np.zeros((10, 10, 4), np.uint8), "shape"),
        (np.zeros((10, 10, 1), np.uint8), "shape"),
        (None, "NoneType"),
        ([[1, 2, 3]], "list"),
    ],
)
def test_bad_frames_raise_one_line(frame: Any, words: str) -> None:
    pre = Preprocessor(_spec())
    out = np.zeros(pre.input_shape, np.float32)
    with pytest.raises(PreprocessError, match=words) as info:
        pre.prepare(frame, out, 0)
    assert "\n" not in str(info.value)


def test_bad_buffers_raise_one_line() -> None:
    pre = Preprocessor(_spec())
    frame = _frame(64, 48)
    for out, index, words in [
        (np.zeros((1, 3, 320, 320), np.float32), 0, "shape"),
        (np.zeros((1, 416, 416, 3), np.float32), 0, "shape"),
        (np.zeros((1, 3, 416, 416), np.float64), 0, "dtype"),
        (np.zeros((1, 3, 416, 416), np.float32), 1, "slot"),
    ]:
        with pytest.raises(PreprocessError, match=words) as info:
            pre.prepare(frame, out, index)
        assert "\n" not in str(info.value)


def test_zero_std_is_rejected() -> None:
    with pytest.raises(PreprocessError, match="std"):
        Preprocessor(_spec(std=(1.0, 0.0, 1.0)))


def test_float16_buffer() -> None:
    spec = _spec(scale=1 / 255)
    pre = Preprocessor(spec)
    out = np.zeros(pre.input_shape, np.float16)
    frame = _frame(300, 200)
    pre.prepare(frame, out, 0)
    np.testing.assert_allclose(out[0], _reference(frame, spec), atol=2e-3)
