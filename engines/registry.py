"""The explicit engine registry: config ``type`` -> factory; runtimes are imported only here.

``build_engine`` is the one way the pipelines get an engine. Importing this module imports no
runtime: ``onnxruntime`` is imported when an ONNX Runtime engine is built, ``tensorrt`` and
``pycuda`` by :func:`load_tensorrt_runtime` when a TensorRT engine is built. So a Raspberry Pi
validates a TensorRT config without TensorRT and only fails (``EngineUnavailableError``, or a
fallback to ONNX Runtime when the config allows it) when it builds one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engines.base import TensorEngine
from engines.config import EngineConfig, OnnxRuntimeConfig, TensorRTConfig
from engines.errors import EngineUnavailableError
from engines.tensorrt import TensorRTRuntime

__all__ = ["ENGINES", "EngineFactory", "build_engine", "load_tensorrt_runtime"]

EngineFactory = Callable[[Any, Path, frozenset[int], Path | None], TensorEngine]
"""``factory(config, model_path, cpus, source_onnx)``."""

_TENSORRT_FIX = (
    "on a Jetson install JetPack's python3-libnvinfer and `pip install 'edge-agent[jetson]'` "
    '(pycuda); elsewhere use engine type = "onnxruntime"'
)


def load_tensorrt_runtime() -> TensorRTRuntime:
    """Import ``tensorrt`` and ``pycuda.driver``; ``EngineUnavailableError`` names the fix."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        msg = f"the TensorRT engine needs the tensorrt module ({exc}): {_TENSORRT_FIX}"
        raise EngineUnavailableError(msg) from exc
    try:
        cuda = importlib.import_module("pycuda.driver")
    except ImportError as exc:
        msg = f"the TensorRT engine needs pycuda ({exc}): {_TENSORRT_FIX}"
        raise EngineUnavailableError(msg) from exc
    return TensorRTRuntime(trt=trt, cuda=cuda)


def _build_onnxruntime(
    config: OnnxRuntimeConfig, model_path: Path, cpus: frozenset[int], source_onnx: Path | None
) -> TensorEngine:
    del source_onnx  # the model file is the ONNX
    try:
        from engines.onnxruntime import OnnxRuntimeEngine  # noqa: PLC0415 - runtime on use
    except ImportError as exc:
        msg = f"the ONNX Runtime engine needs onnxruntime ({exc}): `pip install onnxruntime`"
        raise EngineUnavailableError(msg) from exc
    return OnnxRuntimeEngine(config, model_path, cpus=cpus)


def _build_tensorrt(
    config: TensorRTConfig, model_path: Path, cpus: frozenset[int], source_onnx: Path | None
) -> TensorEngine:
    from engines.tensorrt import open_tensorrt_engine  # noqa: PLC0415 - runtime on use

    return open_tensorrt_engine(
        config,
        model_path,
        cpus=cpus,
        source_onnx=source_onnx,
        runtime_loader=load_tensorrt_runtime,
    )


ENGINES: Mapping[str, EngineFactory] = MappingProxyType(
    {"onnxruntime": _build_onnxruntime, "tensorrt": _build_tensorrt}
)
"""Every engine kind, by the ``type`` key of its config."""


def build_engine(
    config: EngineConfig,
    model_path: Path,
    *,
    cpus: frozenset[int],
    source_onnx: Path | None = None,
) -> TensorEngine:
    """Build the engine ``config`` selects for ``model_path`` with threads sized from ``cpus``.

    ``model_path`` is an ONNX file (ONNX Runtime; TensorRT looks its plan up in the plan store)
    or a ``.plan``/``.engine`` (TensorRT). ``source_onnx`` is the ONNX a TensorRT plan came from,
    used to fall back to ONNX Runtime.
    """
    factory = ENGINES.get(config.type)
    if factory is None:  # only reachable with a config class added to the union but not here
        known = ", ".join(sorted(ENGINES))
        msg = f"engine type {config.type!r} is not registered (known: {known})"
        raise EngineUnavailableError(msg)
    return factory(config, Path(model_path), frozenset(cpus), source_onnx)
