"""What this device is and what it can run: the data behind ``edge-agent info``.

Files are read under ``root`` (``/`` by default; tests and offline inspection of a mounted
image pass another folder):

- board: ``/proc/device-tree/model`` and ``compatible`` (Jetson, Raspberry Pi), Jetson's
  ``/etc/nv_tegra_release`` (L4T release), else the DMI product name of a PC;
- CPUs: ``/sys/devices/system/cpu/online``, ``/proc/cpuinfo``, the cgroup cpuset; NUMA nodes
  from ``/sys/devices/system/node``; memory from ``/proc/meminfo``;
- GPU: ``nvidia-smi`` when installed, Jetson's ``/dev/nvhost*`` and ``/dev/nvmap``.

Properties of the running process are read live: the allowed CPU set (``sched_getaffinity``),
the Python version, and the engines importable here (ONNX Runtime and its execution providers,
TensorRT + pycuda, llama.cpp). The pinning shown is the plan that the given (default) pinning
config would apply on this machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from agent.config import PinningConfig
from agent.errors import PinningError
from agent.numa import NumaNode, mems_allowed, read_nodes
from agent.pinning import CgroupCpus, allowed_cpus, cgroup_cpus, plan_pinning
from agent.sysfs import kb_values
from engines.affinity import format_cpulist, parse_cpulist

__all__ = [
    "BoardInfo",
    "CpuInfo",
    "DeviceInfo",
    "EngineInfo",
    "GpuInfo",
    "MemoryInfo",
    "collect_info",
]

BoardKind = Literal["jetson", "raspberry_pi", "generic"]

# ARM "CPU part" numbers of the cores on the supported boards (and their neighbours).
_ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD41: "Cortex-A78",
    0xD42: "Cortex-A78AE",
    0xD4B: "Cortex-A78C",
}
_NV_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_NV_BOARD = re.compile(r"BOARD:\s*([^,\s]+)")
_NVIDIA_SMI_TIMEOUT_S = 10


@dataclass(frozen=True)
class BoardInfo:
    """The board: ``kind`` plus the model string the firmware reports."""

    kind: BoardKind
    model: str
    soc: str | None = None
    vendor: str | None = None
    l4t_release: str | None = None
    l4t_board: str | None = None


@dataclass(frozen=True)
class CpuInfo:
    """CPUs: those this process may use, those online, the cgroup cpuset and the core model."""

    allowed: frozenset[int]
    online: frozenset[int] | None
    model: str | None
    cgroup: CgroupCpus | None


@dataclass(frozen=True)
class MemoryInfo:
    total_kb: int | None
    available_kb: int | None


@dataclass(frozen=True)
class EngineInfo:
    """One inference runtime: importable here or not, its version and its providers."""

    name: str
    available: bool
    version: str | None = None
    providers: tuple[str, ...] = ()
    detail: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    kind: Literal["nvidia", "jetson"]
    name: str
    driver: str | None = None
    memory_total_mib: int | None = None
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceInfo:
    """Everything ``edge-agent info`` prints; :meth:`to_dict` is its JSON form."""

    board: BoardInfo
    arch: str
    kernel: str
    python: str
    cpus: CpuInfo
    numa_nodes: tuple[NumaNode, ...]
    memory: MemoryInfo
    engines: tuple[EngineInfo, ...]
    gpus: tuple[GpuInfo, ...]
    pinning: dict[str, object]
    pinning_source: str = "default config"

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form: CPU sets as cpulist strings (``"0-3,6"``), paths as text."""
        result = _jsonable(self)
        if not isinstance(result, dict):  # pragma: no cover - a dataclass always gives a dict
            msg = "DeviceInfo did not serialise to an object"
            raise TypeError(msg)
        return result

    def engine(self, name: str) -> EngineInfo | None:
        return next((e for e in self.engines if e.name == name), None)


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, frozenset):
        return format_cpulist(frozenset(int(v) for v in value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _device_tree_strings(path: Path) -> list[str]:
    """A device-tree property: NUL-separated strings (``model`` has one, ``compatible`` many)."""
    text = _read_text(path)
    if text is None:
        return []
    return [part.strip() for part in text.split("\0") if part.strip()]


def read_board(root: Path = Path("/")) -> BoardInfo:
    """Jetson (device tree + ``nv_tegra_release``), Raspberry Pi (device tree), else generic."""
    models = _device_tree_strings(root / "proc/device-tree/model")
    model = models[0] if models else None
    compatible = _device_tree_strings(root / "proc/device-tree/compatible")
    soc = compatible[-1].split(",", 1)[-1] if compatible else None
    release_text = _read_text(root / "etc/nv_tegra_release")
    is_tegra = any("tegra" in c for c in compatible)
    if release_text is not None or is_tegra or (model and "jetson" in model.lower()):
        l4t = board = None
        if release_text is not None:
            match = _NV_RELEASE.search(release_text)
            if match:
                l4t = f"{match.group(1)}.{match.group(2)}"
            board_match = _NV_BOARD.search(release_text)
            board = board_match.group(1) if board_match else None
        return BoardInfo(
            kind="jetson",
            model=model or "NVIDIA Jetson (model not in device tree)",
            soc=soc,
            vendor="NVIDIA",
            l4t_release=l4t,
            l4t_board=board,
        )
    if model and model.startswith("Raspberry Pi"):
        return BoardInfo(kind="raspberry_pi", model=model, soc=soc, vendor="Raspberry Pi")
    dmi = root / "sys/class/dmi/id"
    product = (_read_text(dmi / "product_name") or "").strip()
    vendor = (_read_text(dmi / "sys_vendor") or "").strip()
    return BoardInfo(
        kind="generic",
        model=model or product or "unknown (no device tree model, no DMI product name)",
        soc=soc,
        vendor=vendor or None,
    )


def _cpu_model(root: Path) -> str | None:
    text = _read_text(root / "proc/cpuinfo")
    if text is None:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    if "model name" in fields:
        return fields["model name"]
    part = fields.get("CPU part")
    if part:
        try:
            number = int(part, 16)
        except ValueError:
            return f"ARM part {part}"
        return _ARM_PARTS.get(number, f"ARM part {part}")
    return fields.get("cpu model") or fields.get("Processor")


def _online_cpus(root: Path) -> frozenset[int] | None:
    text = _read_text(root / "sys/devices/system/cpu/online")
    if text is None:
        return None
    try:
        return parse_cpulist(text)
    except ValueError:
        return None


def _memory(root: Path) -> MemoryInfo:
    values = kb_values(_read_text(root / "proc/meminfo") or "")
    return MemoryInfo(values.get("MemTotal"), values.get("MemAvailable"))


def _kernel(root: Path) -> str:
    text = _read_text(root / "proc/sys/kernel/osrelease")
    return text.strip() if text else platform.release()


def _version_of(module: object, dist: str) -> str | None:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def probe_engines() -> tuple[EngineInfo, ...]:
    """Import each runtime: ONNX Runtime (+ providers), TensorRT, pycuda, llama.cpp."""
    engines: list[EngineInfo] = []
    ort, error = _import("onnxruntime")
    if ort is None:
        engines.append(EngineInfo("onnxruntime", available=False, detail=error))
    else:
        providers = tuple(str(p) for p in ort.get_available_providers())
        device = str(ort.get_device())
        engines.append(
            EngineInfo(
                "onnxruntime",
                available=True,
                version=_version_of(ort, "onnxruntime"),
                providers=providers,
                detail=f"device {device}",
            )
        )
    trt, error = _import("tensorrt")
    engines.append(
        EngineInfo("tensorrt", available=False, detail=error)
        if trt is None
        else EngineInfo("tensorrt", available=True, version=_version_of(trt, "tensorrt"))
    )
    cuda, error = _import("pycuda")
    if cuda is None:
        engines.append(EngineInfo("pycuda", available=False, detail=error))
    else:
        text = getattr(cuda, "VERSION_TEXT", None)
        version = text if isinstance(text, str) else _version_of(cuda, "pycuda")
        engines.append(EngineInfo("pycuda", available=True, version=version))
    llama, error = _import("llama_cpp")
    if llama is None:
        engines.append(EngineInfo("llama_cpp", available=False, detail=error))
    else:
        offload = getattr(llama, "llama_supports_gpu_offload", None)
        detail = None
        if callable(offload):
            detail = "GPU offload" if offload() else "CPU only"
        engines.append(
            EngineInfo(
                "llama_cpp",
                available=True,
                version=_version_of(llama, "llama_cpp_python"),
                detail=detail,
            )
        )
    return tuple(engines)


def _nvidia_smi_gpus(command: str) -> tuple[GpuInfo, ...]:
    exe = shutil.which(command)
    if exe is None:
        return ()
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (GpuInfo("nvidia", name=f"nvidia-smi failed: {exc}"),)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        return (GpuInfo("nvidia", name=f"nvidia-smi failed: {reason[0] if reason else ''}"),)
    gpus: list[GpuInfo] = []
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        memory = int(parts[2]) if parts[2].isdigit() else None
        gpus.append(GpuInfo("nvidia", name=parts[0], driver=parts[1], memory_total_mib=memory))
    return tuple(gpus)


def _jetson_gpu(root: Path, board: BoardInfo) -> tuple[GpuInfo, ...]:
    dev = root / "dev"
    nodes = sorted(p.name for p in dev.glob("nvhost*")) if dev.is_dir() else []
    if (dev / "nvmap").exists():
        nodes.append("nvmap")
    if board.kind != "jetson" and not nodes:
        return ()
    name = f"integrated GPU ({board.soc})" if board.soc else "integrated GPU"
    return (GpuInfo("jetson", name=name, devices=tuple(f"/dev/{n}" for n in nodes)),)


def collect_info(
    root: Path = Path("/"),
    *,
    pinning: PinningConfig | None = None,
    pinning_source: str = "default config",
    nvidia_smi: str = "nvidia-smi",
) -> DeviceInfo:
    """Gather :class:`DeviceInfo`; files under ``root``, process properties live.

    ``pinning`` is the config whose plan is shown (default: the embedded default config, else
    say where it came from in ``pinning_source``); a config that cannot be applied here is shown
    as ``{"error": ...}``, not raised. ``nvidia_smi`` names the nvidia-smi command.
    """
    board = read_board(root)
    nodes = read_nodes(root)
    try:
        plan: dict[str, object] = plan_pinning(
            pinning or PinningConfig(), nodes=nodes, mems=mems_allowed(root)
        ).to_status()
    except PinningError as exc:
        plan = {"error": str(exc)}
    gpus = _nvidia_smi_gpus(nvidia_smi) or _jetson_gpu(root, board)
    return DeviceInfo(
        board=board,
        arch=platform.machine(),
        kernel=_kernel(root),
        python=platform.python_version(),
        cpus=CpuInfo(
            allowed=allowed_cpus(),
            online=_online_cpus(root),
            model=_cpu_model(root),
            cgroup=cgroup_cpus(root),
        ),
        numa_nodes=nodes,
        memory=_memory(root),
        engines=probe_engines(),
        gpus=gpus,
        pinning=plan,
        pinning_source=pinning_source,
    )
