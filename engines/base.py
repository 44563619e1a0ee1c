"""The tensor engine interface every backend implements (ONNX Runtime, TensorRT).

An engine describes its I/O (``inputs``/``outputs``: names, shapes with dynamic dims as ``-1``,
NumPy dtypes) and runs inference either synchronously (``infer``) or as a submit/collect pair so a
pipeline can prepare frame N+1 while frame N runs. ``close()`` frees every native resource;
engines are context managers. Steady-state calls allocate no new arrays: outputs live in buffers
owned by the engine and stay valid until the next ``collect``/``infer`` on the same slot (copy
them if they must outlive it).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["TensorEngine", "TensorSpec", "Ticket"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: ``-1`` marks a dynamic dimension."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)


@dataclass(frozen=True)
class Ticket:
    """Handle returned by ``submit``; hand it back to ``collect`` exactly once."""

    slot: int
    sequence: int


class TensorEngine(abc.ABC):
    """A loaded model ready to run. Subclasses must be safe to ``close()`` twice."""

    @property
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @abc.abstractmethod
    def input_buffer(self, name: str, shape: tuple[int, ...] | None = None) -> npt.NDArray[Any]:
        """The engine-owned host buffer of input ``name`` for the next ``submit`` (the pinned
        buffer on TensorRT). Preprocessing writes straight into it; ``shape`` selects a
        concrete shape for dynamic inputs."""

    @abc.abstractmethod
    def submit(self, inputs: Mapping[str, npt.NDArray[Any]] | None = None) -> Ticket:
        """Start one inference. ``inputs`` default to the ``input_buffer`` contents."""

    @abc.abstractmethod
    def collect(
        self, ticket: Ticket, timeout_s: float | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Wait for ``ticket`` and return its outputs (engine-owned buffers).

        ``timeout_s`` bounds this wait, not the inference: when it passes first, collect raises
        ``InferenceTimeoutError`` and the ticket stays outstanding (its slot taken), so a slow
        call is collected by calling again; no ticket may be abandoned, or its slot never
        frees."""

    def infer(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Synchronous ``submit`` + ``collect``."""
        return self.collect(self.submit(inputs))

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """JSON-serialisable status: backend, provider actually used, fallbacks, slots."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free every native resource; later calls raise ``EngineClosedError``."""

    def __enter__(self) -> TensorEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
