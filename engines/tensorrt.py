"""TensorRT 10 engine: page-locked buffers, N slots of (context, stream, event), plan checks.

Only the TensorRT 10 tensor API is used: ``num_io_tensors``, ``get_tensor_name/mode/shape/dtype``,
``get_tensor_profile_shape``, ``set_input_shape``, ``set_tensor_address`` and
``execute_async_v3``. The ``tensorrt`` and ``pycuda.driver`` modules are handed in as a
:class:`TensorRTRuntime` (``engines.registry.load_tensorrt_runtime`` imports the real ones; the
contract tests hand in a double), so this module imports neither.

Every slot owns an ``IExecutionContext``, a ``cuda.Stream``, a ``cuda.Event`` and, per I/O
tensor, a host buffer and a device address sized for the largest shape of the optimisation
profile:

- ``pinned`` (default): ``cuda.pagelocked_empty`` host buffer + ``cuda.mem_alloc`` device buffer;
  submit = ``memcpy_htod_async`` -> ``execute_async_v3`` -> ``memcpy_dtoh_async`` ->
  ``event.record``, all on the slot's stream; collect = ``event.synchronize()``.
- ``mapped``: page-locked host memory allocated with ``host_alloc_flags.DEVICEMAP``; its device
  pointer (``get_device_pointer``) is the tensor address, so no copies at all (zero-copy on
  Jetson's integrated GPU).
- ``pageable``: plain numpy host buffers and synchronous ``memcpy_htod``/``memcpy_dtoh`` around
  the asynchronous execute, for comparison.

``input_buffer`` returns the next slot's host buffer (a view shaped like the requested input), so
preprocessing writes straight into page-locked memory. The CUDA primary context is pushed around
every call, so any thread may drive the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.base import TensorEngine, TensorSpec, Ticket
from engines.errors import (
    EngineUnavailableError,
    InferenceError,
    InferenceTimeoutError,
    InputSpecError,
    ModelFileError,
    ModelLoadError,
    PlanCompatibilityError,
)
from engines.plans import (
    DEVICE_TREE_COMPATIBLE,
    PlanMetadata,
    PlanStore,
    compatibility_problems,
    detect_device,
    plan_key,
)
from engines.slots import (
    SlotRing,
    check_array,
    check_model_file,
    check_open,
    file_sha256,
    find_input,
    shape_text,
)
from engines.tensorrt_config import TensorRTConfig

__all__ = [
    "RuntimeLoader",
    "TensorRTEngine",
    "TensorRTRuntime",
    "make_trt_logger",
    "open_tensorrt_engine",
]

_log = logging.getLogger(__name__)

_POLL_S = 0.001
_REBUILD_FIX = "rebuild it on this device with `edge-agent models build-plan ONNX`"
_PLAN_SUFFIXES = {".plan", ".engine"}


@dataclass(frozen=True)
class TensorRTRuntime:
    """The two runtime modules the engine drives: ``tensorrt`` and ``pycuda.driver``."""

    trt: Any
    cuda: Any
    compatible: Path = DEVICE_TREE_COMPATIBLE


RuntimeLoader = Callable[[], TensorRTRuntime]


def make_trt_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to ``logging`` and keeps the errors for messages."""
    base = trt.ILogger

    class _Logger(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= 1:
                self.errors.append(" ".join(str(msg).split()))
                _log.error("TensorRT: %s", msg)
            elif level == 2:
                _log.warning("TensorRT: %s", msg)
            elif level == 3:
                _log.info("TensorRT: %s", msg)
            else:
                _log.debug("TensorRT: %s", msg)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "TensorRT gave no error message"

    return _Logger()


@dataclass
class _Binding:
    """One I/O tensor of one slot: host memory, device address, shaped views."""

    host: npt.NDArray[Any]
    device: Any
    address: int
    views: dict[tuple[int, ...], npt.NDArray[Any]] = field(default_factory=dict)

    def view(self, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        found = self.views.get(shape)
        if found is None:
            volume = int(np.prod(shape, dtype=np.int64))
            found = self.host[:volume].reshape(shape)
            self.views[shape] = found
        return found


@dataclass
class _Slot:
    context: Any
    stream: Any
    stream_handle: int
    event: Any
    bindings: dict[str, _Binding]
    shapes: dict[str, tuple[int, ...]]
    applied: dict[str, tuple[int, ...]] = field(default_factory=dict)
    result: dict[str, npt.NDArray[Any]] = field(default_factory=dict)


class TensorRTEngine(TensorEngine):
    """A deserialized TensorRT plan with ``config.slots`` in-flight slots."""

    def __init__(
        self,
        config: TensorRTConfig,
        plan_path: Path,
        *,
        runtime: TensorRTRuntime,
        cpus: frozenset[int],
        metadata: PlanMetadata | None = None,
    ) -> None:
        self._config = config
        self._path = Path(plan_path)
        self._trt = runtime.trt
        self._cuda = runtime.cuda
        self._cpus = frozenset(cpus)
        self._metadata = metadata
        self._closed = False
        self._lock = threading.Lock()
        self._calls = 0
        self._slots: list[_Slot] = []
        check_model_file(self._path, fix=_REBUILD_FIX)

        self._device = detect_device(self._cuda, config.device, compatible=runtime.compatible)
        self._trt_version = str(self._trt.__version__)
        if metadata is not None:
            problems = compatibility_problems(
                metadata, trt_version=self._trt_version, device=self._device
            )
            if problems:
                msg = f"plan {self._path} does not fit this device ({'; '.join(problems)}): "
                raise PlanCompatibilityError(msg + _REBUILD_FIX)

        self._cuda_context = self._cuda.Device(config.device).retain_primary_context()
        self._cuda_context.push()
        try:
            self._load()
        except BaseException:
            self._release()
            self._cuda.Context.pop()
            self._cuda_context.detach()
            raise
        self._cuda.Context.pop()

    # -- loading ---------------------------------------------------------------------------

    def _load(self) -> None:
        trt = self._trt
        self._logger = make_trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            msg = f"cannot read plan {self._path} ({exc.strerror or exc}): {_REBUILD_FIX}"
            raise ModelFileError(msg) from exc
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            msg = (
                f"TensorRT {self._trt_version} cannot deserialize plan {self._path} "
                f"({self._logger.last_error()}): it was built by another TensorRT version or GPU "
                f"or is damaged; {_REBUILD_FIX}"
            )
            raise PlanCompatibilityError(msg)
        engine = self._engine
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        self._profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        for index in range(engine.num_io_tensors):
            name = str(engine.get_tensor_name(index))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            spec = TensorSpec(name=name, shape=shape, dtype=dtype)
            (inputs if is_input else outputs).append(spec)
            if is_input and spec.is_dynamic:
                low, opt, high = engine.get_tensor_profile_shape(name, 0)
                self._profiles[name] = (_dims(low), _dims(opt), _dims(high))
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._input_index = {spec.name: spec for spec in inputs}
        self._ring = SlotRing(self._config.slots)
        for index in range(self._config.slots):
            self._make_slot(index)
        for slot in self._slots:
            for _ in range(self._config.warmup_runs):
                self._enqueue(slot)
                slot.event.synchronize()
                self._finish(slot)

    def _make_slot(self, index: int) -> _Slot:
        cuda = self._cuda
        context = self._engine.create_execution_context()
        if context is None:
            msg = (
                f"TensorRT could not create execution context {index} for {self._path} "
                f"({self._logger.last_error()}): lower `slots` or free GPU memory"
            )
            raise ModelLoadError(msg)
        stream = cuda.Stream()
        slot = _Slot(
            context=context,
            stream=stream,
            stream_handle=int(stream.handle),
            event=cuda.Event(),
            bindings={},
            shapes={},
        )
        self._slots.append(slot)  # from here on close() frees whatever gets allocated
        # Size every buffer for the profile's largest shapes, then start at the opt shapes.
        capacity: dict[str, tuple[int, ...]] = {}
        for spec in self._inputs:
            profile = self._profiles.get(spec.name)
            capacity[spec.name] = spec.shape if profile is None else profile[2]
            if profile is not None:
                self._set_shape(slot, spec.name, profile[2])
        for spec in self._outputs:
            capacity[spec.name] = self._context_shape(slot, spec.name)
        for spec in (*self._inputs, *self._outputs):
            binding = self._allocate(spec, capacity[spec.name])
            slot.bindings[spec.name] = binding
            if not context.set_tensor_address(spec.name, binding.address):
                msg = (
                    f"TensorRT refused the address of tensor {spec.name!r} of {self._path} "
                    f"({self._logger.last_error()}): {_REBUILD_FIX}"
                )
                raise ModelLoadError(msg)
        for spec in self._inputs:
            profile = self._profiles.get(spec.name)
            slot.shapes[spec.name] = spec.shape if profile is None else profile[1]
        self._apply_shapes(slot)
        return slot

    def _allocate(self, spec: TensorSpec, shape: tuple[int, ...]) -> _Binding:
        cuda = self._cuda
        volume = max(1, int(np.prod(shape, dtype=np.int64)))
        mode = self._config.memory
        try:
            if mode == "pinned":
                host = cuda.pagelocked_empty((volume,), spec.dtype)
                device = cuda.mem_alloc(host.nbytes)
                address = int(device)
            elif mode == "mapped":
                host = cuda.pagelocked_empty(
                    (volume,), spec.dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP
                )
                device = None
                address = int(host.base.get_device_pointer())
            else:
                host = np.zeros((volume,), dtype=spec.dtype)
                device = cuda.mem_alloc(host.nbytes)
                address = int(device)
        except cuda.Error as exc:
            msg = (
                f"cannot allocate {volume * spec.dtype.itemsize} bytes ({mode}) for tensor "
                f"{spec.name!r} of {self._path} ({exc}): lower `slots` or free GPU memory"
            )
            raise ModelLoadError(msg) from exc
        return _Binding(host=host, device=device, address=address)

    # -- interface ---------------------------------------------------------------------------

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def input_buffer(self, name: str, shape: tuple[int, ...] | None = None) -> npt.NDArray[Any]:
        check_open(self._closed, self._path)
        spec = find_input(self._input_index, name, self._path, prefix="plan ")
        slot = self._slots[self._ring.require_free()]
        if shape is None:
            shape = slot.shapes[name]
        shape = tuple(shape)
        self._check_profile(spec, shape)
        slot.shapes[name] = shape
        return slot.bindings[name].view(shape)

    def submit(self, inputs: Mapping[str, npt.NDArray[Any]] | None = None) -> Ticket:
        with self._lock:
            check_open(self._closed, self._path)
            slot = self._slots[self._ring.require_free()]
            self._stage(slot, inputs or {})
            self._cuda_context.push()
            try:
                self._apply_shapes(slot)
                self._enqueue(slot)
            except self._cuda.Error as exc:
                msg = f"CUDA failed queueing inference of {self._path} ({exc}): see the log"
                raise InferenceError(msg) from exc
            finally:
                self._cuda.Context.pop()
            return self._ring.issue()

    def collect(
        self, ticket: Ticket, timeout_s: float | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        with self._lock:
            check_open(self._closed, self._path)
            self._ring.check(ticket)
            slot = self._slots[ticket.slot]
        self._cuda_context.push()
        try:
            self._wait(slot, ticket, timeout_s)
            self._finish(slot)
        except self._cuda.Error as exc:
            msg = f"CUDA failed running {self._path} ({exc}): see the log"
            raise InferenceError(msg) from exc
        finally:
            self._cuda.Context.pop()
        with self._lock:
            self._ring.release(ticket)
            self._calls += 1
        return slot.result

    def status(self) -> dict[str, Any]:
        return {
            "backend": "tensorrt",
            "plan": str(self._path),
            "plan_key": self._metadata.key().slug() if self._metadata else None,
            "trt_version": self._trt_version,
            "device": self._device.name,
            "compute_capability": ".".join(str(v) for v in self._device.compute_capability),
            "soc": self._device.soc,
            "memory": self._config.memory,
            "slots": self._config.slots,
            "in_flight": self._ring.in_flight if not self._closed else 0,
            "calls": self._calls,
            "fallbacks": [],
            "closed": self._closed,
        }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cuda_context.push()
            try:
                self._release()
            finally:
                self._cuda.Context.pop()
                self._cuda_context.detach()

    # -- internals ---------------------------------------------------------------------------

    def _release(self) -> None:
        """Wait for queued work, free host/device memory, drop contexts, engine and runtime."""
        for slot in self._slots:
            slot.stream.synchronize()
        for slot in self._slots:
            for binding in slot.bindings.values():
                if binding.device is not None:
                    binding.device.free()
                if self._config.memory != "pageable":
                    allocation: Any = binding.host.base  # pycuda PagelockedHostAllocation
                    allocation.free()
                binding.views.clear()
            slot.bindings.clear()
            slot.result.clear()
            slot.context = None
        self._slots = []
        self._engine = None
        self._runtime = None

    def _check_profile(self, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        profile = self._profiles.get(spec.name)
        if profile is None:
            if shape != spec.shape:
                msg = (
                    f"input {spec.name!r} of plan {self._path} got shape {shape_text(shape)}, the "
                    f"plan is fixed at {shape_text(spec.shape)}: resize in preprocessing"
                )
                raise InputSpecError(msg)
            return
        low, _opt, high = profile
        fits = len(shape) == len(low)
        if fits:  # a plain loop: this runs on every call (no generator objects)
            for size, lo, hi in zip(shape, low, high, strict=True):
                if not lo <= size <= hi:
                    fits = False
                    break
        if not fits:
            msg = (
                f"input {spec.name!r} of plan {self._path} got shape {shape_text(shape)}, outside "
                f"the optimisation profile {shape_text(low)}..{shape_text(high)}: resize the input "
                "or rebuild the plan with a wider --batch range"
            )
            raise InputSpecError(msg)

    def _stage(self, slot: _Slot, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        for name, array in inputs.items():
            spec = find_input(self._input_index, name, self._path, prefix="plan ")
            check_array(array, spec, self._path, prefix="plan ")
            shape = tuple(array.shape)
            self._check_profile(spec, shape)
            view = slot.bindings[name].view(shape)
            if array is not view:
                np.copyto(view, array)
            slot.shapes[name] = shape

    def _set_shape(self, slot: _Slot, name: str, shape: tuple[int, ...]) -> None:
        if not slot.context.set_input_shape(name, shape):
            msg = (
                f"TensorRT rejected shape {shape_text(shape)} for input {name!r} of {self._path} "
                f"({self._logger.last_error()}): stay inside the optimisation profile"
            )
            raise InputSpecError(msg)
        slot.applied[name] = shape

    def _context_shape(self, slot: _Slot, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in slot.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            msg = (
                f"output {name!r} of plan {self._path} has a data-dependent shape "
                f"{shape_text(shape)}, which this engine does not support: export the model with "
                "output shapes that follow from the input shapes"
            )
            raise ModelLoadError(msg)
        return shape

    def _apply_shapes(self, slot: _Slot) -> None:
        changed = not slot.result
        for name in self._profiles:
            shape = slot.shapes[name]
            if slot.applied.get(name) != shape:
                self._set_shape(slot, name, shape)
                changed = True
        if changed:
            for spec in self._outputs:
                shape = self._context_shape(slot, spec.name)
                slot.result[spec.name] = slot.bindings[spec.name].view(shape)

    def _enqueue(self, slot: _Slot) -> None:
        """Copy-in, execute, copy-out and record the slot's event, all on its stream."""
        cuda = self._cuda
        mode = self._config.memory
        for spec in self._inputs:
            view = slot.bindings[spec.name].view(slot.shapes[spec.name])
            if mode == "pinned":
                cuda.memcpy_htod_async(slot.bindings[spec.name].device, view, slot.stream)
            elif mode == "pageable":
                cuda.memcpy_htod(slot.bindings[spec.name].device, view)
        if not slot.context.execute_async_v3(slot.stream_handle):
            msg = (
                f"TensorRT could not enqueue inference of {self._path} "
                f"({self._logger.last_error()}): check the input shapes"
            )
            raise InferenceError(msg)
        if mode == "pinned":
            for spec in self._outputs:
                cuda.memcpy_dtoh_async(
                    slot.result[spec.name], slot.bindings[spec.name].device, slot.stream
                )
        slot.event.record(slot.stream)

    def _wait(self, slot: _Slot, ticket: Ticket, timeout_s: float | None) -> None:
        if timeout_s is None:
            slot.event.synchronize()
            return
        deadline = time.monotonic() + timeout_s
        while not slot.event.query():
            if time.monotonic() >= deadline:
                msg = (
                    f"inference of {self._path} (ticket #{ticket.sequence}) did not finish "
                    f"within {timeout_s} s: collect again with a longer timeout"
                )
                raise InferenceTimeoutError(msg)
            time.sleep(_POLL_S)

    def _finish(self, slot: _Slot) -> None:
        if self._config.memory == "pageable":
            for spec in self._outputs:
                self._cuda.memcpy_dtoh(slot.result[spec.name], slot.bindings[spec.name].device)


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


# -- opening with plan lookup and fallback -------------------------------------------------------


def _fallback(
    config: TensorRTConfig,
    source: Path | None,
    cpus: frozenset[int],
    error: Exception,
    plan: Path | None,
) -> TensorEngine:
    if not config.fallback_to_onnxruntime or source is None:
        raise error
    from engines.onnxruntime import OnnxRuntimeEngine  # noqa: PLC0415 - runtime import on use
    from engines.onnxruntime_config import OnnxRuntimeConfig  # noqa: PLC0415

    reason = getattr(error, "reason", "engine_error")
    _log.warning("TensorRT unusable for %s (%s); falling back to ONNX Runtime", source, error)
    ort_config = OnnxRuntimeConfig(
        type="onnxruntime",
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        slots=config.slots,
    )
    return OnnxRuntimeEngine(
        ort_config,
        source,
        cpus=cpus,
        fallback_from={
            "backend": "tensorrt",
            "reason": reason,
            "error": str(error),
            "plan": str(plan) if plan else None,
        },
    )


def open_tensorrt_engine(
    config: TensorRTConfig,
    model_path: Path,
    *,
    cpus: frozenset[int],
    source_onnx: Path | None,
    runtime_loader: RuntimeLoader,
    progress: Callable[[str], None] | None = None,
) -> TensorEngine:
    """Open a TensorRT engine for ``model_path`` (a plan, or an ONNX looked up in the store).

    A missing runtime, a missing plan or an incompatible plan falls back to ONNX Runtime on the
    source ONNX when ``config.fallback_to_onnxruntime`` allows it (status shows why); otherwise
    the typed error propagates. With ``build_if_missing`` a missing plan is built first.
    """
    model_path = Path(model_path)
    is_plan = model_path.suffix in _PLAN_SUFFIXES
    source = source_onnx if source_onnx is not None else (None if is_plan else model_path)
    plan: Path | None = config.plan or (model_path if is_plan else None)
    try:
        runtime = runtime_loader()
    except EngineUnavailableError as exc:
        return _fallback(config, source, cpus, exc, plan)
    try:
        metadata: PlanMetadata | None = None
        if plan is None:  # model_path is the ONNX: find (or build) its plan in the store
            onnx = source if source is not None else model_path
            plan, metadata = _lookup_plan(config, onnx, runtime, progress)
        else:
            metadata = PlanStore.read_metadata(plan)
        return TensorRTEngine(config, plan, runtime=runtime, cpus=cpus, metadata=metadata)
    except (PlanCompatibilityError, ModelFileError) as exc:
        return _fallback(config, source, cpus, exc, plan)


def plan_store_for(config: TensorRTConfig, source: Path) -> PlanStore:
    return PlanStore(config.plan_dir or source.parent / "plans")


def _lookup_plan(
    config: TensorRTConfig,
    source: Path,
    runtime: TensorRTRuntime,
    progress: Callable[[str], None] | None,
) -> tuple[Path, PlanMetadata | None]:
    check_model_file(source, fix="pull the model with `edge-agent models pull NAME`")
    store = plan_store_for(config, source)
    device = detect_device(runtime.cuda, config.device, compatible=runtime.compatible)
    sha = file_sha256(source)
    trt_version = str(runtime.trt.__version__)
    key = plan_key(config, model_sha256=sha, trt_version=trt_version, device=device)
    found = store.find(key)
    if found is None and config.build_if_missing:
        from engines.tensorrt_build import BuildRequest, build_plan  # noqa: PLC0415 - cycle

        request = BuildRequest(
            onnx=source,
            precision=config.precision,
            batch=config.batch,
            workspace_mib=config.workspace_mib,
            calibration_images=config.calibration_images,
            timing_cache=config.timing_cache,
            device=config.device,
            model_sha256=sha,
        )
        found = build_plan(request, store, runtime=runtime, progress=progress or _log_progress)
    if found is None:
        msg = (
            f"no TensorRT plan for {source} ({key.slug()}) in {store.root}: build it with "
            f"`edge-agent models build-plan {source} --precision {config.precision}` or set "
            "build_if_missing = true"
        )
        raise ModelFileError(msg)
    return found, PlanStore.read_metadata(found)


def _log_progress(message: str) -> None:
    _log.info("plan build: %s", message)
