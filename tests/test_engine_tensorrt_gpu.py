"""The real TensorRT engine and plan builder on a CUDA GPU (Jetson or a discrete GPU).

Skipped with a reason where tensorrt or pycuda do not import or no CUDA device answers; the same
behaviour is covered against the doubles in test_engine_tensorrt_contract.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engines.config import TensorRTConfig
from engines.errors import InputSpecError, PlanCompatibilityError
from engines.plans import PlanStore
from engines.tensorrt import TensorRTEngine, TensorRTRuntime
from engines.tensorrt_build import BuildRequest, build_plan

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed (needs CUDA/JetPack)")
cuda = pytest.importorskip("pycuda.driver", reason="pycuda is not installed (needs CUDA)")

CPUS = frozenset({0})


@pytest.fixture(scope="module")
def runtime() -> TensorRTRuntime:
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            pytest.skip("no CUDA device")
    except cuda.Error as exc:
        pytest.skip(f"CUDA does not initialise here: {exc}")
    return TensorRTRuntime(trt=trt, cuda=cuda)


@pytest.fixture(scope="module")
def yolox_plan(
    runtime: TensorRTRuntime, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    store = PlanStore(tmp_path_factory.mktemp("plans"))
    request = BuildRequest(onnx=models_dir / "yolox_nano_416.onnx", precision="fp32")
    return build_plan(request, store, runtime=runtime, progress=print)


def _reference(models_dir: Path, frame: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(models_dir / "yolox_nano_416.onnx"), providers=["CPUExecutionProvider"]
    )
    out: np.ndarray = session.run(None, {"images": frame})[0]
    return out


@pytest.mark.parametrize("memory", ["pinned", "mapped", "pageable"])
def test_real_plan_matches_onnxruntime(
    runtime: TensorRTRuntime, yolox_plan: Path, models_dir: Path, memory: str
) -> None:
    frame = (np.random.default_rng(0).random((1, 3, 416, 416), np.float32) * 255).astype(np.float32)
    config = TensorRTConfig(type="tensorrt", memory=memory, slots=2)
    engine = TensorRTEngine(
        config,
        yolox_plan,
        runtime=runtime,
        cpus=CPUS,
        metadata=PlanStore.read_metadata(yolox_plan),
    )
    with engine:
        buffer = engine.input_buffer("images")
        buffer[...] = frame
        first = engine.submit()
        engine.input_buffer("images")[...] = frame
        second = engine.submit()
        out1 = engine.collect(first)["output"].copy()
        out2 = engine.collect(second)["output"]
        np.testing.assert_allclose(out1, out2, rtol=0, atol=0)
        np.testing.assert_allclose(out1, _reference(models_dir, frame), rtol=1e-2, atol=1e-2)
        with pytest.raises(InputSpecError):
            engine.infer({"images": np.zeros((1, 3, 320, 320), np.float32)})
    engine.close()


def test_real_dynamic_batch(runtime: TensorRTRuntime, models_dir: Path, tmp_path: Path) -> None:
    store = PlanStore(tmp_path)
    request = BuildRequest(
        onnx=models_dir / "deimv2_hgnetv2_atto_coco.onnx", precision="fp16", batch=(1, 2, 4)
    )
    plan = build_plan(request, store, runtime=runtime, progress=print)
    config = TensorRTConfig(type="tensorrt", batch=(1, 2, 4))
    with TensorRTEngine(config, plan, runtime=runtime, cpus=CPUS) as engine:
        images = engine.input_buffer("images", (3, 3, 320, 320))
        images[...] = 0.5
        engine.input_buffer("orig_target_sizes", (3, 2))[...] = [[640, 480]] * 3
        out = engine.infer({})
        assert out["boxes"].shape == (3, 300, 4)
        with pytest.raises(InputSpecError):
            engine.input_buffer("images", (5, 3, 320, 320))


def test_real_plan_from_another_version_is_refused(
    runtime: TensorRTRuntime, yolox_plan: Path, tmp_path: Path
) -> None:
    sidecar = json.loads(PlanStore.sidecar_path(yolox_plan).read_text())
    sidecar["trt_version"] = "9.0.0"
    copy = tmp_path / yolox_plan.name
    copy.write_bytes(yolox_plan.read_bytes())
    PlanStore.sidecar_path(copy).write_text(json.dumps(sidecar))
    with pytest.raises(PlanCompatibilityError, match=r"9\.0\.0"):
        TensorRTEngine(
            TensorRTConfig(type="tensorrt"),
            copy,
            runtime=runtime,
            cpus=CPUS,
            metadata=PlanStore.read_metadata(copy),
        )
