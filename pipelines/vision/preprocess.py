"""Frame -> model input, written straight into the engine's input buffer.

``Preprocessor(spec, batch)`` turns a BGR ``uint8`` frame (H, W, 3) into batch slot ``index`` of
the model input (``x = (pixel * scale - mean) / std`` in the model's channel order and layout),
either letterboxed (aspect kept, padded at the top-left corner or centred) or stretched. It
writes into the buffer it is given (the engine's, pinned on TensorRT) and reuses its own scratch
buffers, one set per source frame size, so a steady stream allocates no frame-sized arrays:
``cv2.resize`` writes into a preallocated ``dst``, then per channel a strided ``np.copyto`` casts
the pixels into their plane of the engine buffer and one in-place multiply and add apply
``scale``/``mean``/``std`` (folded into a gain and a bias); the BGR/RGB swap is free (it only picks
which source channel feeds which plane).

``prepare`` returns a ``FrameMeta``: the source size and the exact affine map between source and
model-input pixels (``x_in = x_src * scale_x + pad_x``) that decoders undo. The scales are the
true ratios of the resized image to the source (``new_w / w``), not a rounded factor, so the
inverse maps the resized image's edges back onto the frame's edges exactly.

A Preprocessor is not thread-safe: one per preprocessing thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from engines.manifest import InputSpec
from pipelines.errors import PreprocessError

__all__ = ["FrameMeta", "Preprocessor"]

_MAX_CACHED_SIZES = 8
_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True)
class FrameMeta:
    """How one source frame was mapped into the model input.

    ``x_in = x_src * scale_x + pad_x`` and ``y_in = y_src * scale_y + pad_y``.
    """

    width: int
    """Source frame width in pixels."""
    height: int
    """Source frame height in pixels."""
    scale_x: float
    """Resized width / source width."""
    scale_y: float
    """Resized height / source height."""
    pad_x: int
    """Left padding in model-input pixels."""
    pad_y: int
    """Top padding in model-input pixels."""

    def to_source(self, boxes: npt.NDArray[np.float32]) -> None:
        """Map (N, 4) xyxy boxes from model-input to source pixels, in place."""
        boxes[:, 0::2] -= self.pad_x
        boxes[:, 0::2] /= self.scale_x
        boxes[:, 1::2] -= self.pad_y
        boxes[:, 1::2] /= self.scale_y

    def to_input(self, boxes: npt.NDArray[np.float32]) -> None:
        """Map (N, 4) xyxy boxes from source to model-input pixels, in place."""
        boxes[:, 0::2] *= self.scale_x
        boxes[:, 0::2] += self.pad_x
        boxes[:, 1::2] *= self.scale_y
        boxes[:, 1::2] += self.pad_y

    def clip(self, boxes: npt.NDArray[np.float32]) -> None:
        """Clip (N, 4) xyxy source-pixel boxes to the frame, in place."""
        np.clip(boxes[:, 0::2], 0.0, float(self.width), out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0.0, float(self.height), out=boxes[:, 1::2])


@dataclass(frozen=True)
class _Plan:
    meta: FrameMeta
    new_w: int
    new_h: int
    resized: npt.NDArray[np.uint8] | None  # scratch for cv2.resize; None when no resize needed


class Preprocessor:
    """Writes model inputs for one model's ``InputSpec`` (see the module docstring)."""

    def __init__(self, spec: InputSpec, batch: int = 1) -> None:
        if batch < 1:
            raise PreprocessError(f"preprocessor batch must be >= 1, got {batch}")
        self.spec = spec
        self.batch = batch
        self.width = spec.width
        self.height = spec.height
        std = np.asarray(spec.std, dtype=np.float64)
        if np.any(std == 0.0):
            raise PreprocessError(f"input spec std {spec.std} has a zero: cannot divide by it")
        mean = np.asarray(spec.mean, dtype=np.float64)
        # x = (p * scale - mean) / std = p * gain + bias, per model channel; pad likewise.
        # Constants per output dtype, so the in-place arithmetic needs no casting buffers.
        gain = spec.scale / std
        bias = -mean / std
        pad = spec.pad_value * gain + bias
        self._consts = {
            dt: ([dt.type(v) for v in gain], [dt.type(v) for v in bias], [dt.type(v) for v in pad])
            for dt in _OUT_DTYPES
        }
        # model channel c reads BGR frame channel _src[c]
        self._src = (0, 1, 2) if spec.color == "bgr" else (2, 1, 0)
        self._plans: OrderedDict[tuple[int, int], _Plan] = OrderedDict()

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of the whole batch input tensor in the spec's layout."""
        if self.spec.layout == "nchw":
            return (self.batch, 3, self.height, self.width)
        return (self.batch, self.height, self.width, 3)

    def meta_for(self, width: int, height: int) -> FrameMeta:
        """The ``FrameMeta`` a ``width`` x ``height`` frame gets (no pixels touched)."""
        if width <= 0 or height <= 0:
            raise PreprocessError(f"frame size {width}x{height} is empty: nothing to prepare")
        return self._plan(width, height).meta

    def prepare(self, frame: Any, out: npt.NDArray[Any], index: int = 0) -> FrameMeta:
        """Write ``frame`` (BGR uint8, H x W x 3) into slot ``index`` of ``out``."""
        self._check_frame(frame)
        self._check_out(out, index)
        height, width = int(frame.shape[0]), int(frame.shape[1])
        plan = self._plan(width, height)
        if plan.resized is None:
            image = frame
        else:
            try:
                image = cv2.resize(
                    frame,
                    (plan.new_w, plan.new_h),
                    dst=plan.resized,
                    interpolation=cv2.INTER_LINEAR,
                )
            except cv2.error as exc:
                msg = f"cannot resize a {width}x{height} frame: {str(exc).strip().splitlines()[-1]}"
                raise PreprocessError(msg) from exc
        meta = plan.meta
        self._write(image, out[index], plan)
        return meta

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check_frame(frame: Any) -> None:
        if not isinstance(frame, np.ndarray):
            raise PreprocessError(f"frame is a {type(frame).__name__}, not a NumPy image array")
        if frame.dtype != np.uint8:
            raise PreprocessError(f"frame dtype is {frame.dtype}, expected uint8 (8-bit BGR)")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise PreprocessError(f"frame shape is {frame.shape}, expected (height, width, 3) BGR")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise PreprocessError(f"frame shape is {frame.shape}: zero-size frame")

    def _check_out(self, out: npt.NDArray[Any], index: int) -> None:
        expected = self.input_shape[1:]
        if out.ndim != 4 or tuple(out.shape[1:]) != expected:
            raise PreprocessError(
                f"input buffer shape is {out.shape}, expected (batch, "
                f"{', '.join(map(str, expected))})"
            )
        if out.dtype not in _OUT_DTYPES:
            raise PreprocessError(f"input buffer dtype is {out.dtype}, expected float32 or float16")
        if not 0 <= index < out.shape[0]:
            raise PreprocessError(
                f"batch slot {index} is outside the buffer's {out.shape[0]} slots"
            )

    def _plan(self, width: int, height: int) -> _Plan:
        key = (width, height)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        spec = self.spec
        if spec.resize == "stretch":
            new_w, new_h, pad_x, pad_y = self.width, self.height, 0, 0
        else:
            ratio = min(self.width / width, self.height / height)
            new_w = min(self.width, max(1, round(width * ratio)))
            new_h = min(self.height, max(1, round(height * ratio)))
            if spec.letterbox_align == "center":
                pad_x, pad_y = (self.width - new_w) // 2, (self.height - new_h) // 2
            else:
                pad_x, pad_y = 0, 0
        meta = FrameMeta(
            width=width,
            height=height,
            scale_x=new_w / width,
            scale_y=new_h / height,
            pad_x=pad_x,
            pad_y=pad_y,
        )
        resized = None
        if (new_w, new_h) != (width, height):
            resized = np.empty((new_h, new_w, 3), np.uint8)
        plan = _Plan(meta=meta, new_w=new_w, new_h=new_h, resized=resized)
        self._plans[key] = plan
        if len(self._plans) > _MAX_CACHED_SIZES:
            self._plans.popitem(last=False)
        return plan

    def _write(self, image: npt.NDArray[np.uint8], slot: npt.NDArray[Any], plan: _Plan) -> None:
        nchw = self.spec.layout == "nchw"
        pad_x, pad_y, new_w, new_h = plan.meta.pad_x, plan.meta.pad_y, plan.new_w, plan.new_h
        x2, y2 = pad_x + new_w, pad_y + new_h
        gains, biases, pads = self._consts[slot.dtype]
        for c in range(3):
            plane = slot[c] if nchw else slot[:, :, c]
            pad = pads[c]
            # padding strips only (top, bottom, left, right); the image area is written below
            if pad_y > 0:
                plane[:pad_y, :] = pad
            if y2 < self.height:
                plane[y2:, :] = pad
            if pad_x > 0:
                plane[pad_y:y2, :pad_x] = pad
            if x2 < self.width:
                plane[pad_y:y2, x2:] = pad
            # uint8 -> float by a strided cast (no buffer), then scale and shift in place
            region = plane[pad_y:y2, pad_x:x2]
            np.copyto(region, image[:, :, self._src[c]], casting="unsafe")
            np.multiply(region, gains[c], out=region)
            np.add(region, biases[c], out=region)
