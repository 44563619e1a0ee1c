"""ONNX Runtime engine: IOBinding into engine-owned buffers, pinned thread pool, submit/collect.

Steady state allocates no arrays: every slot owns its input buffers (``input_buffer``) and its
output arrays, both bound once through ``OrtValue.ortvalue_from_numpy`` (which wraps CPU numpy
memory without copying) and an ``IOBinding``; ``run_with_iobinding`` writes the results straight
into the slot's output arrays. An input array handed to ``submit``/``infer`` is wrapped the same
way (zero-copy) and re-bound only when a different array object arrives.

ORT's ``run`` is synchronous. ``submit`` hands the slot to one worker thread per engine (pinned to
the stage's CPUs; ORT releases the GIL while it runs) so the caller can fill the next slot's input
buffer meanwhile; ``collect`` waits for the slot's event. ``infer`` with nothing in flight runs
inline on the calling thread and skips the hand-off. See docs/engines.md.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from engines.affinity import format_cpulist, pin_current_thread, thread_count
from engines.base import TensorEngine, TensorSpec, Ticket
from engines.errors import (
    AffinityError,
    EngineClosedError,
    InferenceError,
    InferenceTimeoutError,
    InputSpecError,
    ModelFormatError,
    ModelLoadError,
    ProviderError,
)
from engines.onnxruntime_config import OnnxRuntimeConfig
from engines.slots import (
    SlotRing,
    check_array,
    check_model_file,
    check_open,
    find_input,
    shape_text,
)

__all__ = ["OnnxRuntimeEngine", "intra_op_affinities"]

_log = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_WORKER_POLL_S = 0.5
_JOIN_TIMEOUT_S = 30.0

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_SEVERITY = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "fatal": 4}
_ORT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}
_PULL_FIX = "pull it again with `edge-agent models pull NAME` (or `models verify`) or fix the path"


def intra_op_affinities(cpus: frozenset[int], threads: int) -> str | None:
    """ORT's ``session.intra_op_thread_affinities`` value for ``threads`` over ``cpus``.

    ORT creates ``threads - 1`` pool threads (the calling thread is the first one and keeps the
    stage's own mask); each gets one CPU of the set, starting after the first, in 1-based logical
    processor numbers as ORT expects (``"2;3"``). ``None`` when pinning adds nothing: a single
    thread or a single CPU (threads inherit the creating thread's mask anyway).
    """
    if threads < 2 or len(cpus) < 2:
        return None
    ordered = sorted(cpus)
    picks = [ordered[(index + 1) % len(ordered)] + 1 for index in range(threads - 1)]
    return ";".join(str(cpu) for cpu in picks)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class _Slot:
    """One buffer set: inputs, outputs and the IOBinding that points ORT at them."""

    binding: Any
    inputs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    bound: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    bound_values: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    output_values: dict[str, Any] = field(default_factory=dict)
    shape_key: tuple[tuple[int, ...], ...] = ()
    resolved_key: tuple[tuple[int, ...], ...] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class OnnxRuntimeEngine(TensorEngine):
    """A model loaded in ONNX Runtime. Build it through ``engines.registry.build_engine``."""

    def __init__(
        self,
        config: OnnxRuntimeConfig,
        model_path: Path,
        *,
        cpus: frozenset[int],
        fallback_from: Mapping[str, Any] | None = None,
    ) -> None:
        self._config = config
        self._path = Path(model_path)
        self._cpus = frozenset(cpus)
        self._fallback_from = dict(fallback_from) if fallback_from else None
        self._closed = False
        self._lock = threading.Lock()
        self._calls = 0
        self._profile_file: str | None = None
        self._worker: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        self._worker_note: str | None = None

        check_model_file(self._path, fix=_PULL_FIX)
        self._providers, self._fallbacks = self._choose_providers()
        self._threads = config.intra_op_threads or thread_count(self._cpus)
        self._affinity = intra_op_affinities(self._cpus, self._threads)
        self._session = self._open_session()
        self._used = list(self._session.get_providers())
        for requested in self._providers:
            if requested not in self._used:
                self._fallbacks.append(
                    {"provider": requested, "reason": "not usable by this session"}
                )
        self._inputs = tuple(self._spec(arg) for arg in self._session.get_inputs())
        self._outputs = tuple(self._spec(arg) for arg in self._session.get_outputs())
        self._input_index = {spec.name: spec for spec in self._inputs}
        self._run_options = ort.RunOptions()
        self._ring = SlotRing(config.slots)
        self._slots = [_Slot(binding=self._session.io_binding()) for _ in range(config.slots)]
        self._warmed: set[tuple[tuple[int, ...], ...]] = set()
        if all(not spec.is_dynamic for spec in self._inputs):
            self._warm_up(self._slots[0])

    # -- loading ---------------------------------------------------------------------------

    def _choose_providers(self) -> tuple[list[str], list[dict[str, str]]]:
        available = set(ort.get_available_providers())
        requested = list(self._config.providers)
        first = requested[0]
        if self._config.require_provider and first not in available:
            msg = (
                f"execution provider {first} required for {self._path} is not in this "
                f"onnxruntime build (available: {', '.join(sorted(available))}): install the "
                "matching onnxruntime package or set require_provider = false"
            )
            raise ProviderError(msg)
        chosen: list[str] = [name for name in requested if name in available]
        fallbacks = [
            {"provider": name, "reason": "not in this onnxruntime build"}
            for name in requested
            if name not in available
        ]
        if not chosen:
            chosen = [_CPU]
            fallbacks.append({"provider": _CPU, "reason": "used because no requested one exists"})
        return chosen, fallbacks

    def _session_options(self) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = _GRAPH_LEVELS[self._config.graph_optimization]
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = _SEVERITY[self._config.log_severity]
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self._config.allow_spinning else "0"
        )
        if self._affinity is not None:
            options.add_session_config_entry("session.intra_op_thread_affinities", self._affinity)
        if self._config.profile_path is not None:
            self._config.profile_path.parent.mkdir(parents=True, exist_ok=True)
            options.enable_profiling = True
            options.profile_file_prefix = str(self._config.profile_path)
        return options

    def _open_session(self) -> Any:
        try:
            return ort.InferenceSession(
                str(self._path), sess_options=self._session_options(), providers=self._providers
            )
        except Exception as exc:
            text = _one_line(exc)
            if "PROTOBUF" in text or "No graph was found" in text or "INVALID_ARGUMENT" in text:
                msg = (
                    f"{self._path} is not a valid ONNX model (truncated or corrupt: {text}): "
                    f"{_PULL_FIX}"
                )
                raise ModelFormatError(msg) from exc
            msg = f"ONNX Runtime cannot load {self._path} ({text}): {_PULL_FIX}"
            raise ModelLoadError(msg) from exc

    def _spec(self, arg: Any) -> TensorSpec:
        dtype = _ORT_TYPES.get(str(arg.type))
        if dtype is None:
            msg = (
                f"{self._path}: tensor {arg.name!r} has type {arg.type}, which this engine does "
                "not support: export the model with plain numeric tensors"
            )
            raise ModelFormatError(msg)
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
        return TensorSpec(name=str(arg.name), shape=shape, dtype=dtype)

    def _warm_up(self, slot: _Slot) -> None:
        for spec in self._inputs:
            if spec.name not in slot.inputs:
                self._slot_buffer(slot, spec, spec.shape)
        self._stage(slot, None)
        for _ in range(self._config.warmup_runs):
            self._run(slot)
        self._warmed.add(slot.shape_key)

    # -- interface ---------------------------------------------------------------------------

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def input_buffer(self, name: str, shape: tuple[int, ...] | None = None) -> npt.NDArray[Any]:
        check_open(self._closed, self._path)
        spec = find_input(self._input_index, name, self._path)
        slot = self._slots[self._ring.require_free()]
        if shape is None:
            current = slot.inputs.get(name)
            if current is not None:
                return current
            if spec.is_dynamic:
                msg = (
                    f"input {name!r} of {self._path} has dynamic dims {shape_text(spec.shape)}: "
                    "pass shape= to input_buffer"
                )
                raise InputSpecError(msg)
            shape = spec.shape
        return self._slot_buffer(slot, spec, tuple(shape))

    def submit(self, inputs: Mapping[str, npt.NDArray[Any]] | None = None) -> Ticket:
        with self._lock:
            check_open(self._closed, self._path)
            slot = self._slots[self._ring.require_free()]
            self._stage(slot, inputs)
            self._maybe_warm(slot)
            ticket = self._ring.issue()
            slot.done.clear()
            slot.error = None
            self._start_worker()
            self._jobs.put(slot)
            return ticket

    def collect(
        self, ticket: Ticket, timeout_s: float | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        with self._lock:
            check_open(self._closed, self._path)
            self._ring.check(ticket)
            slot = self._slots[ticket.slot]
        if not slot.done.wait(timeout_s):
            msg = (
                f"inference of {self._path} (ticket #{ticket.sequence}) did not finish within "
                f"{timeout_s} s: collect again with a longer timeout"
            )
            raise InferenceTimeoutError(msg)
        with self._lock:
            self._ring.release(ticket)
        if slot.error is not None:
            error, slot.error = slot.error, None
            raise self._translate(error) from error
        return slot.outputs

    def infer(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        with self._lock:
            check_open(self._closed, self._path)
            if self._ring.in_flight == 0:
                slot = self._slots[self._ring.require_free()]
                self._stage(slot, inputs)
                self._maybe_warm(slot)
                try:
                    self._run(slot)
                except Exception as exc:
                    raise self._translate(exc) from exc
                return slot.outputs
        return self.collect(self.submit(inputs))

    def status(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "model": str(self._path),
            "provider": self._used[0] if self._used else None,
            "providers": list(self._used),
            "requested_providers": list(self._config.providers),
            "fallbacks": [dict(item) for item in self._fallbacks],
            "fallback_from": dict(self._fallback_from) if self._fallback_from else None,
            "intra_op_threads": self._threads,
            "cpus": format_cpulist(self._cpus),
            "thread_affinities": self._affinity,
            "graph_optimization": self._config.graph_optimization,
            "slots": self._ring.count,
            "in_flight": self._ring.in_flight,
            "calls": self._calls,
            "worker": self._worker_note,
            "profile_file": self._profile_file,
            "closed": self._closed,
        }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        worker = self._worker
        if worker is not None:
            self._jobs.put(None)
            worker.join(_JOIN_TIMEOUT_S)
            if worker.is_alive():
                _log.warning("inference worker of %s did not stop within %s s", self._path, 30)
        if self._config.profile_path is not None:
            self._profile_file = str(self._session.end_profiling())
        for slot in self._slots:  # output arrays already handed out stay valid numpy arrays
            slot.binding.clear_binding_inputs()
            slot.binding.clear_binding_outputs()
            slot.bound_values.clear()
            slot.output_values.clear()
        self._slots = []
        self._session = None

    # -- internals ---------------------------------------------------------------------------

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        fits = len(shape) == len(spec.shape)
        if fits:  # a plain loop: this runs on every call (no generator objects)
            for size, want in zip(shape, spec.shape, strict=True):
                if size <= 0 or (want >= 0 and size != want):
                    fits = False
                    break
        if not fits:
            msg = (
                f"input {spec.name!r} of {self._path} got shape {shape_text(shape)}, the model "
                f"wants {shape_text(spec.shape)} (-1 = any size): resize in preprocessing"
            )
            raise InputSpecError(msg)

    def _slot_buffer(
        self, slot: _Slot, spec: TensorSpec, shape: tuple[int, ...]
    ) -> npt.NDArray[Any]:
        self._check_shape(spec, shape)
        current = slot.inputs.get(spec.name)
        if current is not None and current.shape == shape:
            return current
        buffer = np.zeros(shape, dtype=spec.dtype)
        slot.inputs[spec.name] = buffer
        return buffer

    def _stage(self, slot: _Slot, inputs: Mapping[str, npt.NDArray[Any]] | None) -> None:
        """Validate the inputs and bind them to ``slot`` (zero-copy where possible)."""
        given = inputs or {}
        for name in given:
            find_input(self._input_index, name, self._path)
        shapes: list[tuple[int, ...]] = []
        for spec in self._inputs:
            array = given.get(spec.name)
            if array is None:
                array = slot.inputs.get(spec.name)
                if array is None:
                    msg = (
                        f"no data for input {spec.name!r} of {self._path}: pass it to "
                        f"submit()/infer() or fill input_buffer({spec.name!r}, shape)"
                    )
                    raise InputSpecError(msg)
            else:
                array = self._accept(slot, spec, array)
            if slot.bound.get(spec.name) is not array:
                value = ort.OrtValue.ortvalue_from_numpy(array)
                slot.binding.bind_ortvalue_input(spec.name, value)
                slot.bound[spec.name] = array
                slot.bound_values[spec.name] = value
            shapes.append(array.shape)
        slot.shape_key = tuple(shapes)

    def _accept(self, slot: _Slot, spec: TensorSpec, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        check_array(array, spec, self._path)
        self._check_shape(spec, array.shape)
        if array.flags.c_contiguous:
            return array
        buffer = self._slot_buffer(slot, spec, array.shape)
        np.copyto(buffer, array)
        return buffer

    def _maybe_warm(self, slot: _Slot) -> None:
        if slot.shape_key in self._warmed:
            return
        self._warmed.add(slot.shape_key)
        try:
            for _ in range(self._config.warmup_runs):
                self._run(slot)
        except Exception as exc:
            raise self._translate(exc) from exc

    def _resolve_outputs(self, slot: _Slot) -> None:
        """Preallocate and bind the outputs for the slot's current input shapes."""
        binding = slot.binding
        if any(spec.is_dynamic for spec in self._outputs):
            for spec in self._outputs:
                binding.bind_output(spec.name, "cpu")
            self._session.run_with_iobinding(binding, self._run_options)
            shapes = [tuple(value.shape()) for value in binding.get_outputs()]
        else:
            shapes = [spec.shape for spec in self._outputs]
        slot.outputs.clear()
        slot.output_values.clear()
        for spec, shape in zip(self._outputs, shapes, strict=True):
            array = np.empty(shape, dtype=spec.dtype)
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_output(spec.name, value)
            slot.outputs[spec.name] = array
            slot.output_values[spec.name] = value
        slot.resolved_key = slot.shape_key

    def _run(self, slot: _Slot) -> None:
        if slot.resolved_key != slot.shape_key:
            self._resolve_outputs(slot)
        self._session.run_with_iobinding(slot.binding, self._run_options)
        self._calls += 1

    def _translate(self, exc: BaseException) -> Exception:
        if isinstance(exc, InferenceError | EngineClosedError):
            return exc
        msg = (
            f"ONNX Runtime failed running {self._path} ({_one_line(exc)}): check the input "
            "shapes/values against the model"
        )
        return InferenceError(msg)

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        self._worker = threading.Thread(
            target=self._worker_loop, name=f"ort-{self._path.stem}", daemon=True
        )
        self._worker.start()

    def _worker_loop(self) -> None:
        if self._cpus:
            try:
                pin_current_thread(self._cpus)
                self._worker_note = f"pinned to {format_cpulist(self._cpus)}"
            except AffinityError as exc:
                self._worker_note = f"not pinned: {exc}"
                _log.warning("inference worker of %s runs unpinned: %s", self._path, exc)
        while True:
            try:
                slot = self._jobs.get(timeout=_WORKER_POLL_S)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if slot is None:
                return
            try:
                self._run(slot)
            except Exception as exc:  # noqa: BLE001 - handed to collect(), which raises it
                slot.error = exc
            finally:
                slot.done.set()
