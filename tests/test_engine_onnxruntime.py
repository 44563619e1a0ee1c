"""ONNX Runtime engine on the real detector models (yolox_nano_416, DEIMv2 atto).

Outputs are checked against a bare ``InferenceSession.run`` on the same input; the steady state
is checked to allocate nothing with tracemalloc (a statistical check over 500 calls, no timing).
"""

from __future__ import annotations

import gc
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engines.config import OnnxRuntimeConfig, TensorRTConfig
from engines.errors import (
    EngineClosedError,
    EngineUnavailableError,
    InferenceError,
    InputSpecError,
    ModelFileError,
    ModelFormatError,
    ProviderError,
)
from engines.onnxruntime import OnnxRuntimeEngine, intra_op_affinities
from engines.registry import ENGINES, build_engine

CPUS = frozenset({0, 1})
YOLOX_SHAPE = (1, 3, 416, 416)


def _config(**kwargs: object) -> OnnxRuntimeConfig:
    return OnnxRuntimeConfig.model_validate({"type": "onnxruntime", **kwargs})


@pytest.fixture(scope="module")
def yolox(models_dir: Path) -> Path:
    return models_dir / "yolox_nano_416.onnx"


@pytest.fixture(scope="module")
def deim(models_dir: Path) -> Path:
    return models_dir / "deimv2_hgnetv2_atto_coco.onnx"


@pytest.fixture(scope="module")
def bare(yolox: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(yolox), options, providers=["CPUExecutionProvider"])


@pytest.fixture
def engine(yolox: Path) -> OnnxRuntimeEngine:
    eng = build_engine(_config(), yolox, cpus=CPUS)
    assert isinstance(eng, OnnxRuntimeEngine)
    yield eng
    eng.close()


def _frame(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(YOLOX_SHAPE, dtype=np.float32) * 255).astype(np.float32)


def test_specs_and_outputs_match_bare_session(engine: OnnxRuntimeEngine, bare) -> None:
    (spec,) = engine.inputs
    assert (spec.name, spec.shape, spec.dtype) == ("images", YOLOX_SHAPE, np.dtype(np.float32))
    assert [(o.name, o.shape) for o in engine.outputs] == [("output", (1, 3549, 85))]
    frame = _frame(1)
    buffer = engine.input_buffer("images")
    buffer[...] = frame
    out = engine.infer({"images": buffer})["output"]
    np.testing.assert_allclose(out, bare.run(None, {"images": frame})[0], rtol=1e-4, atol=1e-3)
    other = _frame(2)
    out2 = engine.infer({"images": other})["output"]
    assert out2 is out  # engine-owned output buffer, rewritten in place
    np.testing.assert_allclose(out2, bare.run(None, {"images": other})[0], rtol=1e-4, atol=1e-3)


def test_submit_collect_overlaps_two_slots(engine: OnnxRuntimeEngine, bare) -> None:
    first, second = _frame(3), _frame(4)
    engine.input_buffer("images")[...] = first
    t1 = engine.submit()
    engine.input_buffer("images")[...] = second  # next slot's buffer while slot 0 runs
    t2 = engine.submit()
    assert (t1.slot, t2.slot) == (0, 1)
    with pytest.raises(InferenceError, match="collect"):
        engine.submit()  # both slots hold uncollected tickets
    out1 = engine.collect(t1)["output"]
    out2 = engine.collect(t2)["output"]
    assert out1 is not out2
    np.testing.assert_allclose(out1, bare.run(None, {"images": first})[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out2, bare.run(None, {"images": second})[0], rtol=1e-4, atol=1e-3)
    with pytest.raises(InferenceError, match="not outstanding"):
        engine.collect(t1)
    t3 = engine.submit()
    assert t3.slot == 0
    engine.collect(t3, timeout_s=30)
    assert engine.status()["worker"] == "pinned to 0-1"


def test_steady_state_allocates_no_arrays(engine: OnnxRuntimeEngine) -> None:
    """500 calls in 10 windows: the engine's live blocks/bytes stay flat, no per-call array.

    Traces are kept when any frame of their traceback lies in ``engines/`` (what the engine
    allocates, numpy arrays included), counted after a full ``gc.collect()`` (CPython keeps freed
    small tuples on free lists that tracemalloc still counts); the peak of all traced memory per
    window shows that no output-sized array is allocated even transiently.
    """
    frame = engine.input_buffer("images")
    frame[...] = _frame(5)
    feed = {"images": frame}
    output_bytes = engine.outputs[0].dtype.itemsize * 3549 * 85
    for _ in range(20):
        engine.infer(feed)
    engine_frames = [
        tracemalloc.Filter(inclusive=True, filename_pattern="*/engines/*", all_frames=True)
    ]
    tracemalloc.start(8)
    try:
        blocks: list[int] = []
        sizes: list[int] = []
        peaks: list[int] = []
        for _ in range(10):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(50):
                engine.infer(feed)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
            gc.collect()  # empties CPython's free lists, which tracemalloc counts as live
            stats = tracemalloc.take_snapshot().filter_traces(engine_frames).statistics("lineno")
            blocks.append(sum(stat.count for stat in stats))
            sizes.append(sum(stat.size for stat in stats))
    finally:
        tracemalloc.stop()
    assert max(peaks) < output_bytes // 8, peaks  # no output array allocated per call
    assert max(blocks) - min(blocks) <= 4, blocks  # flat, not growing with the call count
    assert max(sizes) - min(sizes) <= 1024, sizes


def test_dynamic_dims_resolved_from_input_buffer(deim: Path) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(deim), options, providers=["CPUExecutionProvider"])
    with OnnxRuntimeEngine(_config(), deim, cpus=CPUS) as engine:
        assert [s.shape for s in engine.inputs] == [(-1, 3, 320, 320), (-1, 2)]
        with pytest.raises(InputSpecError, match="dynamic dims"):
            engine.input_buffer("images")
        rng = np.random.default_rng(7)
        for batch in (2, 1):
            images = engine.input_buffer("images", (batch, 3, 320, 320))
            images[...] = rng.random(images.shape, dtype=np.float32)
            sizes = engine.input_buffer("orig_target_sizes", (batch, 2))
            sizes[...] = [[640, 480]] * batch
            out = engine.infer({})
            ref = session.run(None, {"images": images, "orig_target_sizes": sizes})
            assert out["labels"].shape == (batch, 300)
            assert out["boxes"].shape == (batch, 300, 4)
            np.testing.assert_array_equal(out["labels"], ref[0])
            np.testing.assert_allclose(out["boxes"], ref[1], rtol=1e-3, atol=1e-2)


