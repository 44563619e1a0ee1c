"""Errors raised by the pipelines layer.

Each carries a stable ``reason`` code. Engine errors are not re-wrapped here: a pipeline that
fails to build its engine lets the ``engines.errors.EngineError`` through, so the agent can
report the engine's own reason. Library errors (OpenCV, NumPy) are translated at the boundary.

    PipelineError                     reason
    ├── PipelineConfigError       pipeline_config_invalid settings that cannot work together
    ├── SourceError                   source_failed
    │                             ├── SourceOpenError     source_open_failed
    │                             └── SourceLostError     source_lost
    ├── PreprocessError           preprocess_failed       frame cannot be prepared (zero size, ...)
    ├── DecoderError                  decoder_failed
    │                             └── DecoderMismatchErrordecoder_mismatch
    ├── SinkError                 sink_failed             a result sink could not take a result
    ├── PipelineBusyError         pipeline_busy           request queue full (LLM): retry later
    └── PipelineStateError        pipeline_state_invalid  start/stop in the wrong state
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DecoderError",
    "DecoderMismatchError",
    "PipelineBusyError",
    "PipelineConfigError",
    "PipelineError",
    "PipelineStateError",
    "PreprocessError",
    "SinkError",
    "SourceError",
    "SourceLostError",
    "SourceOpenError",
]


class PipelineError(Exception):
    """Base of every pipelines-layer error."""

    reason: ClassVar[str] = "pipeline_error"


class PipelineConfigError(PipelineError):
    reason = "pipeline_config_invalid"


class SourceError(PipelineError):
    reason = "source_failed"


class SourceOpenError(SourceError):
    reason = "source_open_failed"


class SourceLostError(SourceError):
    reason = "source_lost"


class PreprocessError(PipelineError):
    reason = "preprocess_failed"


class DecoderError(PipelineError):
    reason = "decoder_failed"


class DecoderMismatchError(DecoderError):
    reason = "decoder_mismatch"


class SinkError(PipelineError):
    reason = "sink_failed"


class PipelineStateError(PipelineError):
    reason = "pipeline_state_invalid"


class PipelineBusyError(PipelineError):
    reason = "pipeline_busy"
