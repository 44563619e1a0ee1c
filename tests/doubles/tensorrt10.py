"""A small, faithful double of exactly the TensorRT 10 Python calls the engine and builder make.

Mirrors the TensorRT 10 Python API reference (docs.nvidia.com/deeplearning/tensorrt, python-api
``infer/Core``: Runtime, ICudaEngine, IExecutionContext, Builder, IBuilderConfig,
IOptimizationProfile, ITimingCache, ProgressMonitor, ``infer/Int8`` EntropyCalibrator2,
``parsers/Onnx``):

- ``Runtime(logger).deserialize_cuda_engine(buffer) -> ICudaEngine | None`` (``None`` plus an
  error on the logger for a foreign or damaged plan, as the real runtime does);
- ``ICudaEngine``: ``num_io_tensors``, ``get_tensor_name(i)``, ``get_tensor_mode(name) ->
  TensorIOMode``, ``get_tensor_shape(name) -> Dims`` (``-1`` for dynamic dims),
  ``get_tensor_dtype(name) -> DataType``, ``get_tensor_profile_shape(name, profile) -> [min, opt,
  max]``, ``create_execution_context()``;
- ``IExecutionContext``: ``set_input_shape(name, shape) -> bool`` (``False`` outside the
  profile), ``get_tensor_shape(name)``, ``set_tensor_address(name, ptr) -> bool``,
  ``execute_async_v3(stream_handle) -> bool``;
- ``nptype(DataType)``, ``__version__``, ``ILogger`` with ``Severity``, ``Logger``;
- ``Builder(logger)``: ``create_network(flags)``, ``create_builder_config()``,
  ``create_optimization_profile()``, ``build_serialized_network(network, config) -> IHostMemory |
  None``, ``platform_has_fast_fp16/int8``; ``OnnxParser(network, logger).parse_from_file(path)``,
  ``num_errors``, ``get_error(i)``; ``IBuilderConfig.set_flag``, ``set_memory_pool_limit``,
  ``add_optimization_profile``, ``set_calibration_profile``, ``int8_calibrator``,
  ``progress_monitor``, ``create_timing_cache(bytes)``, ``set_timing_cache(cache,
  ignore_mismatch) -> bool``, ``get_timing_cache()``; ``ITimingCache.serialize()``;
  ``IInt8EntropyCalibrator2`` (``get_batch_size``, ``get_batch(names)``,
  ``read_calibration_cache``, ``write_calibration_cache``) and ``IProgressMonitor``
  (``phase_start``, ``step_complete``, ``phase_finish``) as base classes.

A "plan" is a JSON description of the I/O tensors behind a magic header. Execution computes
something checkable: every output element ``i`` is ``2 * input[i % input_size]`` of the first
input, written on the stream through the pycuda double's device memory. The ONNX parser reads the
real model's inputs/outputs with onnxruntime. ``make_tensorrt(driver)`` returns a fresh module;
``module.state`` (not part of TensorRT) records builds and live execution contexts.
"""

from __future__ import annotations

import enum
import json
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PLAN_MAGIC", "TrtState", "make_tensorrt", "plan_bytes"]

PLAN_MAGIC = b"TRT-DOUBLE-PLAN\n"
CACHE_MAGIC = "TRT-DOUBLE-CACHE"


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NPTYPES: dict[DataType, type] = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
_ORT_TYPES = {
    "tensor(float)": DataType.FLOAT,
    "tensor(float16)": DataType.HALF,
    "tensor(int64)": DataType.INT64,
    "tensor(int32)": DataType.INT32,
    "tensor(uint8)": DataType.UINT8,
    "tensor(bool)": DataType.BOOL,
}


