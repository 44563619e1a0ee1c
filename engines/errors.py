"""Errors raised by the engines layer.

Every error carries a stable ``reason`` code (snake_case) that the agent reports unchanged,
and a one-line message that names the file or setting and the fix. Errors from the runtimes
(ONNX Runtime, TensorRT, pycuda, llama.cpp) are translated at the boundary with
``raise X(...) from exc``; nothing above this layer sees a runtime's own exception type.

    EngineError                       reason
    ├── EngineUnavailableError    engine_unavailable      runtime not installed (tensorrt, ...)
    ├── ProviderError             provider_unavailable    requested execution provider missing
    ├── ModelLoadError                model_load_failed
    │                             ├── ModelFileError      model_file_unreadable
    │                             ├── ModelFormatError    model_format_invalid
    │                             ├── ModelUnsupportedError model_unsupported  (a GGUF type
    │                             │                       this llama.cpp build cannot load)
    │                             └── PlanCompatibilityErrorplan_incompatible
    ├── InferenceError            inference_failed        the runtime failed during a call
    │                             ├── InputSpecError      input_spec_mismatch
    │                             ├── InferenceAbortedError inference_aborted (abort() asked)
    │                             └── InferenceTimeoutError inference_timeout collect()'s
    │                                                     timeout passed first; the ticket is
    │                                                     still outstanding: collect it again
    ├── EngineClosedError         engine_closed           used after close()
    ├── PlanBuildError            plan_build_failed       ONNX -> plan build failed
    ├── AffinityError             affinity_failed         a thread could not be pinned to its CPUs
    └── ModelStoreError               model_store_error
        ├── ManifestError             manifest_invalid        a manifest that does not validate
        ├── ModelNotFoundError        model_not_found         no manifest / no source has the file
        ├── ChecksumMismatchError     checksum_mismatch       size/sha256 differ from manifest
        └── DownloadError             download_failed         a source could not be fetched
            └── DownloadInterruptedError download_interrupted the body ended early or the
                                                              connection dropped; the partial
                                                              file is kept (run it again: resume)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AffinityError",
    "ChecksumMismatchError",
    "DownloadError",
    "DownloadInterruptedError",
    "EngineClosedError",
    "EngineError",
    "EngineUnavailableError",
    "InferenceAbortedError",
    "InferenceError",
    "InferenceTimeoutError",
    "InputSpecError",
    "ManifestError",
    "ModelFileError",
    "ModelFormatError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelStoreError",
    "ModelUnsupportedError",
    "PlanBuildError",
    "PlanCompatibilityError",
    "ProviderError",
]


class EngineError(Exception):
    """Base of every engines-layer error."""

    reason: ClassVar[str] = "engine_error"


class EngineUnavailableError(EngineError):
    reason = "engine_unavailable"


class ProviderError(EngineError):
    reason = "provider_unavailable"


class ModelLoadError(EngineError):
    reason = "model_load_failed"


class ModelFileError(ModelLoadError):
    reason = "model_file_unreadable"


class ModelFormatError(ModelLoadError):
    reason = "model_format_invalid"


class ModelUnsupportedError(ModelLoadError):
    reason = "model_unsupported"


class PlanCompatibilityError(ModelLoadError):
    reason = "plan_incompatible"


class InferenceError(EngineError):
    reason = "inference_failed"


class InputSpecError(InferenceError):
    reason = "input_spec_mismatch"


class InferenceAbortedError(InferenceError):
    reason = "inference_aborted"


class InferenceTimeoutError(InferenceError):
    """``collect(ticket, timeout_s)`` returned before the call finished: slow, not failed (the
    ticket stays outstanding; collect it again)."""

    reason = "inference_timeout"


class EngineClosedError(EngineError):
    reason = "engine_closed"


class PlanBuildError(EngineError):
    reason = "plan_build_failed"


class AffinityError(EngineError):
    reason = "affinity_failed"


class ModelStoreError(EngineError):
    reason = "model_store_error"


class ManifestError(ModelStoreError):
    reason = "manifest_invalid"


class ModelNotFoundError(ModelStoreError):
    reason = "model_not_found"


class ChecksumMismatchError(ModelStoreError):
    reason = "checksum_mismatch"


class DownloadError(ModelStoreError):
    reason = "download_failed"


class DownloadInterruptedError(DownloadError):
    reason = "download_interrupted"
