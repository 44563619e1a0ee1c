"""What every output decoder shares: the protocol, decode parameters and the common tail.

A decoder turns a model's raw output tensors into one ``Detections`` per frame:

1. ``check_outputs(outputs, inputs)`` at load time: the engine's tensor specs must be the ones
   the format produces for the manifest's input size and class count, else
   ``DecoderMismatchError`` naming the expected and the actual shapes.
2. ``extra_inputs(metas, out)``: inputs the model needs besides the image (DETR's original
   sizes); empty for the others.
3. ``decode(outputs, metas, params)``: per frame, candidate scores -> drop NaN/inf (counted) ->
   score threshold -> class allow-list -> boxes to source pixels (letterbox undone), clipped ->
   class-aware NMS (formats that need it) -> at most ``max_detections``, best first.

The heavy per-anchor work (max over classes, products with objectness) runs on the whole output
with NumPy; everything after the score threshold only touches the few surviving candidates.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from engines.base import TensorSpec
from engines.manifest import InputSpec
from pipelines.errors import DecoderMismatchError, PipelineConfigError
from pipelines.vision.detections import Detections, empty_detections
from pipelines.vision.nms import batched_nms
from pipelines.vision.preprocess import FrameMeta

__all__ = [
    "STRIDES_P5",
    "STRIDES_P6",
    "BaseDecoder",
    "DecodeParams",
    "Decoder",
    "anchor_count",
    "anchor_counts",
    "check_runtime_shape",
    "check_shape",
    "describe",
    "finish",
    "objectness_candidates",
    "pick_anchors",
    "select_scores",
    "single_output",
    "single_output_spec",
    "xywh_to_xyxy",
]

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DecodeParams:
    """Post-processing settings of one pipeline."""

    score_threshold: float = 0.3
    """Keep candidates with a score strictly above this."""
    nms_iou: float = 0.45
    """Class-aware NMS: drop a box overlapping a better same-class box by more than this."""
    max_detections: int = 100
    """Keep at most this many detections per frame (best first)."""
    class_allowlist: frozenset[int] | None = None
    """Class ids to keep (``None``: all)."""
    _allowed: npt.NDArray[np.int32] | None = field(
        init=False, repr=False, compare=False, default=None
    )
    """``class_allowlist`` as a read-only array for ``np.isin``, built once here, not per frame."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold < 1.0:
            msg = f"score_threshold {self.score_threshold} is outside [0, 1)"
            raise PipelineConfigError(msg)
        if not 0.0 < self.nms_iou <= 1.0:
            raise PipelineConfigError(f"nms_iou {self.nms_iou} is outside (0, 1]")
        if self.max_detections < 1:
            raise PipelineConfigError(f"max_detections {self.max_detections} must be >= 1")
        if self.class_allowlist is not None:
            allowed = np.fromiter(self.class_allowlist, dtype=np.int32)
            allowed.flags.writeable = False
            object.__setattr__(self, "_allowed", allowed)  # frozen: set once, at construction


