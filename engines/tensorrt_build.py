"""ONNX -> TensorRT plan with the TensorRT 10 builder API; progress is always reported.

``build_plan`` parses the ONNX (``OnnxParser.parse_from_file``), sets the precision flags
(FP16; INT8 with an ``IInt8EntropyCalibrator2`` fed from a folder of images), one optimisation
profile over the batch range, the workspace limit and a timing cache (loaded before, saved after),
builds with ``build_serialized_network`` and files the plan in the :class:`~engines.plans.PlanStore`
under its :class:`~engines.plans.PlanKey` with a JSON sidecar.

A long build must never look hung: an ``IProgressMonitor`` (TensorRT 10) reports each phase and,
at most every few seconds, its step count; a heartbeat thread says "still building" with the
elapsed time and current phase every ``heartbeat_s`` seconds whatever TensorRT reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from engines.errors import PlanBuildError
from engines.manifest import InputSpec
from engines.plans import (
    DeviceIdentity,
    PlanMetadata,
    PlanStore,
    atomic_write_bytes,
    detect_device,
    plan_key,
)
from engines.slots import check_model_file, file_sha256
from engines.tensorrt import TensorRTRuntime, make_trt_logger

__all__ = ["BuildRequest", "build_plan", "load_calibration_images", "plan_key"]

Progress = Callable[[str], None]
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_STEP_REPORT_S = 5.0


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the ONNX, the precision, the batch range and the builder settings."""

    onnx: Path
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    batch: tuple[int, int, int] = (1, 1, 1)
    workspace_mib: int = 1024
    calibration_images: Path | None = None
    input_spec: InputSpec | None = None
    timing_cache: Path | None = None
    device: int = 0
    calibration_limit: int = 500
    model_sha256: str | None = None
    """sha256 of ``onnx`` when the caller has already hashed it (else ``build_plan`` does)."""


def load_calibration_images(folder: Path, limit: int) -> list[Path]:
    """The image files (jpg/png/bmp) in ``folder``, sorted, at most ``limit``."""
    if not folder.is_dir():
        msg = f"calibration image folder {folder} does not exist: give a folder of JPEG/PNG files"
        raise PlanBuildError(msg)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        msg = f"calibration image folder {folder} holds no .jpg/.png/.bmp file: add a few hundred"
        raise PlanBuildError(msg)
    return images[:limit]


