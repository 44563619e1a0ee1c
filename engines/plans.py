"""TensorRT plan store: serialized engines keyed by what makes a plan valid, each with a sidecar.

A plan only runs on the TensorRT version and the GPU it was built for, and it bakes in the
precision and the batch range of its optimisation profile. The store therefore files each plan
under a key of (model sha256, TensorRT version, compute capability, SoC, precision, batch
profile), as ``<root>/<slug>.plan`` plus ``<root>/<slug>.json`` (:class:`PlanMetadata`). Both
files are written atomically (temporary file, fsync, rename), the plan first: a plan without its
sidecar is an interrupted write and is not found.

At load the engine compares the sidecar with the running TensorRT and GPU
(:func:`compatibility_problems`) before it even tries to deserialize.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, ValidationError

from engines.configbase import StrictModel
from engines.errors import ModelFileError, ModelFormatError
from engines.fetch import atomic_write_bytes  # re-exported: existing imports use engines.plans

__all__ = [
    "DEVICE_TREE_COMPATIBLE",
    "DeviceIdentity",
    "PlanKey",
    "PlanMetadata",
    "PlanSettings",
    "PlanStore",
    "atomic_write_bytes",
    "compatibility_problems",
    "detect_device",
    "detect_soc",
    "plan_key",
]

DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9.]+")


@dataclass(frozen=True)
class DeviceIdentity:
    """The GPU a plan is built for: compute capability, SoC (``tegra234`` on Orin) and name."""

    compute_capability: tuple[int, int]
    soc: str
    name: str

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}"


def detect_soc(compatible: Path = DEVICE_TREE_COMPATIBLE) -> str:
    """The Tegra SoC from the device tree (``tegra234``), or ``dgpu`` on a discrete-GPU host."""
    try:
        raw = compatible.read_bytes()
    except OSError:
        return "dgpu"
    for entry in raw.split(b"\0"):
        text = entry.decode("ascii", "replace").strip()
        if text.startswith("nvidia,tegra"):
            return text.split(",", 1)[1]
    return "dgpu"


def detect_device(
    cuda: Any, index: int = 0, *, compatible: Path = DEVICE_TREE_COMPATIBLE
) -> DeviceIdentity:
    """Identify CUDA device ``index`` through pycuda (``cuda.init`` must be callable)."""
    cuda.init()
    device = cuda.Device(index)
    major, minor = device.compute_capability()
    return DeviceIdentity(
        compute_capability=(int(major), int(minor)),
        soc=detect_soc(compatible),
        name=str(device.name()),
    )


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; :meth:`slug` is its file name in the store."""

    model_sha256: str
    trt_version: str
    compute_capability: tuple[int, int]
    soc: str
    precision: str
    batch: tuple[int, int, int]

    def slug(self) -> str:
        major, minor = self.compute_capability
        low, opt, high = self.batch
        parts = [
            self.model_sha256[:16],
            f"trt{self.trt_version}",
            f"sm{major}{minor}",
            self.soc,
            self.precision,
            f"b{low}-{opt}-{high}",
        ]
        return "_".join(_SLUG_UNSAFE.sub("-", part) for part in parts)


class PlanSettings(Protocol):
    """What a plan key takes from a build request or an engine config: precision and batch."""

    @property
    def precision(self) -> str: ...

    @property
    def batch(self) -> tuple[int, int, int]: ...


def plan_key(settings: PlanSettings, *, model_sha256: str, trt_version: str,
             device: DeviceIdentity) -> PlanKey:  # fmt: skip
    """The store key of the plan ``settings`` (precision, batch) builds on ``device``."""
    return PlanKey(
        model_sha256=model_sha256,
        trt_version=trt_version,
        compute_capability=device.compute_capability,
        soc=device.soc,
        precision=settings.precision,
        batch=settings.batch,
    )