def test_bad_inputs_are_typed_one_line_errors(engine: OnnxRuntimeEngine) -> None:
    good = np.zeros(YOLOX_SHAPE, np.float32)
    cases = [
        ({"image": good}, "no input 'image'"),
        ({"images": good[:, :, :320]}, r"shape \[1,3,320,416\]"),
        ({"images": good.astype(np.float64)}, "dtype float64"),
        ({"images": good.tolist()}, "numpy array"),
    ]
    for feed, pattern in cases:
        with pytest.raises(InputSpecError, match=pattern) as info:
            engine.infer(feed)
        assert "\n" not in str(info.value)
        assert "yolox_nano_416.onnx" in str(info.value)
    with pytest.raises(InputSpecError, match="no input"):
        engine.input_buffer("nope")


def test_non_contiguous_input_is_copied(engine: OnnxRuntimeEngine, bare) -> None:
    wide = np.ascontiguousarray(np.repeat(_frame(8), 2, axis=3))
    view = wide[:, :, :, ::2]
    assert not view.flags.c_contiguous
    out = engine.infer({"images": view})["output"]
    ref = bare.run(None, {"images": np.ascontiguousarray(view)})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


def test_missing_unreadable_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist") as info:
        OnnxRuntimeEngine(_config(), tmp_path / "absent.onnx", cpus=CPUS)
    assert "absent.onnx" in str(info.value)
    assert "models pull" in str(info.value)
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(ModelFileError, match="not a regular file"):
        OnnxRuntimeEngine(_config(), folder, cpus=CPUS)
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "gone.onnx")
    with pytest.raises(ModelFileError, match="does not exist"):
        OnnxRuntimeEngine(_config(), dangling, cpus=CPUS)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        OnnxRuntimeEngine(_config(), empty, cpus=CPUS)


@pytest.mark.parametrize("keep", [100, 1_000_000, -1024])
def test_truncated_onnx_is_a_format_error(yolox: Path, tmp_path: Path, keep: int) -> None:
    data = yolox.read_bytes()
    broken = tmp_path / "yolox_truncated.onnx"
    broken.write_bytes(data[:keep])
    with pytest.raises(ModelFormatError, match="truncated or corrupt") as info:
        OnnxRuntimeEngine(_config(), broken, cpus=CPUS)
    text = str(info.value)
    assert "\n" not in text
    assert str(broken) in text
    assert "models pull" in text


def test_garbage_file_is_a_format_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(ModelFormatError):
        OnnxRuntimeEngine(_config(), garbage, cpus=CPUS)


def test_required_provider_missing_and_fallback_reported(yolox: Path) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="CUDAExecutionProvider") as info:
        OnnxRuntimeEngine(_config(providers=providers, require_provider=True), yolox, cpus=CPUS)
    assert "require_provider" in str(info.value)
    with OnnxRuntimeEngine(_config(providers=providers), yolox, cpus=CPUS) as engine:
        status = engine.status()
    assert status["provider"] == "CPUExecutionProvider"
    assert status["fallbacks"] == [
        {"provider": "CUDAExecutionProvider", "reason": "not in this onnxruntime build"}
    ]
    json.dumps(status)


