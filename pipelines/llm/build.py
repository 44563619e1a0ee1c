"""Build an LLM pipeline from its config: resolve the GGUF model, open llama.cpp on the CPUs of
the pipeline's pinning stage, attach the narrator when configured. Nothing runs before
``start()``; a failure here closes the engine again."""

from __future__ import annotations

import logging

from engines.llama import open_llama
from pipelines.base import PipelineContext
from pipelines.errors import PipelineConfigError
from pipelines.llm.config import LlmPipelineConfig
from pipelines.llm.narrator import Narrator
from pipelines.llm.pipeline import LlmPipeline

__all__ = ["build_llm_pipeline"]

_log = logging.getLogger(__name__)


def build_llm_pipeline(config: LlmPipelineConfig, ctx: PipelineContext) -> LlmPipeline:
    model = ctx.resolve_model(config.model)
    manifest = model.manifest
    if manifest.kind != "llm" or manifest.format != "gguf":
        raise PipelineConfigError(
            f"pipeline {config.name}: model {manifest.name!r} is a {manifest.kind} "
            f"({manifest.format}); an LLM pipeline needs an llm manifest with a GGUF file"
        )
    engine = open_llama(config.engine, model.path, cpus=ctx.cpus_for(config.stage))
    try:
        pipeline = LlmPipeline(config, ctx, engine=engine, model=model)
        if config.narrator is not None:
            Narrator(config.narrator, pipeline, ctx.results).attach()
    except BaseException:
        engine.close()
        raise
    _log.info(
        "pipeline %s: %s (%s, n_ctx %d), queue %d%s",
        config.name,
        manifest.name,
        engine.info.quantization,
        engine.n_ctx,
        config.queue_size,
        ", narrator on" if config.narrator is not None else "",
    )
    return pipeline
