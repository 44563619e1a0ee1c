"""Build a pipeline from its config: ``build_pipeline(config, ctx)``.

For a vision pipeline this resolves the model (``ctx.resolve_model``), loads the engine on the
inference stage's CPUs, picks the decoder (config override, else the manifest's) and checks at
once that the model's outputs fit it (``DecoderMismatchError`` naming expected and actual
shapes), sizes the batch from the model's input, and creates the sources. Nothing runs until
``start()``; a failure here closes whatever was already loaded.
"""

from __future__ import annotations

import logging

from engines.base import TensorEngine, TensorSpec
from engines.registry import build_engine
from pipelines.base import Pipeline, PipelineContext
from pipelines.config import LlmPipelineConfig, PipelineConfig, VisionPipelineConfig
from pipelines.errors import DecoderMismatchError, PipelineConfigError
from pipelines.vision.decoders import build_decoder
from pipelines.vision.pipeline import VisionPipeline
from pipelines.vision.preprocess import Preprocessor
from pipelines.vision.sources import build_source

__all__ = ["build_pipeline", "build_vision_pipeline", "plan_batch"]

_log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 8
"""Largest batch chosen automatically for a model with a dynamic batch dimension."""


def build_pipeline(config: PipelineConfig, ctx: PipelineContext) -> Pipeline:
    """The pipeline for one ``[[pipelines]]`` entry (not started)."""
    if isinstance(config, VisionPipelineConfig):
        return build_vision_pipeline(config, ctx)
    if isinstance(config, LlmPipelineConfig):
        from pipelines.llm.build import build_llm_pipeline  # noqa: PLC0415 - llama.cpp on use

        return build_llm_pipeline(config, ctx)
    raise PipelineConfigError(  # pragma: no cover - every member of the union is handled
        f"pipeline type {getattr(config, 'type', '?')!r} is not supported"
    )


def plan_batch(image: TensorSpec, requested: int | None, sources: int) -> tuple[int, bool]:
    """(batch size, dynamic?) for the image input ``image``.

    A fixed batch dimension is used as is (a different ``batch_size`` is a config error); a
    dynamic one takes ``batch_size``, else the number of sources (at most ``MAX_AUTO_BATCH``).
    """
    dim = image.shape[0] if image.shape else 1
    if dim > 0:
        if requested is not None and requested != dim:
            raise PipelineConfigError(
                f"batch_size {requested} does not fit the model: input '{image.name}' has a "
                f"fixed batch of {dim} (remove batch_size, or export the model with a dynamic "
                "or larger batch)"
            )
        return dim, False
    if requested is not None:
        return requested, True
    return max(1, min(sources, MAX_AUTO_BATCH)), True


def build_vision_pipeline(config: VisionPipelineConfig, ctx: PipelineContext) -> VisionPipeline:
    model = ctx.resolve_model(config.model)
    manifest = model.manifest
    if manifest.kind != "detector" or manifest.input is None:
        raise PipelineConfigError(
            f"pipeline {config.name}: model {manifest.name!r} is a {manifest.kind} without an "
            "[input] spec; a vision pipeline needs a detector manifest"
        )
    decoder_name = config.decoder or manifest.decoder
    if decoder_name is None:
        raise PipelineConfigError(
            f"pipeline {config.name}: model {manifest.name!r} names no decoder; set `decoder`"
        )
    labels = model.labels
    if not labels:
        raise PipelineConfigError(
            f"pipeline {config.name}: model {manifest.name!r} has no class labels in its manifest"
        )
    spec = manifest.input
    engine = build_engine(config.engine, model.path, cpus=ctx.cpus_for(config.stages.inference))
    try:
        decoder = build_decoder(decoder_name, spec, len(labels))
        decoder.check_outputs(engine.outputs, engine.inputs)
        image = _image_input(engine, spec.tensor, spec.width, spec.height, spec.layout)
        batch, dynamic = plan_batch(image, config.batch_size, len(config.sources))
        preprocessor = Preprocessor(spec, batch)
        names = config.source_names()
        sources = [
            build_source(name, source, ctx.resolve_data)
            for name, source in zip(names, config.sources, strict=True)
        ]
        pipeline = VisionPipeline(
            config,
            ctx,
            engine=engine,
            decoder=decoder,
            preprocessor=preprocessor,
            sources=sources,
            labels=labels,
            batch_size=batch,
            dynamic_batch=dynamic,
        )
    except BaseException:
        engine.close()
        raise
    _log.info(
        "pipeline %s: %s (%s decoder) batch %d%s, %d source(s), policy %s",
        config.name,
        manifest.name,
        decoder_name,
        batch,
        " (dynamic)" if dynamic else "",
        len(sources),
        config.policy,
    )
    return pipeline


def _image_input(
    engine: TensorEngine, tensor: str, width: int, height: int, layout: str
) -> TensorSpec:
    """The engine's image input named by the manifest, checked against the manifest's size."""
    specs = {s.name: s for s in engine.inputs}
    image = specs.get(tensor)
    listing = ", ".join(f"{s.name} {list(s.shape)}" for s in engine.inputs)
    if image is None:
        raise DecoderMismatchError(
            f"the manifest's input tensor {tensor!r} is not an input of the model "
            f"(inputs: {listing}): fix `[input] tensor` in the manifest"
        )
    expected = (3, height, width) if layout == "nchw" else (height, width, 3)
    actual = image.shape[1:]
    if len(image.shape) != 4 or any(
        a >= 0 and a != e for a, e in zip(actual, expected, strict=True)
    ):
        raise DecoderMismatchError(
            f"model input {tensor!r} is shaped {list(image.shape)}, the manifest expects "
            f"[B, {', '.join(map(str, expected))}] ({layout}): fix the manifest's [input] size"
        )
    return image