def test_threads_and_affinity_follow_the_pinned_set(yolox: Path) -> None:
    assert intra_op_affinities(frozenset({2, 3}), 2) == "4"
    assert intra_op_affinities(frozenset({0, 1, 2}), 4) == "2;3;1"
    assert intra_op_affinities(frozenset({5}), 3) is None
    with OnnxRuntimeEngine(_config(), yolox, cpus=frozenset({1})) as one:
        assert (one.status()["intra_op_threads"], one.status()["thread_affinities"]) == (1, None)
    with OnnxRuntimeEngine(_config(), yolox, cpus=CPUS) as two:
        assert (two.status()["intra_op_threads"], two.status()["thread_affinities"]) == (2, "2")
    with OnnxRuntimeEngine(_config(intra_op_threads=1), yolox, cpus=CPUS) as fixed:
        assert fixed.status()["intra_op_threads"] == 1


def test_profiling_writes_a_trace_file(yolox: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "prof" / "yolox"
    engine = OnnxRuntimeEngine(_config(profile_path=prefix), yolox, cpus=CPUS)
    engine.infer({"images": np.zeros(YOLOX_SHAPE, np.float32)})
    engine.close()
    trace = Path(engine.status()["profile_file"])
    assert trace.parent == prefix.parent
    assert trace.name.startswith("yolox")
    events = json.loads(trace.read_text())
    assert any(event.get("cat") == "Node" for event in events)


def test_close_is_idempotent_and_final(yolox: Path) -> None:
    engine = OnnxRuntimeEngine(_config(), yolox, cpus=CPUS)
    ticket = engine.submit({"images": np.zeros(YOLOX_SHAPE, np.float32)})
    engine.close()
    engine.close()
    assert engine.status()["closed"] is True
    with pytest.raises(EngineClosedError, match="closed"):
        engine.infer({"images": np.zeros(YOLOX_SHAPE, np.float32)})
    with pytest.raises(EngineClosedError):
        engine.collect(ticket)
    with pytest.raises(EngineClosedError):
        engine.input_buffer("images")


def test_registry_is_explicit_and_tensorrt_missing_is_typed(yolox: Path, tmp_path: Path) -> None:
    assert sorted(ENGINES) == ["onnxruntime", "tensorrt"]
    plan = tmp_path / "yolox.plan"
    plan.write_bytes(b"plan")
    strict = TensorRTConfig(type="tensorrt", fallback_to_onnxruntime=False)
    with pytest.raises(EngineUnavailableError, match="tensorrt") as info:
        build_engine(strict, plan, cpus=CPUS, source_onnx=yolox)
    assert "onnxruntime" in str(info.value)
    relaxed = TensorRTConfig(type="tensorrt")
    with build_engine(relaxed, plan, cpus=CPUS, source_onnx=yolox) as engine:
        status = engine.status()
    assert status["backend"] == "onnxruntime"
    assert status["fallback_from"]["reason"] == "engine_unavailable"
    assert status["fallback_from"]["backend"] == "tensorrt"
    with pytest.raises(EngineUnavailableError):
        build_engine(relaxed, plan, cpus=CPUS)  # no source ONNX: nothing to fall back to


def test_truncated_copy_keeps_other_engines_running(yolox: Path, tmp_path: Path) -> None:
    broken = tmp_path / "copy.onnx"
    shutil.copyfile(yolox, broken)
    with broken.open("r+b") as handle:
        handle.truncate(broken.stat().st_size // 2)
    with OnnxRuntimeEngine(_config(), yolox, cpus=CPUS) as healthy:
        with pytest.raises(ModelFormatError):
            OnnxRuntimeEngine(_config(), broken, cpus=CPUS)
        out = healthy.infer({"images": np.zeros(YOLOX_SHAPE, np.float32)})
        assert np.isfinite(out["output"]).all()


def test_pipelined_submit_mixed_with_infer_skips_busy_slots(engine: OnnxRuntimeEngine) -> None:
    feed = {"images": np.zeros(YOLOX_SHAPE, np.float32)}
    pending = engine.submit(feed)  # slot 0 stays out while infer() runs in slot 1
    engine.infer(feed)
    nxt = engine.submit(feed)  # slot 0 is still taken: the free slot 1 is used again
    assert (pending.slot, nxt.slot) == (0, 1)
    with pytest.raises(InferenceError, match="collect"):
        engine.input_buffer("images")  # no free slot to write into
    engine.collect(pending)
    engine.collect(nxt)
    assert engine.status()["in_flight"] == 0
