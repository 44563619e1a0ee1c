"""DETR-style (DEIMv2, RT-DETR exports): ``labels [B, Q]``, ``boxes [B, Q, 4]``, ``scores [B, Q]``.

The exported graph already does the post-processing: it takes the original frame size as a
second input (``orig_target_sizes`` int64 ``[B, 2]`` = width, height; named by the input spec's
``size_tensor``) and returns ``xyxy`` boxes in source pixels, one class per query. So there is no
NMS and nothing to undo except clipping; the input must be a plain resize (a letterbox would
shift the boxes the graph scales by the original size), which ``__init__`` checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import override

from engines.base import TensorSpec
from engines.manifest import InputSpec
from pipelines.errors import DecoderMismatchError
from pipelines.vision.decoders.base import (
    BaseDecoder,
    DecodeParams,
    check_runtime_shape,
    check_shape,
    describe,
    finish,
    select_scores,
)
from pipelines.vision.detections import Detections
from pipelines.vision.preprocess import FrameMeta

__all__ = ["DetrDecoder"]

OUTPUTS = ("labels", "boxes", "scores")


class DetrDecoder(BaseDecoder):
    """Decoder for DETR-style exports (see the module docstring)."""

    name = "detr"

    def __init__(self, spec: InputSpec, num_classes: int) -> None:
        if spec.size_tensor is None:
            raise DecoderMismatchError(
                "decoder 'detr' needs the original-size input: set input.size_tensor in the "
                'manifest (e.g. "orig_target_sizes")'
            )
        if spec.resize != "stretch":
            raise DecoderMismatchError(
                f"decoder 'detr' needs input.resize = \"stretch\" (the graph scales boxes by "
                f'the original size), the manifest says "{spec.resize}"'
            )
        self.num_classes = num_classes
        self.size_tensor = spec.size_tensor

    @override
    def check_outputs(
        self, outputs: tuple[TensorSpec, ...], inputs: tuple[TensorSpec, ...]
    ) -> None:
        by_name = {s.name: s for s in outputs}
        missing = [n for n in OUTPUTS if n not in by_name]
        if missing:
            raise DecoderMismatchError(
                f"decoder 'detr' expects outputs labels [B, Q], boxes [B, Q, 4], scores [B, Q]; "
                f"the model has {describe(outputs)} (missing {', '.join(missing)})"
            )
        check_shape(self.name, by_name["labels"], (-1, -1), "class id per query")
        check_shape(self.name, by_name["boxes"], (-1, -1, 4), "xyxy box per query")
        check_shape(self.name, by_name["scores"], (-1, -1), "score per query")
        sizes = [s for s in inputs if s.name == self.size_tensor]
        if not sizes:
            raise DecoderMismatchError(
                f"decoder 'detr' expects an input '{self.size_tensor}' [B, 2] (original width, "
                f"height), the model's inputs are {describe(inputs)}"
            )
        if len(sizes[0].shape) != 2 or sizes[0].shape[1] not in (-1, 2):
            raise DecoderMismatchError(
                f"decoder 'detr' expects input '{self.size_tensor}' shaped [B, 2], the model "
                f"has {describe(sizes)}"
            )

    @override
    def extra_input_names(self) -> tuple[str, ...]:
        return (self.size_tensor,)

    @override
    def extra_inputs(
        self,
        metas: Sequence[FrameMeta],
        out: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """``size_tensor`` rows = (width, height) per frame; unused batch rows repeat the
        first frame's size so the graph never sees a zero size."""
        if out is not None and self.size_tensor in out:
            sizes = out[self.size_tensor]
        else:
            sizes = np.empty((max(1, len(metas)), 2), dtype=np.int64)
        if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.shape[0] < len(metas):
            raise DecoderMismatchError(
                f"'{self.size_tensor}' buffer is shaped {sizes.shape}, need [>= {len(metas)}, 2]"
            )
        for i, meta in enumerate(metas):
            sizes[i, 0] = meta.width
            sizes[i, 1] = meta.height
        if metas:
            sizes[len(metas) :, 0] = metas[0].width
            sizes[len(metas) :, 1] = metas[0].height
        return {self.size_tensor: sizes}

    @override
    def decode(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        metas: Sequence[FrameMeta],
        params: DecodeParams,
    ) -> list[Detections]:
        missing = [n for n in OUTPUTS if n not in outputs]
        if missing:
            raise DecoderMismatchError(
                f"decoder 'detr' got outputs {', '.join(outputs) or 'none'}; missing "
                f"{', '.join(missing)}"
            )
        labels, boxes, scores = (outputs[n] for n in OUTPUTS)
        batch = len(metas)
        check_runtime_shape(self.name, "scores", scores, (-1, -1), batch)
        queries = scores.shape[1]
        check_runtime_shape(self.name, "labels", labels, (-1, queries), batch)
        check_runtime_shape(self.name, "boxes", boxes, (-1, queries, 4), batch)
        results = []
        for b, meta in enumerate(metas):
            score = scores[b].astype(np.float32, copy=False)
            idx, invalid = select_scores(score, params.score_threshold)
            results.append(
                finish(
                    boxes[b][idx].astype(np.float32, copy=False),
                    score[idx],
                    labels[b][idx],
                    meta,
                    params,
                    invalid=invalid,
                    num_classes=self.num_classes,
                    in_input_pixels=False,
                    apply_nms=False,
                )
            )
        return results
