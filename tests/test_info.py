"""`edge-agent info`: the real machine, plus board files of a Jetson Orin and a Raspberry Pi 5.

The Jetson and Pi cases build the files those boards have (device tree, nv_tegra_release,
cpuinfo, /dev nodes) under tmp_path and read them with ``root=``: that is input parsing on the
exact file formats, not a double.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest

from agent.cli import main
from agent.config import PinningConfig
from agent.info import collect_info, read_board
from agent.pinning import plan_pinning
from engines.affinity import format_cpulist

ROOT = Path(__file__).resolve().parents[1]
NO_SMI = "nvidia-smi-not-installed-here"

ORIN_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
    "DATE: Mon May  6 17:34:21 UTC 2024\n"
    "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)
ARM_CPUINFO = (
    "processor\t: {n}\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x{variant}\n"
    "CPU part\t: {part}\nCPU revision\t: 1\n\n"
)


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")


def _arm_tree(root: Path, *, cpus: int, part: str, mem_kb: int) -> None:
    _write(
        root / "proc/cpuinfo",
        "".join(ARM_CPUINFO.format(n=n, part=part, variant=1) for n in range(cpus)),
    )
    _write(root / "sys/devices/system/cpu/online", f"0-{cpus - 1}\n")
    _write(root / "sys/devices/system/node/node0/cpulist", f"0-{cpus - 1}\n")
    _write(root / "sys/devices/system/node/node0/meminfo", f"Node 0 MemTotal: {mem_kb} kB\n")
    _write(
        root / "proc/meminfo",
        f"MemTotal:       {mem_kb} kB\nMemFree:  1000 kB\nMemAvailable:   {mem_kb // 2} kB\n",
    )
    _write(root / "proc/sys/kernel/osrelease", "5.15.136-tegra\n")


@pytest.fixture
def jetson_orin(tmp_path: Path) -> Path:
    _arm_tree(tmp_path, cpus=12, part="0xd42", mem_kb=62_758_768)
    _write(tmp_path / "proc/device-tree/model", b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    _write(
        tmp_path / "proc/device-tree/compatible",
        b"nvidia,p3737-0000+p3701-0005\x00nvidia,p3701-0005\x00nvidia,tegra234\x00",
    )
    _write(tmp_path / "etc/nv_tegra_release", ORIN_RELEASE)
    for node in ("nvhost-ctrl-gpu", "nvhost-gpu", "nvhost-as-gpu", "nvmap"):
        _write(tmp_path / "dev" / node, "")
    return tmp_path


@pytest.fixture
def raspberry_pi5(tmp_path: Path) -> Path:
    _arm_tree(tmp_path, cpus=4, part="0xd0b", mem_kb=8_245_904)
    _write(tmp_path / "proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\x00")
    _write(tmp_path / "proc/device-tree/compatible", b"raspberrypi,5-model-b\x00brcm,bcm2712\x00")
    (tmp_path / "dev").mkdir()
    _write(tmp_path / "dev/video19", "")
    return tmp_path


# --- this machine ----------------------------------------------------------------------------


def test_collect_info_on_this_machine() -> None:
    info = collect_info()
    assert info.cpus.allowed == frozenset(os.sched_getaffinity(0))
    assert info.cpus.online is not None
    assert info.cpus.online >= info.cpus.allowed
    assert info.python == ".".join(str(v) for v in sys.version_info[:3])
    assert info.kernel == os.uname().release
    assert info.arch == os.uname().machine
    assert info.memory.total_kb is not None
    assert info.memory.available_kb is not None
    assert 0 < info.memory.available_kb <= info.memory.total_kb
    assert info.pinning == plan_pinning(PinningConfig()).to_status()


def test_engines_reflect_what_is_importable_here() -> None:
    info = collect_info()
    assert [e.name for e in info.engines] == ["onnxruntime", "tensorrt", "pycuda", "llama_cpp"]
    ort = info.engine("onnxruntime")
    assert ort is not None
    assert ort.available is True
    assert ort.version == onnxruntime.__version__
    assert ort.providers == tuple(onnxruntime.get_available_providers())
    assert "CPUExecutionProvider" in ort.providers
    for name in ("tensorrt", "pycuda", "llama_cpp"):
        engine = info.engine(name)
        assert engine is not None
        importable = importlib.util.find_spec(name) is not None
        assert engine.available is importable
        if not importable:
            assert engine.detail == f"ModuleNotFoundError: No module named '{name}'"


def test_no_gpu_without_nvidia_smi_or_jetson_nodes() -> None:
    has_jetson_nodes = any(Path("/dev").glob("nvhost*"))
    if shutil.which("nvidia-smi") is not None or has_jetson_nodes:
        pytest.skip("this machine has an NVIDIA GPU")
    assert collect_info().gpus == ()


def test_info_json_parses_and_names_the_cpu_provider(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    engines = {e["name"]: e for e in data["engines"]}
    assert "CPUExecutionProvider" in engines["onnxruntime"]["providers"]
    assert data["cpus"]["allowed"] == format_cpulist(frozenset(os.sched_getaffinity(0)))
    assert data["pinning"]["process_cpus"] == data["cpus"]["allowed"]
    assert set(data["pinning"]["stage_cpus"]) == {
        "capture",
        "preprocess",
        "inference",
        "postprocess",
        "llm",
        "reporting",
    }


def test_info_table_has_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    keys = [re.split(r"\s{2,}", line.strip())[0] for line in out.splitlines()]
    for key in ("board", "cpus", "memory", "gpu", "engines", "onnxruntime", "inference"):
        assert key in keys, out
    assert "CPUExecutionProvider" in out
    assert "pinning (default config)" in out


def test_info_help_has_an_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "info", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Examples:" in proc.stdout
    assert "edge-agent info --json" in proc.stdout


def test_info_root_that_is_not_a_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert main(["info", "--root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"edge-agent info: --root {missing} is not a folder"


# --- board files -----------------------------------------------------------------------------


def test_jetson_agx_orin(jetson_orin: Path) -> None:
    info = collect_info(jetson_orin, nvidia_smi=NO_SMI)
    board = info.board
    assert board.kind == "jetson"
    assert board.model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert board.soc == "tegra234"
    assert board.l4t_release == "36.3.0"
    assert board.l4t_board == "generic"
    assert info.cpus.model == "Cortex-A78AE"
    assert info.cpus.online == frozenset(range(12))
    assert info.kernel == "5.15.136-tegra"
    assert info.memory.total_kb == 62_758_768
    assert [n.cpus for n in info.numa_nodes] == [frozenset(range(12))]
    assert len(info.gpus) == 1
    gpu = info.gpus[0]
    assert gpu.kind == "jetson"
    assert gpu.name == "integrated GPU (tegra234)"
    assert gpu.devices == (
        "/dev/nvhost-as-gpu",
        "/dev/nvhost-ctrl-gpu",
        "/dev/nvhost-gpu",
        "/dev/nvmap",
    )


def test_jetson_jetpack5_release_and_missing_model(tmp_path: Path) -> None:
    _write(
        tmp_path / "etc/nv_tegra_release",
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
        "DATE: Tue Aug  1 19:57:35 UTC 2023\n",
    )
    board = read_board(tmp_path)
    assert board.kind == "jetson"
    assert board.model == "NVIDIA Jetson (model not in device tree)"
    assert board.l4t_release == "35.4.1"
    assert board.l4t_board == "t186ref"


def test_jetson_table_shows_l4t_and_gpu_nodes(
    jetson_orin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--root", str(jetson_orin)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA Jetson AGX Orin Developer Kit [jetson], SoC tegra234, L4T 36.3.0" in out
    assert "/dev/nvmap" in out
    assert "Cortex-A78AE" in out


def test_raspberry_pi_5(raspberry_pi5: Path) -> None:
    info = collect_info(raspberry_pi5, nvidia_smi=NO_SMI)
    assert info.board.kind == "raspberry_pi"
    assert info.board.model == "Raspberry Pi 5 Model B Rev 1.0"
    assert info.board.soc == "bcm2712"
    assert info.board.l4t_release is None
    assert info.cpus.model == "Cortex-A76"
    assert info.cpus.online == frozenset(range(4))
    assert info.memory.available_kb == 8_245_904 // 2
    assert info.gpus == ()
    data = info.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["board"] == {
        "kind": "raspberry_pi",
        "model": "Raspberry Pi 5 Model B Rev 1.0",
        "soc": "bcm2712",
        "vendor": "Raspberry Pi",
        "l4t_release": None,
        "l4t_board": None,
    }


def test_generic_pc_uses_the_dmi_product_name(tmp_path: Path) -> None:
    _write(tmp_path / "sys/class/dmi/id/product_name", "ProLiant DL380 Gen10\n")
    _write(tmp_path / "sys/class/dmi/id/sys_vendor", "HPE\n")
    board = read_board(tmp_path)
    assert board.kind == "generic"
    assert board.model == "ProLiant DL380 Gen10"
    assert board.vendor == "HPE"


def test_generic_without_any_board_file(tmp_path: Path) -> None:
    board = read_board(tmp_path)
    assert board.kind == "generic"
    assert board.model.startswith("unknown")


def test_nvidia_smi_output_contract(tmp_path: Path) -> None:
    # A stand-in for the real nvidia-smi (no NVIDIA GPU here): it accepts exactly the query the
    # agent sends and prints the documented csv,noheader,nounits format, one line per GPU.
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'if [ "$*" != "--query-gpu=name,driver_version,memory.total '
        '--format=csv,noheader,nounits" ]; then echo "bad args: $*" >&2; exit 2; fi\n'
        'echo "NVIDIA RTX A2000 12GB, 550.54.14, 12282"\n'
        'echo "NVIDIA L4, 550.54.14, 23034"\n',
        encoding="ascii",
    )
    smi.chmod(0o755)
    gpus = collect_info(tmp_path, nvidia_smi=str(smi)).gpus
    assert [(g.kind, g.name, g.driver, g.memory_total_mib) for g in gpus] == [
        ("nvidia", "NVIDIA RTX A2000 12GB", "550.54.14", 12282),
        ("nvidia", "NVIDIA L4", "550.54.14", 23034),
    ]


def test_info_config_shows_that_configs_pinning_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = max(os.sched_getaffinity(0))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[pinning]\nprocess = "auto"\n\n[pinning.stages]\ninference = [{last}]\n',
        encoding="utf-8",
    )
    assert main(["info", "--json", "--config", str(config)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pinning_source"] == str(config)
    assert data["pinning"]["stage_cpus"]["inference"] == str(last)
    assert data["pinning"]["process_cpus"] == data["cpus"]["allowed"]


def test_info_config_with_cpus_outside_the_allowed_set_shows_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beyond = max(os.sched_getaffinity(0)) + 1
    config = tmp_path / "agent.toml"
    config.write_text(f"[pinning]\nprocess = [{beyond}]\n", encoding="utf-8")
    assert main(["info", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"pinning ({config})" in out
    assert f"pinning.process: CPUs {beyond} are outside the allowed set" in out