def nptype(trt_type: DataType) -> type:
    """tensorrt.nptype: the numpy type of a TensorRT DataType."""
    return _NPTYPES[DataType(trt_type)]


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class Dims:
    """tensorrt.Dims: an iterable, indexable shape."""

    def __init__(self, shape: Any = ()) -> None:
        self._dims = tuple(int(d) for d in shape)

    def __iter__(self) -> Any:
        return iter(self._dims)

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index: int) -> int:
        return self._dims[index]

    def __eq__(self, other: object) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Dims | tuple | list) else False

    def __hash__(self) -> int:
        return hash(self._dims)

    def __repr__(self) -> str:
        return f"Dims({list(self._dims)})"


class ILogger:
    """tensorrt.ILogger: subclass it, call ``ILogger.__init__(self)``, implement ``log``."""

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    """tensorrt.Logger(min_severity): prints nothing in the double."""

    INTERNAL_ERROR = ILogger.Severity.INTERNAL_ERROR
    ERROR = ILogger.Severity.ERROR
    WARNING = ILogger.Severity.WARNING
    INFO = ILogger.Severity.INFO
    VERBOSE = ILogger.Severity.VERBOSE

    def __init__(self, min_severity: ILogger.Severity = ILogger.Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity
        self.messages: list[str] = []

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        if severity <= self.min_severity:
            self.messages.append(msg)


class IHostMemory:
    """tensorrt.IHostMemory: a buffer (``bytes(mem)`` gives its content)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return self._data


class IInt8EntropyCalibrator2:
    """Base class: implement get_batch_size, get_batch, read/write_calibration_cache."""

    def __init__(self) -> None:
        pass


class IProgressMonitor:
    """Base class: implement phase_start, step_complete (-> bool), phase_finish."""

    def __init__(self) -> None:
        pass


@dataclass
class TrtState:
    """What a test can inspect: builds, contexts created and still alive."""

    version: str
    contexts: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    contexts_created: int = 0
    builds: list[dict[str, Any]] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)


def plan_bytes(version: str, tensors: list[dict[str, Any]], **extra: Any) -> bytes:
    """Serialize a double plan: ``tensors`` = [{name, mode, dtype, shape, profile?}]."""
    body = {"trt_version": version, "tensors": tensors, **extra}
    return PLAN_MAGIC + json.dumps(body).encode()


def make_tensorrt(driver: types.ModuleType, version: str = "10.3.0") -> types.ModuleType:
    """A fresh ``tensorrt`` double that executes through the pycuda ``driver`` double."""
    state = TrtState(version=version)
    cuda_state = driver.state

    def _error(logger: Any, msg: str) -> None:
        logger.log(ILogger.Severity.ERROR, msg)

    class ICudaEngine:
        def __init__(self, body: dict[str, Any], logger: Any) -> None:
            self._tensors = body["tensors"]
            self._by_name = {t["name"]: t for t in self._tensors}
            self.logger = logger
            self.num_optimization_profiles = 1

        @property
        def num_io_tensors(self) -> int:
            return len(self._tensors)

        def get_tensor_name(self, index: int) -> str:
            return str(self._tensors[index]["name"])

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            tensor = self._by_name.get(name)
            if tensor is None:
                return TensorIOMode.NONE
            return TensorIOMode.INPUT if tensor["mode"] == "input" else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self._by_name[name]["shape"])

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType[self._by_name[name]["dtype"]]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
            tensor = self._by_name[name]
            if profile_index != 0 or tensor["mode"] != "input":
                msg = f"no profile {profile_index} for tensor {name}"
                raise ValueError(msg)
            profile = tensor.get("profile") or [tensor["shape"]] * 3
            return [Dims(shape) for shape in profile]

        def create_execution_context(self) -> IExecutionContext:
            context = IExecutionContext(self)
            state.contexts.add(context)
            state.contexts_created += 1
            return context

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            tensor = self.engine._by_name.get(name)
            dims = tuple(int(d) for d in shape)
            if tensor is None or tensor["mode"] != "input":
                _error(self.engine.logger, f"setInputShape: {name} is not an input tensor")
                return False
            low, _opt, high = tensor.get("profile") or [tensor["shape"]] * 3
            if len(dims) != len(low) or any(
                not lo <= d <= hi for d, lo, hi in zip(dims, low, high, strict=True)
            ):
                _error(
                    self.engine.logger,
                    f"3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error "
                    f"(Parameter check failed, condition: satisfyProfile. {name} {list(dims)} "
                    f"is outside [{low}, {high}])",
                )
                return False
            self.shapes[name] = dims
            return True

        def _input_shape(self, tensor: dict[str, Any]) -> tuple[int, ...] | None:
            shape = tuple(tensor["shape"])
            if -1 not in shape:
                return shape
            return self.shapes.get(tensor["name"])

        def get_tensor_shape(self, name: str) -> Dims:
            tensor = self.engine._by_name[name]
            if tensor["mode"] == "input":
                shape = self._input_shape(tensor)
                return Dims(shape if shape is not None else tensor["shape"])
            first = next(t for t in self.engine._tensors if t["mode"] == "input")
            reference = self._input_shape(first)
            dims = []
            for index, size in enumerate(tensor["shape"]):
                if size >= 0:
                    dims.append(size)
                elif reference is not None and index < len(reference):
                    dims.append(reference[index])
                else:
                    dims.append(-1)
            return Dims(dims)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if name not in self.engine._by_name:
                _error(self.engine.logger, f"setTensorAddress: no tensor named {name}")
                return False
            self.addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            logger = self.engine.logger
            if not cuda_state.stack():
                _error(logger, "1: [executionContext.cpp::enqueueV3] invalid device context")
                return False
            stream = cuda_state.streams.get(int(stream_handle))
            if stream is None:
                _error(logger, f"enqueueV3: invalid stream handle {stream_handle}")
                return False
            tensors = self.engine._tensors
            missing = [t["name"] for t in tensors if t["name"] not in self.addresses]
            unset = [
                t["name"] for t in tensors if t["mode"] == "input" and self._input_shape(t) is None
            ]
            if missing or unset:
                _error(logger, f"enqueueV3: address not set for {missing}, shape not set {unset}")
                return False
            cuda_state.calls.append(("execute_async_v3", int(stream_handle), id(self)))
            first = next(t for t in tensors if t["mode"] == "input")
            in_shape = self._input_shape(first)
            in_type = np.dtype(nptype(DataType[first["dtype"]]))
            in_count = int(np.prod(in_shape, dtype=np.int64))
            plan = []
            for tensor in tensors:
                if tensor["mode"] != "output":
                    continue
                shape = tuple(self.get_tensor_shape(tensor["name"]))
                out_type = np.dtype(nptype(DataType[tensor["dtype"]]))
                count = int(np.prod(shape, dtype=np.int64))
                plan.append((self.addresses[tensor["name"]], out_type, count))
            in_address = self.addresses[first["name"]]

            def compute() -> None:
                raw = cuda_state.resolve(in_address, in_count * in_type.itemsize)
                values = raw.view(in_type).astype(np.float64)
                for address, out_type, count in plan:
                    result = (2 * values[np.arange(count) % in_count]).astype(out_type)
                    target = cuda_state.resolve(address, count * out_type.itemsize)
                    target[...] = result.view(np.uint8)

            stream.enqueue(compute)
            return True

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            if not data.startswith(PLAN_MAGIC):
                _error(
                    self.logger,
                    "1: [runtime.cpp::parsePlan::314] Error Code 1: Serialization (Serialization "
                    "assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)",
                )
                return None
            try:
                body = json.loads(data[len(PLAN_MAGIC) :])
            except ValueError:
                _error(self.logger, "1: Serialization (corrupt plan body)")
                return None
            if body["trt_version"] != state.version:
                _error(
                    self.logger,
                    "1: [stdArchiveReader.cpp::StdArchiveReader::42] Error Code 1: Serialization "
                    "(Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed."
                    f"Version tag does not match. Note: Current Version: {state.version}, "
                    f"Serialized Engine Version: {body['trt_version']})",
                )
                return None
            return ICudaEngine(body, self.logger)

    # -- builder side ---------------------------------------------------------------------

    @dataclass
    class ITensor:
        name: str
        shape: Dims
        dtype: DataType

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> ITensor:
            return self.inputs[index]

    class ParserError:
        def __init__(self, description: str) -> None:
            self._description = description

        def desc(self) -> str:
            return self._description

        def __str__(self) -> str:
            return f"In node -1 with name:  and operator:  (parse): {self._description}"

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self.network = network
            self.logger = logger
            self.errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def parse_from_file(self, model: str) -> bool:
            import onnxruntime as ort

            state.parsed.append(model)
            options = ort.SessionOptions()
            options.log_severity_level = 4
            try:
                session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - the real parser reports, not raises
                self.errors.append(ParserError(f"Failed to parse ONNX model from file: {exc}"))
                return False

            def tensor(arg: Any) -> ITensor:
                dims = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
                return ITensor(str(arg.name), Dims(dims), _ORT_TYPES[str(arg.type)])

            self.network.inputs = [tensor(a) for a in session.get_inputs()]
            self.network.outputs = [tensor(a) for a in session.get_outputs()]
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[tuple[int, ...]]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            self.shapes[input] = [tuple(int(d) for d in s) for s in (min, opt, max)]

    class ITimingCache:
        def __init__(self, device: str, entries: list[str]) -> None:
            self.device = device
            self.entries = list(entries)

        def serialize(self) -> IHostMemory:
            text = "\n".join([f"{CACHE_MAGIC} {self.device}", *self.entries]) + "\n"
            return IHostMemory(text.encode())

    def _device_tag() -> str:
        major, minor = cuda_state.compute_capability
        return f"sm{major}{minor}"

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set[BuilderFlag] = set()
            self.pool_limits: dict[MemoryPoolType, int] = {}
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile: IOptimizationProfile | None = None
            self.int8_calibrator: Any = None
            self.progress_monitor: Any = None
            self._timing_cache: ITimingCache | None = None

        def set_flag(self, flag: BuilderFlag) -> None:
            self.flags.add(BuilderFlag(flag))

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            self.pool_limits[MemoryPoolType(pool)] = int(pool_size)

        def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
            return self.pool_limits.get(MemoryPoolType(pool), 0)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            self.calibration_profile = profile
            return True

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
            data = bytes(serialized_timing_cache)
            if not data:
                return ITimingCache(_device_tag(), [])
            lines = data.decode("utf-8", "replace").splitlines()
            if not lines or not lines[0].startswith(CACHE_MAGIC + " "):
                return None
            return ITimingCache(lines[0].split(" ", 1)[1], lines[1:])

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache.device != _device_tag() and not ignore_mismatch:
                return False
            self._timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._timing_cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            self.platform_has_fast_fp16 = True
            self.platform_has_fast_int8 = True

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(
            self, network: INetworkDefinition, config: IBuilderConfig
        ) -> IHostMemory | None:
            record: dict[str, Any] = {
                "flags": sorted(flag.name for flag in config.flags),
                "workspace": config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
                "phases": [],
            }
            state.builds.append(record)
            profile = config.profiles[0] if config.profiles else None
            for tensor in network.inputs:
                if -1 in tuple(tensor.shape) and (
                    profile is None or tensor.name not in profile.shapes
                ):
                    _error(
                        self.logger,
                        "4: Network has dynamic or shape inputs, but no optimization profile "
                        "has been defined.",
                    )
                    return None
            monitor = config.progress_monitor
            steps = ["Tactic selection", "Layer fusion", "Serialization"]
            if monitor is not None:
                monitor.phase_start("Building engine", None, len(steps))
            for index, phase in enumerate(steps):
                if monitor is not None:
                    monitor.phase_start(phase, "Building engine", 2)
                    for step in range(2):
                        if not monitor.step_complete(phase, step):
                            monitor.phase_finish(phase)
                            monitor.phase_finish("Building engine")
                            _error(self.logger, "Build cancelled by the progress monitor")
                            return None
                    monitor.phase_finish(phase)
                    if not monitor.step_complete("Building engine", index):
                        monitor.phase_finish("Building engine")
                        _error(self.logger, "Build cancelled by the progress monitor")
                        return None
                record["phases"].append(phase)
            if monitor is not None:
                monitor.phase_finish("Building engine")
            if BuilderFlag.INT8 in config.flags:
                calibrated = self._calibrate(network, config, record)
                if calibrated is None:
                    return None
            cache = config.get_timing_cache()
            entry = "|".join([network.inputs[0].name, *record["flags"]]) if network.inputs else ""
            record["timing_cache_hit"] = cache is not None and entry in cache.entries
            if cache is not None and entry not in cache.entries:
                cache.entries.append(entry)
            tensors = []
            for tensor in network.inputs:
                shapes = profile.shapes.get(tensor.name) if profile else None
                tensors.append(
                    {
                        "name": tensor.name,
                        "mode": "input",
                        "dtype": tensor.dtype.name,
                        "shape": list(tensor.shape),
                        "profile": [list(s) for s in shapes] if shapes else None,
                    }
                )
            tensors.extend(
                {"name": t.name, "mode": "output", "dtype": t.dtype.name, "shape": list(t.shape)}
                for t in network.outputs
            )
            return IHostMemory(plan_bytes(state.version, tensors, flags=record["flags"]))

        def _calibrate(
            self, network: INetworkDefinition, config: IBuilderConfig, record: dict[str, Any]
        ) -> bool | None:
            calibrator = config.int8_calibrator
            if calibrator is None:
                _error(self.logger, "Calibration failure: INT8 set but no calibrator")
                return None
            cached = calibrator.read_calibration_cache()
            record["calibration_cache_read"] = bool(cached)
            if cached:
                return True
            batch = calibrator.get_batch_size()
            names = [t.name for t in network.inputs]
            profile = config.calibration_profile
            first = network.inputs[0]
            shape = profile.shapes[first.name][1] if profile else tuple(first.shape)
            shape = (batch, *tuple(shape)[1:])
            item = np.dtype(nptype(first.dtype)).itemsize
            sums = []
            while True:
                pointers = calibrator.get_batch(names)
                if not pointers:
                    break
                raw = cuda_state.resolve(int(pointers[0]), int(np.prod(shape)) * item)
                sums.append(float(raw.view(nptype(first.dtype)).astype(np.float64).sum()))
            record["calibration_batches"] = len(sums)
            record["calibration_sums"] = sums
            if not sums:
                _error(self.logger, "Calibration failure: the calibrator gave no batch")
                return None
            calibrator.write_calibration_cache(f"TRT-DOUBLE-CALIB {len(sums)}\n".encode())
            return True

    module = types.ModuleType("tensorrt", "TensorRT 10 double (tests/doubles)")
    for name, value in {
        "__version__": version,
        "TensorIOMode": TensorIOMode,
        "DataType": DataType,
        "nptype": nptype,
        "Dims": Dims,
        "ILogger": ILogger,
        "Logger": Logger,
        "Runtime": Runtime,
        "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext,
        "IHostMemory": IHostMemory,
        "Builder": Builder,
        "BuilderFlag": BuilderFlag,
        "MemoryPoolType": MemoryPoolType,
        "OnnxParser": OnnxParser,
        "IBuilderConfig": IBuilderConfig,
        "IOptimizationProfile": IOptimizationProfile,
        "ITimingCache": ITimingCache,
        "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
        "IProgressMonitor": IProgressMonitor,
        "state": state,
    }.items():
        setattr(module, name, value)
    return module