@runtime_checkable
class Decoder(Protocol):
    """One output format (see the module docstring)."""

    name: str
    num_classes: int

    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None:
        """Raise ``DecoderMismatchError`` unless the model's tensors fit this format."""
        ...

    def extra_input_names(self) -> tuple[str, ...]:
        """Names of the non-image inputs ``extra_inputs`` fills."""
        ...

    def extra_inputs(
        self,
        metas: Sequence[FrameMeta],
        out: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Non-image inputs for a batch; written into ``out`` (engine buffers) when given."""
        ...

    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]:
        """One ``Detections`` per entry of ``metas`` (batch slots 0..len(metas)-1)."""
        ...


class BaseDecoder(abc.ABC):
    """Shared defaults: no extra inputs. Subclasses set ``name`` and ``num_classes``."""

    name: str
    num_classes: int

    @abc.abstractmethod
    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None: ...

    def extra_input_names(self) -> tuple[str, ...]:
        return ()

    def extra_inputs(
        self,
        metas: Sequence[FrameMeta],  # noqa: ARG002 - the protocol's signature
        out: Mapping[str, npt.NDArray[Any]] | None = None,  # noqa: ARG002
    ) -> dict[str, npt.NDArray[Any]]:
        return {}

    @abc.abstractmethod
    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]: ...


# -- shape checks --------------------------------------------------------------------------------


def anchor_count(width: int, height: int, strides: Iterable[int]) -> int:
    """Grid cells over all strides for an input of ``width`` x ``height`` (ceil division)."""
    return sum(-(-width // s) * -(-height // s) for s in strides)


STRIDES_P5 = (8, 16, 32)
"""Strides of a P5 detection head (YOLOv5/v8/11)."""
STRIDES_P6 = (8, 16, 32, 64)
"""Strides of a P6 detection head (an extra stride-64 level)."""


def anchor_counts(spec: InputSpec, per_cell: int = 1) -> tuple[int, int]:
    """Anchors of a P5 and of a P6 head for ``spec``'s input size, ``per_cell`` per grid cell."""
    p5 = per_cell * anchor_count(spec.width, spec.height, STRIDES_P5)
    p6 = per_cell * anchor_count(spec.width, spec.height, STRIDES_P6)
    return p5, p6


def pick_anchors(shape: Sequence[int], axis: int, counts: tuple[int, int]) -> int:
    """The anchor count of a rank-3 output: ``shape[axis]`` if it is one of ``counts``
    (P5 or P6), else the P5 count (the shape check then names the mismatch)."""
    if len(shape) == 3 and shape[axis] in counts:
        return int(shape[axis])
    return counts[0]


def describe(specs: Iterable[TensorSpec]) -> str:
    """``name [d0, d1, ...]`` list of tensors, ``?`` for dynamic dims."""
    parts = [f"{s.name} {_dims(s.shape)}" for s in specs]
    return ", ".join(parts) if parts else "none"


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def check_shape(decoder: str, spec: TensorSpec, expected: Sequence[int], meaning: str) -> None:
    """Raise ``DecoderMismatchError`` unless ``spec.shape`` fits ``expected`` (-1: any)."""
    actual = spec.shape
    ok = len(actual) == len(expected) and all(
        e < 0 or a < 0 or a == e for a, e in zip(actual, expected, strict=False)
    )
    if not ok:
        exp = "[" + ", ".join("B" if d < 0 else str(d) for d in expected) + "]"
        msg = (
            f"decoder '{decoder}' expects output '{spec.name}' shaped {exp} ({meaning}), "
            f"the model has {_dims(actual)}: check the manifest's decoder, input size and classes"
        )
        raise DecoderMismatchError(msg)


def check_runtime_shape(
    decoder: str, name: str, array: npt.NDArray[Any], expected: Sequence[int], batch: int
) -> None:
    """Cheap per-call guard: the array an engine returned has the checked shape."""
    shape = array.shape
    ok = (
        len(shape) == len(expected)
        and shape[0] >= batch
        and all(e < 0 or a == e for a, e in zip(shape[1:], expected[1:], strict=False))
    )
    if not ok:
        exp = "[" + ", ".join("B" if d < 0 else str(d) for d in expected) + "]"
        msg = (
            f"decoder '{decoder}' got output '{name}' shaped {_dims(shape)} for {batch} frame(s), "
            f"expected {exp}"
        )
        raise DecoderMismatchError(msg)


# -- the common tail -----------------------------------------------------------------------------


def select_scores(scores: FloatArray, threshold: float) -> tuple[npt.NDArray[np.intp], int]:
    """Indices of finite scores above ``threshold``, and how many scores were NaN/inf."""
    finite = np.isfinite(scores)
    invalid = int(scores.shape[0] - np.count_nonzero(finite))
    with np.errstate(invalid="ignore"):
        keep = np.flatnonzero(finite & (scores > threshold))
    return keep, invalid


def objectness_candidates(
    pred: FloatArray, threshold: float
) -> tuple[npt.NDArray[np.intp], FloatArray, npt.NDArray[np.intp], int]:
    """Rows ``x, y, w, h, objectness, C class scores`` -> the candidates above ``threshold``.

    Score = objectness x best class score. Class scores are probabilities (<= 1), so only rows
    whose objectness alone beats the threshold can pass: the class maximum is taken on those
    few rows instead of the whole output. Returns (rows, scores, class ids, NaN/inf count).
    """
    obj = pred[:, 4]
    finite = np.isfinite(obj)
    invalid = int(obj.shape[0] - np.count_nonzero(finite))
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero(finite & (obj > threshold))
    cls = pred[rows, 5:]
    class_ids = np.argmax(cls, axis=1)
    with np.errstate(invalid="ignore"):  # inf x 0 -> NaN, counted by select_scores
        scores = (obj[rows] * np.take_along_axis(cls, class_ids[:, None], axis=1)[:, 0]).astype(
            np.float32, copy=False
        )
    keep, bad = select_scores(scores, threshold)
    return rows[keep], scores[keep], class_ids[keep], invalid + bad


def finish(
    boxes: FloatArray,
    scores: FloatArray,
    class_ids: npt.NDArray[np.integer[Any]],
    meta: FrameMeta,
    params: DecodeParams,
    *,
    invalid: int,
    num_classes: int,
    in_input_pixels: bool = True,
    apply_nms: bool = True,
) -> Detections:
    """Candidates (already above the threshold) -> the frame's final ``Detections``.

    ``boxes`` (M, 4) xyxy float32 are in model-input pixels (``in_input_pixels``) or already in
    source pixels; they are modified in place.
    """
    keep = np.isfinite(boxes).all(axis=1) & (class_ids >= 0) & (class_ids < num_classes)
    invalid += int(keep.shape[0] - np.count_nonzero(keep))
    ids: npt.NDArray[np.int32] = class_ids.astype(np.int32, copy=False)
    if params._allowed is not None:
        keep &= np.isin(ids, params._allowed)
    if not keep.all():
        boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
    if scores.shape[0] == 0:
        return empty_detections(meta.width, meta.height, invalid)
    if in_input_pixels:
        meta.to_source(boxes)
    meta.clip(boxes)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not nonempty.all():
        boxes, scores, ids = boxes[nonempty], scores[nonempty], ids[nonempty]
    if apply_nms:
        order = batched_nms(boxes, scores, ids, params.nms_iou, params.max_detections)
    else:
        order = np.argsort(-scores, kind="stable")[: params.max_detections]
    return Detections(
        boxes=np.ascontiguousarray(boxes[order], dtype=np.float32),
        scores=np.ascontiguousarray(scores[order], dtype=np.float32),
        class_ids=np.ascontiguousarray(ids[order], dtype=np.int32),
        width=meta.width,
        height=meta.height,
        invalid=invalid,
    )


def xywh_to_xyxy(cxcywh: FloatArray) -> FloatArray:
    """(M, 4) centre/size boxes -> new (M, 4) float32 corner boxes."""
    out = np.empty((cxcywh.shape[0], 4), dtype=np.float32)
    half_w = cxcywh[:, 2] * 0.5
    half_h = cxcywh[:, 3] * 0.5
    out[:, 0] = cxcywh[:, 0] - half_w
    out[:, 1] = cxcywh[:, 1] - half_h
    out[:, 2] = cxcywh[:, 0] + half_w
    out[:, 3] = cxcywh[:, 1] + half_h
    return out


def single_output(decoder: str, outputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """The only output tensor of a single-output format."""
    if len(outputs) != 1:
        names = ", ".join(outputs) or "none"
        msg = f"decoder '{decoder}' expects exactly one output tensor, got {len(outputs)}: {names}"
        raise DecoderMismatchError(msg)
    return next(iter(outputs.values()))


def single_output_spec(decoder: str, outputs: tuple[TensorSpec, ...], meaning: str) -> TensorSpec:
    """The only output spec of a single-output format (load-time check)."""
    if len(outputs) != 1:
        msg = (
            f"decoder '{decoder}' expects one output ({meaning}), the model has "
            f"{len(outputs)}: {describe(outputs)}: check the manifest's decoder"
        )
        raise DecoderMismatchError(msg)
    return outputs[0]
