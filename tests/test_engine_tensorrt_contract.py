"""Contract tests of the TensorRT engine, plan store and plan builder against the doubles.

TensorRT and pycuda cannot be installed here, so ``tests/doubles`` mirrors exactly the calls the
engine and the builder make (names, signatures, return types). Pages checked for them:

TensorRT 10 Python API (docs.nvidia.com/deeplearning/tensorrt):
- ICudaEngine: .../archives/tensorrt-1001/api/python_api/infer/Core/Engine.html and
  .../latest/_static/python-api/infer/Core/Engine.html (num_io_tensors, get_tensor_name,
  get_tensor_mode -> TensorIOMode, get_tensor_shape -> Dims, get_tensor_dtype,
  get_tensor_profile_shape(name, profile_index) -> [min, opt, max], create_execution_context);
  C++ counterpart .../api/c_api/classnvinfer1_1_1_i_cuda_engine.html (TensorRT 10.0.1/10.1.0).
- IExecutionContext: .../latest/_static/python-api/infer/Core/ExecutionContext.html and C++
  .../api/c_api/classnvinfer1_1_1_i_execution_context.html (10.2.0: setInputShape -> bool,
  setTensorAddress, enqueueV3(stream) = Python execute_async_v3(stream_handle) -> bool).
- Runtime: .../archives/tensorrt-843/api/python_api/infer/Core/Runtime.html
  (deserialize_cuda_engine(serialized_engine) -> ICudaEngine, "or None if it could not be
  deserialized").
- Builder / IBuilderConfig / IOptimizationProfile: .../11.0.0/_static/python-api/infer/Core/
  Builder.html, .../latest/_static/python-api/infer/Core/OptimizationProfile.html, C++
  .../latest/_static/c-api/classnvinfer1_1_1_i_builder_config-members.html (10.14.1:
  addOptimizationProfile, createTimingCache, setTimingCache, setFlag, setMemoryPoolLimit,
  setInt8Calibrator, setCalibrationProfile).
- IProgressMonitor: .../latest/_static/python-api/infer/Core/ProgressMonitor.html (phase_start,
  step_complete -> bool, False cancels; phase_finish; must be thread-safe).
- IInt8EntropyCalibrator2: .../archives/tensorrt_500rc/tensorrt-api/python_api/infer/Int8/
  EntropyCalibrator.html and C++ .../api/c_api/classnvinfer1_1_1_i_int8_entropy_calibrator2-
  members.html (get_batch_size, get_batch(names) -> device pointers or None when done,
  read_calibration_cache, write_calibration_cache).
- OnnxParser: .../archives/tensorrt-843/api/python_api/parsers/Onnx/pyOnnx.html
  (parse_from_file -> bool, num_errors, get_error(index)).

pycuda (inducer/pycuda doc/source/driver.rst; src/wrapper/wrap_cudadrv.cpp):
mem_alloc(bytes) -> DeviceAllocation (castable to int, free()); pagelocked_empty(shape, dtype,
order="C", mem_flags=0) -> numpy.ndarray whose .base is a PagelockedHostAllocation (free(),
get_flags(), HostPointer.get_device_pointer()); host_alloc_flags.DEVICEMAP; Stream(flags=0) and
its ``handle`` property (an int, ``.add_property("handle", &cl::handle_int)``); Event(flags=0)
.record(stream=None) -> self, .synchronize(), .query(); memcpy_htod_async(dest, src,
stream=None), memcpy_dtoh_async(dest, src, stream=None), memcpy_htod, memcpy_dtoh;
Device.retain_primary_context(), Context.push()/pop()/detach(). CUDA driver semantics of
DEVICEMAP memory: nvidia.github.io/cuda-python cuda.bindings driver mem_host_alloc and
mem_host_get_device_pointer_v2.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from doubles.pycuda_driver import make_driver
from doubles.tensorrt10 import make_tensorrt, plan_bytes

from agent.cli.plan_cmd import add_build_plan_parser
from engines.config import TensorRTConfig
from engines.errors import (
    EngineClosedError,
    EngineUnavailableError,
    InferenceError,
    InputSpecError,
    ModelFileError,
    PlanBuildError,
    PlanCompatibilityError,
)
from engines.manifest import InputSpec
from engines.plans import PlanKey, PlanMetadata, PlanStore
from engines.slots import file_sha256
from engines.tensorrt import TensorRTEngine, TensorRTRuntime, open_tensorrt_engine
from engines.tensorrt_build import BuildRequest, _heartbeat, _Reporter, build_plan

CPUS = frozenset({0, 1})
TRT_VERSION = "10.3.0"
COMPATIBLE = b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0"
DYNAMIC = [
    {
        "name": "images",
        "mode": "input",
        "dtype": "FLOAT",
        "shape": [-1, 3, 4, 4],
        "profile": [[1, 3, 4, 4], [2, 3, 4, 4], [4, 3, 4, 4]],
    },
    {"name": "output", "mode": "output", "dtype": "FLOAT", "shape": [-1, 48]},
    {"name": "scores", "mode": "output", "dtype": "FLOAT", "shape": [-1, 5]},
]


@pytest.fixture
def runtime(tmp_path: Path) -> TensorRTRuntime:
    cuda = make_driver(compute_capability=(8, 7))
    compatible = tmp_path / "compatible"
    compatible.write_bytes(COMPATIBLE)
    return TensorRTRuntime(trt=make_tensorrt(cuda, TRT_VERSION), cuda=cuda, compatible=compatible)


def _metadata(**overrides: Any) -> PlanMetadata:
    fields: dict[str, Any] = {
        "model_sha256": "0" * 64,
        "source_onnx": "/models/model.onnx",
        "trt_version": TRT_VERSION,
        "compute_capability": (8, 7),
        "soc": "tegra234",
        "device_name": "Orin (double)",
        "precision": "fp16",
        "batch": (1, 2, 4),
        "workspace_mib": 1024,
        "built_at": "2025-01-01T00:00:00+00:00",
        "build_seconds": 1.0,
    }
    fields.update(overrides)
    return PlanMetadata.model_validate(fields)


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    store = PlanStore(tmp_path / "plans")
    return store.save(plan_bytes(TRT_VERSION, DYNAMIC), _metadata())


def _open(plan: Path, runtime: TensorRTRuntime, **config: Any) -> TensorRTEngine:
    cfg = TensorRTConfig.model_validate({"type": "tensorrt", **config})
    return TensorRTEngine(
        cfg, plan, runtime=runtime, cpus=CPUS, metadata=PlanStore.read_metadata(plan)
    )


def _expected(source: np.ndarray, count: int) -> np.ndarray:
    flat = source.reshape(-1).astype(np.float64)
    return (2 * flat[np.arange(count) % flat.size]).astype(np.float32)


def _calls(runtime: TensorRTRuntime, name: str) -> list[tuple[Any, ...]]:
    return [call for call in runtime.cuda.state.calls if call[0] == name]


def test_specs_and_buffer_sizes_contract(plan: Path, runtime: TensorRTRuntime) -> None:
    engine = _open(plan, runtime, slots=2)
    assert [(s.name, s.shape, s.dtype) for s in engine.inputs] == [
        ("images", (-1, 3, 4, 4), np.dtype(np.float32))
    ]
    assert [(s.name, s.shape) for s in engine.outputs] == [
        ("output", (-1, 48)),
        ("scores", (-1, 5)),
    ]
    # per slot and tensor: page-locked host + device buffer for the profile's max shape
    capacity = {"images": 4 * 3 * 4 * 4, "output": 4 * 48, "scores": 4 * 5}
    pinned = _calls(runtime, "pagelocked_empty")
    allocs = _calls(runtime, "mem_alloc")
    assert sorted(call[1][0] for call in pinned) == sorted(list(capacity.values()) * 2)
    assert all(call[2] == "<f4" and call[3] == 0 for call in pinned)
    assert sorted(call[1] for call in allocs) == sorted([v * 4 for v in capacity.values()] * 2)
    assert runtime.cuda.state.live_device_bytes() == 2 * 4 * sum(capacity.values())
    engine.close()


def test_call_order_per_slot_and_results_contract(plan: Path, runtime: TensorRTRuntime) -> None:
    engine = _open(plan, runtime, slots=2, warmup_runs=0)
    state = runtime.cuda.state
    state.calls.clear()
    first = engine.input_buffer("images")  # opt shape (2,3,4,4), slot 0's pinned buffer
    first[...] = np.arange(first.size, dtype=np.float32).reshape(first.shape)
    t1 = engine.submit()
    second = np.full((2, 3, 4, 4), 1.5, np.float32)
    t2 = engine.submit({"images": second})
    streams = {call[1] for call in _calls(runtime, "execute_async_v3")}
    assert len(streams) == 2  # each slot on its own stream
    for stream in streams:
        ops = [c[0] for c in state.calls if len(c) > 1 and c[1] == stream]
        assert ops == [
            "memcpy_htod_async",
            "execute_async_v3",
            "memcpy_dtoh_async",
            "memcpy_dtoh_async",
            "event.record",
        ]
    copies = _calls(runtime, "memcpy_htod_async") + _calls(runtime, "memcpy_dtoh_async")
    assert all(call[4] for call in copies)  # every async copy uses page-locked host memory
    assert [c[3] for c in _calls(runtime, "memcpy_htod_async")] == [2 * 48 * 4] * 2
    syncs_before = len(_calls(runtime, "event.synchronize"))
    out1 = engine.collect(t1)
    assert len(_calls(runtime, "event.synchronize")) == syncs_before + 1
    np.testing.assert_array_equal(out1["output"].reshape(-1), _expected(first, 96))
    np.testing.assert_array_equal(out1["scores"].reshape(-1), _expected(first, 10))
    out2 = engine.collect(t2)
    assert out2["output"].shape == (2, 48)
    np.testing.assert_array_equal(out2["output"], np.full((2, 48), 3.0, np.float32))
    engine.close()


def test_dynamic_shapes_within_profile_contract(plan: Path, runtime: TensorRTRuntime) -> None:
    engine = _open(plan, runtime, slots=1)
    batch3 = engine.input_buffer("images", (3, 3, 4, 4))
    batch3[...] = np.linspace(0, 1, batch3.size, dtype=np.float32).reshape(batch3.shape)
    out = engine.infer({"images": batch3})
    assert (out["output"].shape, out["scores"].shape) == ((3, 48), (3, 5))
    np.testing.assert_allclose(out["output"].reshape(-1), _expected(batch3, 144))
    single = np.ones((1, 3, 4, 4), np.float32)
    assert engine.infer({"images": single})["output"].shape == (1, 48)
    bad = [
        ((5, 3, 4, 4), r"outside the optimisation profile \[1,3,4,4\]..\[4,3,4,4\]"),
        ((2, 3, 5, 4), "outside the optimisation profile"),
        ((2, 48), "outside the optimisation profile"),
    ]
    for shape, pattern in bad:
        with pytest.raises(InputSpecError, match=pattern) as info:
            engine.infer({"images": np.zeros(shape, np.float32)})
        assert "--batch" in str(info.value)
        with pytest.raises(InputSpecError):
            engine.input_buffer("images", shape)
    with pytest.raises(InputSpecError, match="dtype float64"):
        engine.infer({"images": np.zeros((2, 3, 4, 4), np.float64)})
    with pytest.raises(InputSpecError, match="no input 'frames'"):
        engine.infer({"frames": single})
    engine.close()


def test_slot_reuse_round_robin_contract(plan: Path, runtime: TensorRTRuntime) -> None:
    engine = _open(plan, runtime, slots=2)
    data = [np.full((1, 3, 4, 4), float(i), np.float32) for i in range(5)]
    t0 = engine.submit({"images": data[0]})
    t1 = engine.submit({"images": data[1]})
    assert (t0.slot, t1.slot) == (0, 1)
    with pytest.raises(InferenceError, match="collect"):
        engine.submit({"images": data[2]})
    np.testing.assert_array_equal(engine.collect(t0)["output"], np.zeros((1, 48), np.float32))
    t2 = engine.submit({"images": data[2]})
    assert t2.slot == 0
    with pytest.raises(InferenceError, match="not outstanding"):
        engine.collect(t0)
    assert engine.collect(t1)["output"][0, 0] == 2.0
    assert engine.collect(t2)["output"][0, 0] == 4.0
    assert engine.status()["calls"] == 3
    engine.close()


def test_input_buffer_is_the_slots_pinned_buffer_contract(
    plan: Path, runtime: TensorRTRuntime
) -> None:
    engine = _open(plan, runtime, slots=2)
    buf0 = engine.input_buffer("images", (2, 3, 4, 4))
    buf0[...] = 7.0
    runtime.cuda.state.calls.clear()
    ticket = engine.submit()  # no inputs: the device copy reads straight from buf0
    (copy,) = _calls(runtime, "memcpy_htod_async")
    assert copy[4] is True  # page-locked
    buf1 = engine.input_buffer("images", (2, 3, 4, 4))
    assert not np.shares_memory(buf0, buf1)  # next slot, next buffer
    assert engine.collect(ticket)["output"][1, 47] == 14.0
    engine.close()


@pytest.mark.parametrize("memory", ["mapped", "pageable"])
def test_memory_modes_contract(plan: Path, runtime: TensorRTRuntime, memory: str) -> None:
    engine = _open(plan, runtime, memory=memory, slots=2, warmup_runs=0)
    state = runtime.cuda.state
    data = np.arange(2 * 48, dtype=np.float32).reshape(2, 3, 4, 4)
    state.calls.clear()
    out = engine.infer({"images": data})
    np.testing.assert_array_equal(out["output"].reshape(-1), _expected(data, 96))
    names = [call[0] for call in state.calls]
    if memory == "mapped":
        assert "mem_alloc" not in names
        assert not [n for n in names if n.startswith("memcpy")]  # zero-copy
        assert names == ["execute_async_v3", "event.record", "event.synchronize"]
        assert not state.device_allocations
        assert all(alloc.get_flags() == 2 for alloc in state.host_allocations)  # DEVICEMAP
    else:
        assert names == [
            "memcpy_htod",
            "execute_async_v3",
            "event.record",
            "event.synchronize",
            "memcpy_dtoh",
            "memcpy_dtoh",
        ]
        assert not state.host_allocations  # plain numpy, never page-locked
    engine.close()
    assert not state.device_allocations
    assert not state.live_host_allocations()


def test_close_frees_everything_and_is_idempotent_contract(
    plan: Path, runtime: TensorRTRuntime
) -> None:
    engine = _open(plan, runtime, slots=3)
    trt_state, cuda_state = runtime.trt.state, runtime.cuda.state
    assert trt_state.contexts_created == 3
    ticket = engine.submit({"images": np.ones((2, 3, 4, 4), np.float32)})
    engine.close()
    gc.collect()
    assert len(trt_state.contexts) == 0  # every IExecutionContext deleted
    assert not cuda_state.device_allocations
    assert len(cuda_state.freed_device) == 9
    assert not cuda_state.live_host_allocations()
    assert cuda_state.retained == cuda_state.detached == 1
    assert cuda_state.stack() == []
    engine.close()
    assert cuda_state.detached == 1
    assert engine.status()["closed"] is True
    with pytest.raises(EngineClosedError):
        engine.collect(ticket)
    with pytest.raises(EngineClosedError):
        engine.submit()
    with pytest.raises(EngineClosedError):
        engine.input_buffer("images")


def test_any_thread_may_drive_the_engine_contract(plan: Path, runtime: TensorRTRuntime) -> None:
    engine = _open(plan, runtime, slots=2)
    results: list[Any] = []

    def work() -> None:
        ticket = engine.submit({"images": np.full((1, 3, 4, 4), 2.0, np.float32)})
        results.append(float(engine.collect(ticket)["output"][0, 0]))
        results.append(list(runtime.cuda.state.stack()))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert results == [4.0, []]  # context pushed for the calls and popped afterwards
    engine.close()


def test_status_is_json_contract(plan: Path, runtime: TensorRTRuntime) -> None:
    with _open(plan, runtime) as engine:
        status = engine.status()
    json.dumps(status)
    assert status["backend"] == "tensorrt"
    assert (status["compute_capability"], status["soc"]) == ("8.7", "tegra234")
    assert status["plan_key"] == _metadata().key().slug()


def test_plan_metadata_mismatch_contract(tmp_path: Path, runtime: TensorRTRuntime) -> None:
    store = PlanStore(tmp_path / "plans")
    cases = [
        (_metadata(trt_version="10.0.1"), "built by TensorRT 10.0.1, this device runs 10.3.0"),
        (_metadata(compute_capability=(8, 6)), "compute capability 8.6, this GPU is 8.7"),
        (_metadata(soc="dgpu"), "built on SoC dgpu, this device is tegra234"),
    ]
    for meta, pattern in cases:
        path = store.save(plan_bytes(TRT_VERSION, DYNAMIC), meta)
        with pytest.raises(PlanCompatibilityError, match=pattern) as info:
            _open(path, runtime)
        assert str(path) in str(info.value)
        assert "build-plan" in str(info.value)
        assert "\n" not in str(info.value)
    assert runtime.trt.state.contexts_created == 0  # refused before deserializing


def test_plan_that_does_not_deserialize_contract(tmp_path: Path, runtime: TensorRTRuntime) -> None:
    foreign = tmp_path / "foreign.plan"  # no sidecar: only deserialization can tell
    foreign.write_bytes(plan_bytes("10.7.0", DYNAMIC))
    with pytest.raises(PlanCompatibilityError, match=r"Serialized Engine Version: 10\.7\.0"):
        _open(foreign, runtime)
    garbage = tmp_path / "garbage.engine"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(PlanCompatibilityError, match="magicTag"):
        _open(garbage, runtime)
    assert runtime.cuda.state.stack() == []  # the failed load popped its context
    assert runtime.cuda.state.retained == runtime.cuda.state.detached


def test_plan_mismatch_falls_back_to_onnxruntime_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path
) -> None:
    onnx = models_dir / "yolox_nano_416.onnx"
    foreign = tmp_path / "yolox.plan"
    foreign.write_bytes(plan_bytes("10.7.0", DYNAMIC))
    config = TensorRTConfig(type="tensorrt")
    engine = open_tensorrt_engine(
        config, foreign, cpus=CPUS, source_onnx=onnx, runtime_loader=lambda: runtime
    )
    with engine:
        status = engine.status()
        out = engine.infer({"images": np.zeros((1, 3, 416, 416), np.float32)})
    assert status["backend"] == "onnxruntime"
    assert status["fallback_from"]["reason"] == "plan_incompatible"
    assert "10.7.0" in status["fallback_from"]["error"]
    assert out["output"].shape == (1, 3549, 85)
    strict = TensorRTConfig(type="tensorrt", fallback_to_onnxruntime=False)
    with pytest.raises(PlanCompatibilityError):
        open_tensorrt_engine(
            strict, foreign, cpus=CPUS, source_onnx=onnx, runtime_loader=lambda: runtime
        )


def test_missing_runtime_falls_back_or_fails_contract(models_dir: Path, tmp_path: Path) -> None:
    onnx = models_dir / "yolox_nano_416.onnx"

    def missing() -> TensorRTRuntime:
        msg = "the TensorRT engine needs the tensorrt module (No module named 'tensorrt')"
        raise EngineUnavailableError(msg)

    with open_tensorrt_engine(
        TensorRTConfig(type="tensorrt"), onnx, cpus=CPUS, source_onnx=None, runtime_loader=missing
    ) as engine:
        assert engine.status()["fallback_from"]["reason"] == "engine_unavailable"
    with pytest.raises(EngineUnavailableError):
        open_tensorrt_engine(
            TensorRTConfig(type="tensorrt", fallback_to_onnxruntime=False),
            onnx,
            cpus=CPUS,
            source_onnx=None,
            runtime_loader=missing,
        )


# -- plan store and builder ------------------------------------------------------------------


def _request(onnx: Path, **kwargs: Any) -> BuildRequest:
    return BuildRequest(onnx=onnx, **kwargs)


def test_build_fp16_call_sequence_and_store_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path
) -> None:
    onnx = models_dir / "yolox_nano_416.onnx"
    store = PlanStore(tmp_path / "plans")
    lines: list[str] = []
    plan = build_plan(_request(onnx), store, runtime=runtime, progress=lines.append)
    (build,) = runtime.trt.state.builds
    assert build["flags"] == ["FP16"]
    assert build["workspace"] == 1024 << 20
    assert build["phases"] == ["Tactic selection", "Layer fusion", "Serialization"]
    assert build["timing_cache_hit"] is False
    assert runtime.trt.state.parsed == [str(onnx)]
    meta = PlanStore.read_metadata(plan)
    assert meta is not None
    key = PlanKey(file_sha256(onnx), TRT_VERSION, (8, 7), "tegra234", "fp16", (1, 1, 1))
    assert meta.key() == key
    assert plan == store.plan_path(key)
    assert plan.name == f"{file_sha256(onnx)[:16]}_trt10.3.0_sm87_tegra234_fp16_b1-1-1.plan"
    assert store.find(key) == plan
    assert [p for p, _ in store.entries()] == [plan]
    assert any("phase 'Building engine' started: 3 steps" in line for line in lines)
    assert any("phase 'Serialization' finished" in line for line in lines)
    assert lines[-1].startswith(f"saved plan {plan}")
    cache = Path(meta.timing_cache or "")
    assert cache.is_file()
    # the second build reuses the timing cache written by the first
    lines.clear()
    build_plan(_request(onnx), store, runtime=runtime, progress=lines.append)
    assert runtime.trt.state.builds[1]["timing_cache_hit"] is True
    assert any("reusing timing cache" in line for line in lines)
    # and the plan loads and runs in the engine
    with _open(plan, runtime) as engine:
        assert [s.shape for s in engine.inputs] == [(1, 3, 416, 416)]
        out = engine.infer({"images": np.ones((1, 3, 416, 416), np.float32)})
        assert out["output"].shape == (1, 3549, 85)
        assert float(out["output"].max()) == 2.0


def test_build_dynamic_batch_profile_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path
) -> None:
    onnx = models_dir / "deimv2_hgnetv2_atto_coco.onnx"
    store = PlanStore(tmp_path / "plans")
    plan = build_plan(
        _request(onnx, precision="fp32", batch=(1, 2, 4)),
        store,
        runtime=runtime,
        progress=lambda _m: None,
    )
    body = json.loads(plan.read_bytes().split(b"\n", 1)[1])
    profiles = {t["name"]: t["profile"] for t in body["tensors"] if t["mode"] == "input"}
    assert profiles == {
        "images": [[1, 3, 320, 320], [2, 3, 320, 320], [4, 3, 320, 320]],
        "orig_target_sizes": [[1, 2], [2, 2], [4, 2]],
    }
    assert runtime.trt.state.builds[0]["flags"] == []
    with pytest.raises(PlanBuildError, match="fixed batch of 1") as info:
        build_plan(
            _request(models_dir / "yolox_nano_416.onnx", batch=(1, 2, 4)),
            store,
            runtime=runtime,
            progress=lambda _m: None,
        )
    assert "--batch 1" in str(info.value)


def test_build_int8_calibrates_from_images_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path, data_dir: Path
) -> None:
    onnx = models_dir / "yolox_nano_416.onnx"
    store = PlanStore(tmp_path / "plans")
    spec = InputSpec(width=416, height=416, color="bgr", resize="letterbox", tensor="images")
    request = _request(
        onnx,
        precision="int8",
        calibration_images=data_dir / "coco_mini" / "val2017",
        input_spec=spec,
        calibration_limit=3,
    )
    lines: list[str] = []
    plan = build_plan(request, store, runtime=runtime, progress=lines.append)
    build = runtime.trt.state.builds[0]
    assert build["flags"] == ["FP16", "INT8"]
    assert build["calibration_batches"] == 3
    sums = build["calibration_sums"]
    assert len(set(sums)) == 3
    assert all(sum_ > 0 for sum_ in sums)  # real pixels reached the device buffer
    meta = PlanStore.read_metadata(plan)
    assert meta is not None
    assert meta.calibration_batches == 3
    assert plan.with_suffix(".calib").is_file()
    assert any("calibration batch 3 (3/3 images)" in line for line in lines)
    assert not runtime.cuda.state.device_allocations  # calibrator buffers released
    build_plan(request, store, runtime=runtime, progress=lines.append)
    assert runtime.trt.state.builds[1]["calibration_cache_read"] is True
    with pytest.raises(PlanBuildError, match="calibration images"):
        build_plan(_request(onnx, precision="int8"), store, runtime=runtime, progress=print)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PlanBuildError, match=r"no \.jpg"):
        build_plan(
            _request(onnx, precision="int8", calibration_images=empty),
            store,
            runtime=runtime,
            progress=print,
        )


def test_build_rejects_broken_onnx_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path
) -> None:
    broken = tmp_path / "yolox_truncated.onnx"
    broken.write_bytes((models_dir / "yolox_nano_416.onnx").read_bytes()[:100_000])
    with pytest.raises(PlanBuildError, match="cannot parse") as info:
        build_plan(_request(broken), PlanStore(tmp_path / "p"), runtime=runtime, progress=print)
    assert str(broken) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError):
        build_plan(_request(tmp_path / "absent.onnx"), PlanStore(tmp_path), runtime=runtime,
                   progress=print)  # fmt: skip
    assert runtime.cuda.state.stack() == []


def test_build_replaces_a_foreign_timing_cache_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path
) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"TRT-DOUBLE-CACHE sm86\nimages|FP16\n")
    lines: list[str] = []
    build_plan(
        _request(models_dir / "yolox_nano_416.onnx", timing_cache=cache),
        PlanStore(tmp_path / "plans"),
        runtime=runtime,
        progress=lines.append,
    )
    assert any("does not fit this GPU" in line for line in lines)
    assert cache.read_bytes().startswith(b"TRT-DOUBLE-CACHE sm87")


def test_build_heartbeat_reports_a_silent_phase() -> None:
    lines: list[str] = []
    seen = threading.Event()

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("still building"):
            seen.set()

    reporter = _Reporter(progress)
    reporter.phase_start("Tactic selection", None, 40)
    with _heartbeat(reporter, 0.01):
        assert seen.wait(10)
    assert "in 'Tactic selection'" in next(x for x in lines if x.startswith("still building"))


def test_store_lookup_and_build_if_missing_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path
) -> None:
    onnx = models_dir / "yolox_nano_416.onnx"
    config = TensorRTConfig(
        type="tensorrt", plan_dir=tmp_path / "plans", fallback_to_onnxruntime=False
    )
    with pytest.raises(ModelFileError, match="build-plan") as info:
        open_tensorrt_engine(
            config, onnx, cpus=CPUS, source_onnx=None, runtime_loader=lambda: runtime
        )
    assert "build_if_missing" in str(info.value)
    building = config.model_copy(update={"build_if_missing": True})
    lines: list[str] = []
    engine = open_tensorrt_engine(
        building,
        onnx,
        cpus=CPUS,
        source_onnx=None,
        runtime_loader=lambda: runtime,
        progress=lines.append,
    )
    with engine:
        assert engine.status()["backend"] == "tensorrt"
        assert engine.status()["plan"].startswith(str(tmp_path / "plans"))
    assert any(line.startswith("saved plan") for line in lines)
    # now found by key without building again
    with open_tensorrt_engine(
        config, onnx, cpus=CPUS, source_onnx=None, runtime_loader=lambda: runtime
    ) as again:
        assert again.status()["plan"] == engine.status()["plan"]
    assert len(runtime.trt.state.builds) == 1


def test_cli_build_plan_contract(
    tmp_path: Path, runtime: TensorRTRuntime, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="edge-agent models")
    add_build_plan_parser(parser.add_subparsers(dest="action", required=True))
    onnx = models_dir / "yolox_nano_416.onnx"
    args = parser.parse_args(
        ["build-plan", str(onnx), "--precision", "fp32", "--plan-dir", str(tmp_path / "store")]
    )
    assert args.func(args, runtime_loader=lambda: runtime) == 0
    captured = capsys.readouterr()
    plan = Path(captured.out.strip())
    assert plan.is_file()
    assert plan.parent == tmp_path / "store"
    assert "saved plan" in captured.err
    with pytest.raises(SystemExit):
        parser.parse_args(["build-plan", str(onnx), "--batch", "4,2,1"])
    args = parser.parse_args(["build-plan", str(onnx)])
    with pytest.raises(EngineUnavailableError, match="tensorrt"):
        args.func(args)  # the real runtime is not installed here