class PlanMetadata(StrictModel):
    """The JSON sidecar of a plan: its key plus how it was built."""

    format: Literal[1] = Field(default=1, description="Sidecar format version.")
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the source ONNX.")
    source_onnx: str = Field(description="Path of the ONNX the plan was built from.")
    trt_version: str = Field(description="TensorRT version that built (and must run) the plan.")
    compute_capability: tuple[int, int] = Field(
        description="GPU compute capability (major, minor)."
    )
    soc: str = Field(description="Tegra SoC (tegra234, ...) or `dgpu`.")
    device_name: str = Field(description="CUDA device name at build time.")
    precision: Literal["fp32", "fp16", "int8"] = Field(description="Builder precision.")
    batch: tuple[int, int, int] = Field(description="Batch optimisation profile (min, opt, max).")
    workspace_mib: int = Field(description="Workspace memory pool limit used for the build.")
    built_at: str = Field(description="UTC time the build finished (ISO 8601).")
    build_seconds: float = Field(description="Wall time of the build.")
    timing_cache: str | None = Field(default=None, description="Timing cache file used.")
    calibration_images: str | None = Field(
        default=None, description="INT8 calibration image folder."
    )
    calibration_batches: int | None = Field(
        default=None, description="INT8 calibration batches fed to the calibrator."
    )

    def key(self) -> PlanKey:
        return PlanKey(
            model_sha256=self.model_sha256,
            trt_version=self.trt_version,
            compute_capability=self.compute_capability,
            soc=self.soc,
            precision=self.precision,
            batch=self.batch,
        )


def compatibility_problems(
    meta: PlanMetadata, *, trt_version: str, device: DeviceIdentity
) -> list[str]:
    """Why a plan described by ``meta`` cannot run here (empty when it can)."""
    problems: list[str] = []
    if meta.trt_version != trt_version:
        problems.append(f"built by TensorRT {meta.trt_version}, this device runs {trt_version}")
    if tuple(meta.compute_capability) != device.compute_capability:
        built = ".".join(str(v) for v in meta.compute_capability)
        here = ".".join(str(v) for v in device.compute_capability)
        problems.append(f"built for compute capability {built}, this GPU is {here}")
    if meta.soc != device.soc:
        problems.append(f"built on SoC {meta.soc}, this device is {device.soc}")
    return problems


class PlanStore:
    """Plans and their sidecars in one folder (created on first write)."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        return self._root

    def plan_path(self, key: PlanKey) -> Path:
        return self._root / f"{key.slug()}{PLAN_SUFFIX}"

    @staticmethod
    def sidecar_path(plan: Path) -> Path:
        return plan.with_suffix(SIDECAR_SUFFIX)

    def find(self, key: PlanKey) -> Path | None:
        """The plan stored under ``key``, or ``None`` (also when its sidecar is missing)."""
        plan = self.plan_path(key)
        if plan.is_file() and self.sidecar_path(plan).is_file():
            return plan
        return None

    @classmethod
    def read_metadata(cls, plan: Path) -> PlanMetadata | None:
        """The sidecar of ``plan`` (``None`` when there is none)."""
        sidecar = cls.sidecar_path(plan)
        if not sidecar.exists():
            return None
        try:
            raw = sidecar.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"cannot read plan sidecar {sidecar} ({exc.strerror or exc}): check its rights"
            raise ModelFileError(msg) from exc
        try:
            return PlanMetadata.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(root)"
            msg = (
                f"plan sidecar {sidecar} is invalid at {where}: {first['msg']}: delete the plan "
                "and its sidecar and rebuild with `edge-agent models build-plan`"
            )
            raise ModelFormatError(msg) from exc

    def save(self, plan_bytes: bytes, meta: PlanMetadata) -> Path:
        """Store a plan under its metadata's key; returns the plan path."""
        plan = self.plan_path(meta.key())
        atomic_write_bytes(plan, plan_bytes)
        text = json.dumps(meta.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(self.sidecar_path(plan), text.encode("utf-8"))
        return plan

    def entries(self) -> list[tuple[Path, PlanMetadata]]:
        """Every complete plan in the store with its metadata, sorted by file name."""
        if not self._root.is_dir():
            return []
        found: list[tuple[Path, PlanMetadata]] = []
        for plan in sorted(self._root.glob(f"*{PLAN_SUFFIX}")):
            meta = self.read_metadata(plan)
            if meta is not None:
                found.append((plan, meta))
        return found
