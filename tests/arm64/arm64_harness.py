"""A Debian bookworm arm64 rootfs run under qemu-user emulation, with the agent installed in it.

Built with the real-systemd suite's cache helpers (tests/systemd/nspawn_harness.py: cache
folder ``$EDGE_AGENT_CI_CACHE`` or ``/var/cache/edge-agent-ci``, one exclusive lock, tarballs
renamed into place only when complete), under its own names so neither suite prunes the other:

    base rootfs   debootstrap --arch=arm64 --variant=minbase       arm64-bookworm-<base>.tar.zst
                  + PACKAGES, second stage run under qemu          (+ .json: its python, glibc)
    wheelhouse    pip download --platform manylinux_*_aarch64      arm64-wheelhouse-<pins>/
                  of the locked runtime deps, llama-cpp-python excepted (no aarch64 wheel)
    deps rootfs   base + /opt/edge-agent/venv with those wheels    arm64-bookworm-<base>-deps-
                  (pip runs inside the rootfs, under qemu)         <pins>.tar.zst

Per test session the deps rootfs is unpacked into a scratch tmpfs and the project wheel (built
fresh from the checkout, pure Python) is installed with ``pip --no-index --no-deps``.

Every aarch64 binary runs through binfmt_misc's ``qemu-aarch64`` entry with the ``F`` flag
(Debian's qemu-user-static registers it so): the kernel opens the interpreter when the entry
is registered, so it works inside the rootfs without copying qemu into it. ``ensure_binfmt``
mounts binfmt_misc and enables the entry when needed.

``agent_command`` runs the agent with ``systemd-nspawn`` (no ``--boot``, the host's network so
it reaches a broker on 127.0.0.1), qemu emulating a Cortex-A72 (``QEMU_CPU``, see there), and a
tmpfs over ``/sys/devices/system/cpu``: ONNX Runtime's cpuinfo library reads the host's (x86)
CPU topology there, which does not describe the emulated CPU, and the process dies with SIGSEGV
when creating a session (seen here); with the folder empty cpuinfo logs "failed to parse the
list of possible processors" and ONNX Runtime carries on without it.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nspawn_harness import (
    SUITE,
    VENV,
    HarnessError,
    PythonTarget,
    _cache_lock,
    _digest,
    _download_wheels,
    _prune,
    cache_dir,
    debootstrap_tarball,
    locked_requirements,
    mirror,
    nspawn_run,
    run,
    venv_rootfs_tarball,
)

__all__ = [
    "EXCLUDED",
    "MACHINE",
    "Arm64Rootfs",
    "agent_command",
    "deps_rootfs_tarball",
    "emulated",
    "ensure_binfmt",
    "install_agent",
    "missing_host_tools",
]

_log = logging.getLogger(__name__)

ARCH = "arm64"
MACHINE = "aarch64"
PACKAGES = ("python3", "python3-venv")
# No aarch64 wheel on PyPI (an sdist built on the device, docs/arm64.md); the agent imports it
# only when an LLM pipeline is configured, and the smoke run has none.
EXCLUDED = ("llama-cpp-python",)
HOST_TOOLS = (
    "systemd-nspawn",
    "debootstrap",
    "tar",
    "zstd",
    "qemu-aarch64-static",
    "update-binfmts",
)
# The CPU qemu emulates for the agent (qemu-user reads $QEMU_CPU at every exec). Its default,
# `max`, offers every extension qemu knows (SVE2, SME, ...), and ONNX Runtime then picks kernels
# that qemu emulates ~20x slower than NEON: one YOLOX-nano 416 inference took 64-70 s with `max`
# and 3.4 s as a Cortex-A72 (measured here, one thread). The A72 (Raspberry Pi 4, ARMv8.0-A +
# NEON) is also the oldest core this project targets: a wheel that used a newer instruction
# without checking for it would fail here with SIGILL as it would on a Pi 4.
QEMU_CPU = "cortex-a72"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
PREFIX = f"{ARCH}-{SUITE}-"


def missing_host_tools() -> list[str]:
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def ensure_binfmt() -> str:
    """binfmt_misc mounted and the ``qemu-aarch64`` entry enabled, with the F flag; its flags."""
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], timeout=30)
    entry = BINFMT / "qemu-aarch64"
    if not entry.is_file() or not entry.read_text().startswith("enabled"):
        run(["update-binfmts", "--enable", "qemu-aarch64"], timeout=60)
    if not entry.is_file() or not entry.read_text().startswith("enabled"):
        raise HarnessError(f"{entry} not enabled: apt-get install qemu-user-static binfmt-support")
    match = re.search(r"^flags: (\S*)$", entry.read_text(), re.MULTILINE)
    flags = match.group(1) if match else ""
    if "F" not in flags:
        raise HarnessError(
            f"{entry} lacks the F (fix binary) flag ({flags!r}): the interpreter would have to "
            "be inside the rootfs; re-register it with update-binfmts --package qemu-user-static"
        )
    return flags


def _base_key() -> str:
    return _digest(SUITE, "minbase", ARCH, PACKAGES, mirror())


def base_rootfs_tarball(timings: dict[str, object]) -> tuple[Path, PythonTarget]:
    """The cached arm64 debootstrap tarball (built under emulation when missing) and its python."""
    return debootstrap_tarball(
        PREFIX, _base_key(), PACKAGES, timings, timeout=3600, arch=ARCH, machine=MACHINE
    )


def runtime_pins(target: PythonTarget) -> list[str]:
    """The locked runtime deps for the arm64 python, without the EXCLUDED ones."""
    return [
        pin for pin in locked_requirements(target) if pin.partition("==")[0].lower() not in EXCLUDED
    ]


def wheelhouse(target: PythonTarget, pins: list[str], timings: dict[str, object]) -> Path:
    """aarch64 wheels of ``pins`` from the index, downloaded once; every pin must have one."""
    with _cache_lock() as root:
        house = root / f"{ARCH}-wheelhouse-{_digest(pins, target.pip_target_args())}"
        timings["cache_wheelhouse_hit"] = house.is_dir()
        if house.is_dir():
            return house
        started = time.monotonic()
        work = root / f".{ARCH}-wheelhouse-partial"
        if work.exists():
            shutil.rmtree(work)
        try:
            without_wheel = _download_wheels(work, target, pins)
            if without_wheel:
                raise HarnessError(
                    f"no {MACHINE} wheel for {without_wheel} for python {target.short}: "
                    f"add them to EXCLUDED in {__file__} only if the agent runs without them"
                )
            work.rename(house)
        finally:
            if work.exists():
                shutil.rmtree(work)
        _prune(house, f"{ARCH}-wheelhouse-*")
        timings["wheelhouse_s"] = round(time.monotonic() - started, 1)
        return house


def deps_rootfs_tarball(timings: dict[str, object]) -> Path:
    """Base rootfs plus /opt/edge-agent/venv holding the aarch64 wheels (cached)."""
    base, target = base_rootfs_tarball(timings)
    pins = runtime_pins(target)
    prefix = f"{PREFIX}{_base_key()}-deps-"
    tarball = cache_dir() / f"{prefix}{_digest(pins, target.to_json())}.tar.zst"
    timings["cache_deps_hit"] = tarball.is_file()
    if tarball.is_file():
        return tarball
    house = wheelhouse(target, pins, timings)
    return venv_rootfs_tarball(base, tarball, prefix, pins, house, timings=timings, timeout=1800)


_FACTS = (
    "import importlib.util, platform; "
    'print(platform.machine(), importlib.util.find_spec("llama_cpp") is not None)'
)


@dataclass(frozen=True)
class Arm64Rootfs:
    """An unpacked rootfs with the agent installed, as its own python sees it."""

    path: Path
    machine: str  # platform.machine(): "aarch64" under emulation
    llama_cpp_installed: bool


def install_agent(rootfs: Path, wheel: Path) -> Arm64Rootfs:
    """Install the project wheel into the rootfs venv (no deps: llama-cpp-python stays out)."""
    facts = nspawn_run(
        rootfs,
        [
            "/bin/sh",
            "-ec",
            (
                f"{VENV}/bin/pip install --quiet --no-index --no-deps /mnt/dist/{wheel.name}\n"
                f"{VENV}/bin/python -c '{_FACTS}'"
            ),
        ],
        binds={wheel.parent: "/mnt/dist"},
        timeout=600,
    ).split()
    if len(facts) != 2:
        raise HarnessError(f"unexpected output of the rootfs python: {facts}")
    return Arm64Rootfs(rootfs, facts[0], facts[1] == "True")


def emulated(
    rootfs: Path, command: list[str], *, binds: Mapping[Path, str], env: Mapping[str, str]
) -> list[str]:
    """``systemd-nspawn`` running ``command`` in the rootfs under qemu as a ``QEMU_CPU``: the
    host's network, CPU topology hidden, ``binds`` read-only (host -> guest)."""
    cmd = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--as-pid2",
        "--tmpfs=/sys/devices/system/cpu",
        f"--setenv=QEMU_CPU={QEMU_CPU}",
        "-D",
        str(rootfs),
    ]
    cmd += [f"--bind-ro={host}:{guest}" for host, guest in binds.items()]
    cmd += [f"--setenv={key}={value}" for key, value in env.items()]
    return [*cmd, "--", *command]


def agent_command(
    rootfs: Path, args: list[str], *, binds: Mapping[Path, str], env: Mapping[str, str]
) -> list[str]:
    """``edge-agent ARGS`` in the rootfs, as ``emulated`` runs it."""
    return emulated(rootfs, [f"{VENV}/bin/edge-agent", *args], binds=binds, env=env)


def stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """End an nspawn started by the test (its own session): SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _log.warning("systemd-nspawn %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait(10)
