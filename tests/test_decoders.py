"""Decoders on hand-built tensors: known boxes in source pixels are encoded the way each format's
model would emit them (through the letterbox / resize of a 640x272 or 333x1001 frame), decoded,
and must come back exactly; plus NMS, thresholds, NaN scores and shape mismatches."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.base import TensorSpec
from engines.config import OnnxRuntimeConfig
from engines.manifest import InputSpec
from engines.registry import build_engine
from pipelines.errors import DecoderMismatchError, PipelineConfigError
from pipelines.vision.decoders import DECODERS, DecodeParams, build_decoder
from pipelines.vision.detections import Detections
from pipelines.vision.preprocess import FrameMeta, Preprocessor

C = 80
STRIDES = (8, 16, 32)
GRIDS = {s: (416 // s, 416 // s) for s in STRIDES}  # (gw, gh) for a 416x416 input
LEVEL_OFFSET = {8: 0, 16: 52 * 52, 32: 52 * 52 + 26 * 26}
ANCHORS = 52 * 52 + 26 * 26 + 13 * 13  # 3549

# (frame width, frame height) -> [(source box xyxy, class id, score)]
CASES: dict[tuple[int, int], list[tuple[tuple[float, float, float, float], int, float]]] = {
    (640, 272): [((100.0, 40.0, 300.0, 200.0), 2, 0.9), ((420.0, 90.0, 600.0, 250.0), 0, 0.8)],
    (333, 1001): [((20.0, 100.0, 200.0, 500.0), 2, 0.9), ((150.0, 600.0, 320.0, 950.0), 0, 0.8)],
}
PARAMS = DecodeParams(score_threshold=0.3, nms_iou=0.45, max_detections=100)


def _spec(resize: str = "letterbox", align: str = "corner", **more: Any) -> InputSpec:
    return InputSpec(
        width=416,
        height=416,
        color="bgr",
        resize=resize,  # type: ignore[arg-type]
        letterbox_align=align,  # type: ignore[arg-type]
        tensor="images",
        **more,
    )


def _hand_meta(width: int, height: int, resize: str, align: str) -> FrameMeta:
    """The letterbox written out by hand (416x416 input)."""
    if resize == "stretch":
        return FrameMeta(width, height, 416 / width, 416 / height, 0, 0)
    r = min(416 / width, 416 / height)
    nw, nh = round(width * r), round(height * r)
    px, py = ((416 - nw) // 2, (416 - nh) // 2) if align == "center" else (0, 0)
    return FrameMeta(width, height, nw / width, nh / height, px, py)


def _to_input(box: tuple[float, ...], m: FrameMeta) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (
        x1 * m.scale_x + m.pad_x,
        y1 * m.scale_y + m.pad_y,
        x2 * m.scale_x + m.pad_x,
        y2 * m.scale_y + m.pad_y,
    )


def _cxcywh(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


# -- encoders: what each model format would output for given model-input boxes ----------------


def _yolox(boxes: list[tuple[tuple[float, ...], int, float]], m: FrameMeta) -> np.ndarray:
    raw = np.zeros((1, ANCHORS, 5 + C), np.float32)
    raw[0, :, 2:4] = -3.0  # tiny boxes everywhere else, objectness 0
    for k, (box, cls, score) in enumerate(boxes):
        s = STRIDES[k % 3]  # exercise every level
        cx, cy, w, h = _cxcywh(_to_input(box, m))
        gx, gy = int(cx // s), int(cy // s)
        row = LEVEL_OFFSET[s] + gy * GRIDS[s][0] + gx
        raw[0, row, :4] = (cx / s - gx, cy / s - gy, math.log(w / s), math.log(h / s))
        raw[0, row, 4] = 0.95
        raw[0, row, 5 + cls] = score / 0.95
        raw[0, row, 5 + (cls + 1) % C] = 0.1  # a weaker second class must not win
    return raw


def _yolov5(boxes: list[tuple[tuple[float, ...], int, float]], m: FrameMeta) -> np.ndarray:
    raw = np.zeros((1, 3 * ANCHORS, 5 + C), np.float32)
    for k, (box, cls, score) in enumerate(boxes):
        row = 17 + 2001 * k
        raw[0, row, :4] = _cxcywh(_to_input(box, m))
        raw[0, row, 4] = 0.95
        raw[0, row, 5 + cls] = score / 0.95
    return raw


def _yolov8(boxes: list[tuple[tuple[float, ...], int, float]], m: FrameMeta) -> np.ndarray:
    raw = np.zeros((1, 4 + C, ANCHORS), np.float32)
    for k, (box, cls, score) in enumerate(boxes):
        col = 5 + 700 * k
        raw[0, :4, col] = _cxcywh(_to_input(box, m))
        raw[0, 4 + cls, col] = score
    return raw


def _distribution(d: float) -> np.ndarray:
    """Logits over bins 0..7 whose softmax expectation is exactly ``d`` (0 <= d <= 7)."""
    logits = np.full(8, -1e4, np.float32)
    lo = min(int(d), 7)
    frac = d - lo
    logits[lo] = math.log(1.0 - frac) if frac < 1.0 else -1e4
    if frac > 0.0:
        logits[lo + 1] = math.log(frac)
    return logits


def _nanodet(
    boxes: list[tuple[tuple[float, ...], int, float]], m: FrameMeta
) -> dict[str, np.ndarray]:
    out = {}
    for s in STRIDES:
        gw, gh = GRIDS[s]
        out[f"cls_pred_stride_{s}"] = np.zeros((1, gw * gh, C), np.float32)
        out[f"dis_pred_stride_{s}"] = np.zeros((1, gw * gh, 32), np.float32)
    used: set[tuple[int, int]] = set()
    for box, cls, score in boxes:
        x1, y1, x2, y2 = _to_input(box, m)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        found = None
        for s in STRIDES:  # the finest level (and a free cell near the centre) reaching the sides
            for dx, dy in ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)):
                gx, gy = int(cx // s) + dx, int(cy // s) + dy
                px, py = (gx + 0.5) * s, (gy + 0.5) * s
                dist = (px - x1, py - y1, x2 - px, y2 - py)
                cell = gy * GRIDS[s][0] + gx
                if (s, cell) not in used and all(0 <= d <= 7 * s for d in dist):
                    found = (s, cell, dist)
                    break
            if found:
                break
        if found is None:
            pytest.fail(f"box {box} does not fit reg_max 7")
        s, cell, dist = found
        used.add((s, cell))
        out[f"cls_pred_stride_{s}"][0, cell, cls] = score
        out[f"dis_pred_stride_{s}"][0, cell] = np.concatenate([_distribution(d / s) for d in dist])
    return out


def _detr(boxes: list[tuple[tuple[float, ...], int, float]]) -> dict[str, np.ndarray]:
    labels = np.zeros((1, 300), np.int64)
    out_boxes = np.zeros((1, 300, 4), np.float32)
    scores = np.zeros((1, 300), np.float32)
    scores[0, :] = np.linspace(0.0, 0.05, 300)  # background queries, all below threshold
    for k, (box, cls, score) in enumerate(boxes):
        q = 7 + 60 * k
        labels[0, q], out_boxes[0, q], scores[0, q] = cls, box, score
    return {"labels": labels, "boxes": out_boxes, "scores": scores}


def _encode(fmt: str, boxes: list[Any], m: FrameMeta) -> dict[str, np.ndarray]:
    if fmt == "yolox":
        return {"output": _yolox(boxes, m)}
    if fmt == "yolov5":
        return {"output0": _yolov5(boxes, m)}
    if fmt == "yolov8":
        return {"output0": _yolov8(boxes, m)}
    if fmt == "nanodet":
        return _nanodet(boxes, m)
    return _detr(boxes)


def _assert_found(det: Detections, expected: list[Any], atol: float = 1e-3) -> None:
    assert len(det) == len(expected), det
    want = sorted(expected, key=lambda e: -e[2])
    for i, (box, cls, score) in enumerate(want):
        np.testing.assert_allclose(det.boxes[i], box, atol=atol)
        assert det.class_ids[i] == cls
        assert det.scores[i] == pytest.approx(score, abs=1e-5)
    assert det.boxes.dtype == np.float32
    assert det.class_ids.dtype == np.int32


LAYOUTS = [("letterbox", "corner"), ("letterbox", "center"), ("stretch", "corner")]


@pytest.mark.parametrize("fmt", ["yolox", "yolov5", "yolov8", "nanodet"])
@pytest.mark.parametrize(("resize", "align"), LAYOUTS)
@pytest.mark.parametrize("size", list(CASES))
def test_known_boxes_round_trip(fmt: str, resize: str, align: str, size: tuple[int, int]) -> None:
    spec = _spec(resize, align)
    meta = Preprocessor(spec).meta_for(*size)
    assert meta == _hand_meta(*size, resize, align)
    decoder = build_decoder(fmt, spec, C)
    [det] = decoder.decode(_encode(fmt, CASES[size], meta), [meta], PARAMS)
    _assert_found(det, CASES[size])
    assert det.invalid == 0
    assert (det.width, det.height) == size


@pytest.mark.parametrize("size", list(CASES))
def test_detr_boxes_pass_through_and_size_input(size: tuple[int, int]) -> None:
    spec = _spec("stretch", size_tensor="orig_target_sizes")
    meta = Preprocessor(spec).meta_for(*size)
    decoder = build_decoder("detr", spec, C)
    extra = decoder.extra_inputs([meta])
    assert extra["orig_target_sizes"].dtype == np.int64
    assert extra["orig_target_sizes"].tolist() == [list(size)]
    [det] = decoder.decode(_encode("detr", CASES[size], meta), [meta], PARAMS)
    _assert_found(det, CASES[size])


def test_detr_extra_inputs_fill_engine_buffer() -> None:
    spec = _spec("stretch", size_tensor="orig_target_sizes")
    decoder = build_decoder("detr", spec, C)
    buffer = np.zeros((3, 2), np.int64)
    metas = [FrameMeta(640, 272, 0.65, 1.5, 0, 0), FrameMeta(333, 1001, 1.2, 0.4, 0, 0)]
    extra = decoder.extra_inputs(metas, out={"orig_target_sizes": buffer})
    assert extra["orig_target_sizes"] is buffer
    assert buffer.tolist() == [[640, 272], [333, 1001], [640, 272]]
    assert decoder.extra_input_names() == ("orig_target_sizes",)


@pytest.mark.parametrize("fmt", ["yolox", "yolov5", "yolov8", "nanodet", "detr"])
def test_batch_of_two_frames_each_with_its_meta(fmt: str) -> None:
    spec = _spec("stretch" if fmt == "detr" else "letterbox", "center", size_tensor="sizes")
    pre = Preprocessor(spec, batch=2)
    metas = [pre.meta_for(*size) for size in CASES]
    parts = [_encode(fmt, CASES[size], meta) for size, meta in zip(CASES, metas, strict=True)]
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    dets = build_decoder(fmt, spec, C).decode(outputs, metas, PARAMS)
    for det, size in zip(dets, CASES, strict=True):
        _assert_found(det, CASES[size])


@pytest.mark.parametrize("fmt", ["yolox", "yolov5", "yolov8", "nanodet", "detr"])
def test_boxes_are_clipped_to_the_frame(fmt: str) -> None:
    spec = _spec("stretch" if fmt == "detr" else "letterbox", size_tensor="sizes")
    meta = Preprocessor(spec).meta_for(640, 272)
    # pokes out left and bottom: model input would still show it in the letterbox padding
    boxes = [((-30.0, 150.0, 120.0, 300.0), 5, 0.7)]
    [det] = build_decoder(fmt, spec, C).decode(_encode(fmt, boxes, meta), [meta], PARAMS)
    _assert_found(det, [((0.0, 150.0, 120.0, 272.0), 5, 0.7)])


@pytest.mark.parametrize("fmt", ["yolox", "yolov5", "yolov8", "nanodet"])
def test_class_aware_nms_threshold_allowlist_and_max(fmt: str) -> None:
    spec = _spec()
    meta = Preprocessor(spec).meta_for(640, 272)
    boxes = [
        ((100.0, 40.0, 300.0, 200.0), 2, 0.9),
        ((104.0, 44.0, 304.0, 204.0), 2, 0.7),  # same class, IoU ~0.92: suppressed
        ((102.0, 42.0, 302.0, 202.0), 7, 0.6),  # other class, same place: kept
        ((420.0, 90.0, 600.0, 250.0), 0, 0.5),
        ((450.0, 20.0, 520.0, 80.0), 0, 0.2),  # under the 0.3 threshold
    ]
    decoder = build_decoder(fmt, spec, C)
    outputs = _encode(fmt, boxes, meta)
    [det] = decoder.decode(outputs, [meta], PARAMS)
    _assert_found(det, [boxes[0], boxes[2], boxes[3]])
    allow = DecodeParams(score_threshold=0.3, class_allowlist=frozenset({0, 7}))
    [det] = decoder.decode(outputs, [meta], allow)
    _assert_found(det, [boxes[2], boxes[3]])
    top = DecodeParams(score_threshold=0.1, max_detections=2)
    [det] = decoder.decode(outputs, [meta], top)
    _assert_found(det, [boxes[0], boxes[2]])


def test_detr_has_no_nms_but_threshold_allowlist_and_max() -> None:
    spec = _spec("stretch", size_tensor="sizes")
    meta = Preprocessor(spec).meta_for(640, 272)
    boxes = [
        ((100.0, 40.0, 300.0, 200.0), 2, 0.9),
        ((104.0, 44.0, 304.0, 204.0), 2, 0.7),  # the graph already de-duplicated: kept
        ((420.0, 90.0, 600.0, 250.0), 0, 0.5),
        ((450.0, 20.0, 520.0, 80.0), 0, 0.2),
    ]
    decoder = build_decoder("detr", spec, C)
    outputs = _encode("detr", boxes, meta)
    [det] = decoder.decode(outputs, [meta], PARAMS)
    _assert_found(det, boxes[:3])
    [det] = decoder.decode(outputs, [meta], DecodeParams(class_allowlist=frozenset({0})))
    _assert_found(det, [boxes[2]])
    [det] = decoder.decode(outputs, [meta], DecodeParams(score_threshold=0.1, max_detections=1))
    _assert_found(det, boxes[:1])


def _poison(fmt: str, outputs: dict[str, np.ndarray]) -> int:
    """Put NaN/inf into scores or boxes of three extra candidates; returns how many."""
    if fmt == "yolox":
        raw = outputs["output"]
        raw[0, 3000, 4], raw[0, 3001, 4] = np.nan, np.inf
        raw[0, 3002, 4:6] = (1.0, 0.9)
        raw[0, 3002, 2] = np.nan  # NaN width with a good score
    elif fmt == "yolov5":
        raw = outputs["output0"]
        raw[0, 3000, 4], raw[0, 3001, 5] = np.nan, np.inf
        raw[0, 3001, 4] = 1.0
        raw[0, 3002, :6] = (10.0, 10.0, np.inf, 5.0, 1.0, 0.9)
    elif fmt == "yolov8":
        raw = outputs["output0"]
        raw[0, 10, 3000], raw[0, 11, 3001] = np.nan, np.inf
        raw[0, :5, 3002] = (10.0, np.nan, 5.0, 5.0, 0.9)
    elif fmt == "nanodet":
        outputs["cls_pred_stride_8"][0, 100, 3] = np.nan
        outputs["cls_pred_stride_16"][0, 100, 3] = np.inf
        outputs["cls_pred_stride_32"][0, 100, 3] = 0.9
        outputs["dis_pred_stride_32"][0, 100, 5] = np.nan
    else:
        outputs["scores"][0, 200], outputs["scores"][0, 201] = np.nan, np.inf
        outputs["scores"][0, 202] = 0.9
        outputs["boxes"][0, 202] = (1.0, np.nan, 5.0, 5.0)
    return 3


@pytest.mark.parametrize("fmt", ["yolox", "yolov5", "yolov8", "nanodet", "detr"])
def test_nan_and_inf_are_dropped_and_counted(fmt: str) -> None:
    spec = _spec("stretch" if fmt == "detr" else "letterbox", size_tensor="sizes")
    meta = Preprocessor(spec).meta_for(640, 272)
    outputs = _encode(fmt, CASES[(640, 272)], meta)
    poisoned = _poison(fmt, outputs)
    [det] = build_decoder(fmt, spec, C).decode(outputs, [meta], PARAMS)
    _assert_found(det, CASES[(640, 272)])
    assert det.invalid == poisoned


def test_detr_labels_outside_the_class_list_are_invalid() -> None:
    spec = _spec("stretch", size_tensor="sizes")
    meta = Preprocessor(spec).meta_for(640, 272)
    outputs = _encode("detr", CASES[(640, 272)], meta)
    outputs["labels"][0, 250], outputs["scores"][0, 250] = 91, 0.9
    outputs["labels"][0, 251], outputs["scores"][0, 251] = -1, 0.9
    outputs["boxes"][0, 250:252] = (10.0, 10.0, 50.0, 50.0)
    [det] = build_decoder("detr", spec, C).decode(outputs, [meta], PARAMS)
    _assert_found(det, CASES[(640, 272)])
    assert det.invalid == 2


def test_detections_helpers() -> None:
    spec = _spec()
    meta = Preprocessor(spec).meta_for(640, 272)
    boxes = [*CASES[(640, 272)], ((10.0, 10.0, 50.0, 60.0), 0, 0.6)]
    [det] = build_decoder("yolov8", spec, C).decode(_encode("yolov8", boxes, meta), [meta], PARAMS)
    np.testing.assert_allclose(det.box_norm()[0], [100 / 640, 40 / 272, 300 / 640, 200 / 272])
    assert det.counts(C)[[0, 2]].tolist() == [2, 1]
    labels = [f"c{i}" for i in range(C)]
    assert det.counts_by_label(labels) == {"c0": 2, "c2": 1}
    rec = det.to_records(labels)[0]
    assert rec["label"] == "c2"
    assert rec["class_id"] == 2
    assert rec["box_xyxy"] == [100, 40, 300, 200]


# -- shape checks against the real models ---------------------------------------------------------


def _specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """What the real engine reports for the model: the specs a pipeline checks at load."""
    config = OnnxRuntimeConfig(type="onnxruntime", intra_op_threads=1, warmup_runs=0)
    with build_engine(config, path, cpus=frozenset(os.sched_getaffinity(0))) as engine:
        return engine.outputs, engine.inputs


REAL = {
    "yolox": ("yolox_nano_416.onnx", _spec()),
    "detr": (
        "deimv2_hgnetv2_femto_coco.onnx",
        _spec("stretch", size_tensor="orig_target_sizes"),
    ),
    "nanodet": ("nanodet_m_416.onnx", _spec("letterbox", "center")),
}


@pytest.fixture(scope="module")
def real_specs(models_dir: Path) -> dict[str, tuple[tuple[TensorSpec, ...], ...]]:
    return {fmt: _specs(models_dir / file) for fmt, (file, _) in REAL.items()}


@pytest.mark.parametrize("fmt", list(REAL))
def test_real_models_pass_their_decoder_check(fmt: str, real_specs: Any) -> None:
    outputs, inputs = real_specs[fmt]
    build_decoder(fmt, REAL[fmt][1], C).check_outputs(outputs, inputs)


@pytest.mark.parametrize(
    ("fmt", "model", "words"),
    [
        ("yolov8", "yolox", ["[B, 84, 3549]", "[1, 3549, 85]"]),
        ("yolov5", "yolox", ["[B, 10647, 85]", "[1, 3549, 85]"]),
        ("yolox", "nanodet", ["one output", "cls_pred_stride_8 [1, 2704, 80]"]),
        ("yolox", "detr", ["one output", "labels [?, ?]"]),
        ("nanodet", "yolox", ["cls_pred_stride_S", "output [1, 3549, 85]"]),
        ("detr", "yolox", ["missing labels, boxes, scores", "output [1, 3549, 85]"]),
        ("yolov8", "nanodet", ["one output", "dis_pred_stride_32 [1, 169, 32]"]),
    ],
)
def test_wrong_decoder_names_expected_and_actual(
    fmt: str, model: str, words: list[str], real_specs: Any
) -> None:
    outputs, inputs = real_specs[model]
    spec = _spec("stretch", size_tensor="orig_target_sizes") if fmt == "detr" else _spec()
    with pytest.raises(DecoderMismatchError) as info:
        build_decoder(fmt, spec, C).check_outputs(outputs, inputs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_wrong_input_size_or_class_count_is_a_mismatch(real_specs: Any) -> None:
    outputs, inputs = real_specs["yolox"]
    small = InputSpec(width=320, height=320, color="bgr", resize="letterbox", tensor="images")
    with pytest.raises(DecoderMismatchError, match=r"\[B, 2100, 85\].*\[1, 3549, 85\]"):
        build_decoder("yolox", small, C).check_outputs(outputs, inputs)
    with pytest.raises(DecoderMismatchError, match=r"\[B, 3549, 25\]"):
        build_decoder("yolox", _spec(), 20).check_outputs(outputs, inputs)
    n_out, n_in = real_specs["nanodet"]
    with pytest.raises(DecoderMismatchError, match=r"\[B, 2704, 20\].*\[1, 2704, 80\]"):
        build_decoder("nanodet", _spec(), 20).check_outputs(n_out, n_in)


def test_detr_size_input_must_exist(real_specs: Any) -> None:
    outputs, inputs = real_specs["detr"]
    decoder = build_decoder("detr", _spec("stretch", size_tensor="target_sizes"), C)
    with pytest.raises(DecoderMismatchError, match=r"'target_sizes'.*orig_target_sizes"):
        decoder.check_outputs(outputs, inputs)


def test_detr_needs_size_tensor_and_plain_resize() -> None:
    with pytest.raises(DecoderMismatchError, match="size_tensor"):
        build_decoder("detr", _spec("stretch"), C)
    with pytest.raises(DecoderMismatchError, match="stretch"):
        build_decoder("detr", _spec("letterbox", size_tensor="sizes"), C)


def test_decode_rejects_arrays_of_the_wrong_shape() -> None:
    spec = _spec()
    meta = Preprocessor(spec).meta_for(640, 272)
    bad = {"output": np.zeros((1, 3549, 84), np.float32)}
    with pytest.raises(DecoderMismatchError, match="85"):
        build_decoder("yolox", spec, C).decode(bad, [meta], PARAMS)
    short = {"output": np.zeros((1, 3549, 85), np.float32)}
    with pytest.raises(DecoderMismatchError, match="2 frame"):
        build_decoder("yolox", spec, C).decode(short, [meta, meta], PARAMS)


def test_registry_and_params_validation() -> None:
    assert set(DECODERS) == {"yolox", "detr", "nanodet", "yolov8", "yolov5"}
    with pytest.raises(PipelineConfigError, match=r"unknown decoder 'ssd'.*yolox"):
        build_decoder("ssd", _spec(), C)
    with pytest.raises(PipelineConfigError, match="score_threshold"):
        DecodeParams(score_threshold=1.5)
    with pytest.raises(PipelineConfigError, match="nms_iou"):
        DecodeParams(nms_iou=0.0)
    with pytest.raises(PipelineConfigError, match="max_detections"):
        DecodeParams(max_detections=0)