def _preprocess(path: Path, height: int, width: int, spec: InputSpec | None) -> npt.NDArray[Any]:
    """One calibration image as a CHW float32 array, the way the model is fed at run time."""
    import cv2  # noqa: PLC0415 - only INT8 builds read images

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        msg = f"cannot decode calibration image {path}: remove it or replace it with a JPEG/PNG"
        raise PlanBuildError(msg)
    if spec is None or spec.color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    pixels: npt.NDArray[np.float32]
    if spec is not None and spec.resize == "letterbox":
        scale = min(width / image.shape[1], height / image.shape[0])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        pixels = np.full((height, width, 3), spec.pad_value, dtype=np.float32)
        top = (height - size[1]) // 2 if spec.letterbox_align == "center" else 0
        left = (width - size[0]) // 2 if spec.letterbox_align == "center" else 0
        pixels[top : top + size[1], left : left + size[0]] = resized
    else:
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        pixels = np.asarray(resized, dtype=np.float32)
    if spec is None:
        pixels = (pixels / np.float32(255.0)).astype(np.float32)
    else:
        mean = np.asarray(spec.mean, np.float32)
        std = np.asarray(spec.std, np.float32)
        pixels = ((pixels * np.float32(spec.scale) - mean) / std).astype(np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def _make_calibrator(
    runtime: TensorRTRuntime,
    *,
    images: list[Path],
    shape: tuple[int, ...],
    spec: InputSpec | None,
    cache: Path,
    progress: Progress,
) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``images`` in batches of ``shape[0]``."""
    trt, cuda = runtime.trt, runtime.cuda
    base = trt.IInt8EntropyCalibrator2

    class _EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.host = cuda.pagelocked_empty(shape, np.float32)
            self.device = cuda.mem_alloc(self.host.nbytes)
            self.next_image = 0
            self.batches = 0

        def get_batch_size(self) -> int:
            return int(shape[0])

        def get_batch(self, names: list[str], p_str: Any = None) -> list[int] | None:
            del names, p_str
            batch = int(shape[0])
            if self.next_image + batch > len(images):
                return None
            for row in range(batch):
                self.host[row] = _preprocess(images[self.next_image + row], shape[2], shape[3],
                                             spec)  # fmt: skip
            self.next_image += batch
            self.batches += 1
            cuda.memcpy_htod(self.device, self.host)
            progress(f"calibration batch {self.batches} ({self.next_image}/{len(images)} images)")
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            if cache.is_file():
                progress(f"reusing calibration cache {cache}")
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            atomic_write_bytes(cache, bytes(data))
            progress(f"saved calibration cache {cache}")

        def release(self) -> None:
            self.device.free()
            self.host.base.free()

    return _EntropyCalibrator()


class _Reporter:
    """Progress lines from TensorRT's monitor and a heartbeat; thread-safe."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._phases: list[str] = []
        self._steps: dict[str, int] = {}
        self._last_step_report = 0.0
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        with self._lock:
            self._progress(message)

    def phase_start(self, name: str, parent: str | None, steps: int) -> None:
        with self._lock:
            self._phases.append(name)
            self._steps[name] = int(steps)
            where = f" (in {parent})" if parent else ""
            self._progress(f"phase {name!r}{where} started: {steps} steps")

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._last_step_report >= _STEP_REPORT_S:
                self._last_step_report = now
                self._progress(f"phase {name!r}: step {step + 1}/{self._steps.get(name, '?')}")
        return True

    def phase_finish(self, name: str) -> None:
        with self._lock:
            if name in self._phases:
                self._phases.remove(name)
            self._progress(f"phase {name!r} finished")

    def heartbeat(self) -> None:
        with self._lock:
            phase = self._phases[-1] if self._phases else "TensorRT builder"
            elapsed = time.monotonic() - self.started
            self._progress(f"still building: {elapsed:.0f} s elapsed, in {phase!r}")


def _make_monitor(trt: Any, reporter: _Reporter) -> Any | None:
    base: Any = getattr(trt, "IProgressMonitor", None)
    if base is None:  # TensorRT before 10.0: phase messages and the heartbeat only
        return None

    class _Monitor(base):  # type: ignore[misc]
        def __init__(self) -> None:
            base.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            reporter.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return reporter.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            reporter.phase_finish(phase_name)

    return _Monitor()


@contextmanager
def _heartbeat(reporter: _Reporter, every_s: float) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            reporter.heartbeat()

    thread = threading.Thread(target=beat, name="plan-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(every_s + 1.0)


def _profile_shapes(
    network: Any, batch: tuple[int, int, int], onnx: Path
) -> dict[str, list[tuple[int, ...]]]:
    """min/opt/max shapes per network input; only the batch (first) dim may be dynamic."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in dims[1:]):
            msg = (
                f"input {tensor.name!r} of {onnx} has dynamic dims besides the batch "
                f"{list(dims)}: re-export the ONNX with a fixed input size"
            )
            raise PlanBuildError(msg)
        if dims and dims[0] >= 0:
            if batch != (dims[0],) * 3:
                msg = (
                    f"input {tensor.name!r} of {onnx} has a fixed batch of {dims[0]}: build "
                    f"with --batch {dims[0]} (or re-export the ONNX with a dynamic batch)"
                )
                raise PlanBuildError(msg)
            shapes[tensor.name] = [dims, dims, dims]
        else:
            shapes[tensor.name] = [(size, *dims[1:]) for size in batch]
    return shapes


@contextmanager
def _cuda_context(runtime: TensorRTRuntime, index: int) -> Iterator[DeviceIdentity]:
    cuda = runtime.cuda
    identity = detect_device(cuda, index, compatible=runtime.compatible)
    context = cuda.Device(index).retain_primary_context()
    context.push()
    try:
        yield identity
    finally:
        cuda.Context.pop()
        context.detach()


def build_plan(
    request: BuildRequest,
    store: PlanStore,
    *,
    runtime: TensorRTRuntime,
    progress: Progress,
    heartbeat_s: float = 15.0,
) -> Path:
    """Build ``request`` into ``store`` and return the plan path (``PlanBuildError`` on failure).

    An existing plan under the same key is rebuilt (the caller decides whether to build).
    """
    low, opt, high = request.batch
    if not 1 <= low <= opt <= high:
        msg = f"batch {list(request.batch)} must be min,opt,max with 1 <= min <= opt <= max"
        raise PlanBuildError(msg)
    onnx = request.onnx
    check_model_file(onnx, fix="give the path of the model's ONNX file")
    images: list[Path] = []
    if request.precision == "int8":
        if request.calibration_images is None:
            msg = (
                f"an INT8 plan of {onnx} needs calibration images: pass --calibration-images "
                "FOLDER (a few hundred frames like the ones the camera sees)"
            )
            raise PlanBuildError(msg)
        images = load_calibration_images(request.calibration_images, request.calibration_limit)
    trt = runtime.trt
    reporter = _Reporter(progress)
    sha = request.model_sha256 if request.model_sha256 is not None else file_sha256(onnx)
    with _cuda_context(runtime, request.device) as device:
        key = plan_key(request, model_sha256=sha, trt_version=str(trt.__version__), device=device)
        reporter.say(
            f"building {request.precision} plan of {onnx.name} for {device.name} "
            f"({device.sm}, {device.soc}), TensorRT {trt.__version__}, batch {list(request.batch)}"
        )
        logger = make_trt_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        reporter.say(f"parsing {onnx}")
        if not parser.parse_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            msg = f"TensorRT cannot parse {onnx} ({' '.join(errors.split())}): check the ONNX"
            raise PlanBuildError(msg)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_mib << 20)
        shapes = _profile_shapes(network, request.batch, onnx)
        profile = builder.create_optimization_profile()
        for name, (smallest, optimal, largest) in shapes.items():
            profile.set_shape(name, smallest, optimal, largest)
        config.add_optimization_profile(profile)
        if request.precision in {"fp16", "int8"}:
            if not builder.platform_has_fast_fp16:
                reporter.say("this GPU has no fast FP16; the plan may not be faster than FP32")
            config.set_flag(trt.BuilderFlag.FP16)
        calibrator = None
        if request.precision == "int8":
            if not builder.platform_has_fast_int8:
                reporter.say("this GPU has no fast INT8; the plan may not be faster than FP16")
            first = network.get_input(0)
            calibration_shape = shapes[first.name][1]
            if len(calibration_shape) != 4 or len(images) < calibration_shape[0]:
                msg = (
                    f"INT8 calibration of {onnx} needs an NCHW image input and at least "
                    f"{calibration_shape[0]} images (found {len(images)})"
                )
                raise PlanBuildError(msg)
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = _make_calibrator(
                runtime,
                images=images,
                shape=calibration_shape,
                spec=request.input_spec,
                cache=store.plan_path(key).with_suffix(".calib"),
                progress=reporter.say,
            )
            config.int8_calibrator = calibrator
            config.set_calibration_profile(profile)
        cache_name = f"timing_trt{trt.__version__}_{device.sm}.cache"
        cache_path = request.timing_cache or store.root / cache_name
        cache_data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_data)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            reporter.say(f"timing cache {cache_path} does not fit this GPU/TensorRT; starting anew")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        elif cache_data:
            reporter.say(f"reusing timing cache {cache_path}")
        monitor = _make_monitor(trt, reporter)
        if monitor is not None:
            config.progress_monitor = monitor
        else:
            reporter.say("this TensorRT has no progress monitor: heartbeat messages only")
        reporter.say("optimising (TensorRT picks kernels; this takes minutes on a Jetson)")
        started = time.monotonic()
        try:
            with _heartbeat(reporter, heartbeat_s):
                serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.release()
        if serialized is None:
            msg = f"TensorRT failed to build {onnx} ({logger.last_error()}): see the log above"
            raise PlanBuildError(msg)
        seconds = time.monotonic() - started
        final_cache = config.get_timing_cache()
        if final_cache is not None:
            atomic_write_bytes(cache_path, bytes(final_cache.serialize()))
            reporter.say(f"saved timing cache {cache_path}")
        meta = PlanMetadata(
            model_sha256=sha,
            source_onnx=str(onnx),
            trt_version=str(trt.__version__),
            compute_capability=device.compute_capability,
            soc=device.soc,
            device_name=device.name,
            precision=request.precision,
            batch=request.batch,
            workspace_mib=request.workspace_mib,
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(seconds, 3),
            timing_cache=str(cache_path),
            calibration_images=(
                str(request.calibration_images) if request.precision == "int8" else None
            ),
            calibration_batches=calibrator.batches if calibrator is not None else None,
        )
        plan = store.save(bytes(serialized), meta)
        reporter.say(f"saved plan {plan} ({seconds:.1f} s)")
        return plan
