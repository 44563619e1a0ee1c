"""This device as a bundle target: board family, machine, Python, L4T and TensorRT versions.

:func:`detect_target` reads the board from ``/proc/device-tree/model`` (Jetson Orin, Raspberry
Pi 5 / 4) and otherwise falls back on ``platform.machine()`` (``generic-arm64``, ``x86_64``);
the L4T release from ``/etc/nv_tegra_release`` (``# R36 (release), REVISION: 3.0, ...`` ->
``36.3.0``); TensorRT's version only if the package is installed (never required). ``root``
makes the files readable from a fake root in tests.

:func:`check_compat` compares a manifest's ``compat`` with a target and the running agent's
version and raises BundleIncompatibleError with a one-line reason at the first mismatch.
"""

from __future__ import annotations

import logging
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from agent.bundles.manifest import BundleManifest
from agent.errors import BundleIncompatibleError

__all__ = [
    "Target",
    "board_from_model",
    "check_compat",
    "detect_target",
    "normalize_machine",
    "parse_l4t_release",
    "tensorrt_version",
    "version_matches",
]

_log = logging.getLogger(__name__)

_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?")
_MACHINES = {"arm64": "aarch64", "aarch64": "aarch64", "amd64": "x86_64", "x86_64": "x86_64"}


@dataclass(frozen=True)
class Target:
    """What a bundle must fit: ``board`` is None on hardware no bundle can name."""

    board: str | None
    machine: str
    python: str
    l4t: str | None = None
    tensorrt: str | None = None
    model: str | None = None
    """The device-tree model text (``Raspberry Pi 5 Model B Rev 1.0``), for messages."""

    def describe(self) -> str:
        parts = [f"board {self.board or 'unknown'}", self.machine, f"Python {self.python}"]
        if self.l4t:
            parts.append(f"L4T {self.l4t}")
        if self.tensorrt:
            parts.append(f"TensorRT {self.tensorrt}")
        return ", ".join(parts)


def normalize_machine(machine: str) -> str:
    """``arm64`` -> ``aarch64``, ``AMD64`` -> ``x86_64``; other names unchanged (lowercase)."""
    low = machine.strip().lower()
    return _MACHINES.get(low, low)


def board_from_model(model: str | None, machine: str) -> str | None:
    """The board family from the device-tree model text and the machine."""
    text = (model or "").lower()
    if "jetson" in text and "orin" in text:
        return "jetson-orin"
    if "raspberry pi 5" in text or "compute module 5" in text:
        return "rpi5"
    if "raspberry pi 4" in text or "compute module 4" in text or "raspberry pi 400" in text:
        return "rpi4"
    arch = normalize_machine(machine)
    if arch == "aarch64":
        return "generic-arm64"
    if arch == "x86_64":
        return "x86_64"
    return None


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 3.0, ...`` -> ``36.3.0``; None if the line is not there."""
    found = _L4T.search(text)
    if found is None:
        return None
    major, rev_major, rev_minor = found.group(1), found.group(2), found.group(3) or "0"
    return f"{int(major)}.{int(rev_major)}.{int(rev_minor)}"


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None (no import of TensorRT)."""
    installed = {
        (dist.metadata["Name"] or "").lower().replace("_", "-"): dist.version
        for dist in metadata.distributions()
    }
    for name in ("tensorrt", "tensorrt-cu12", "tensorrt-libs"):
        if name in installed:
            return installed[name]
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("cannot read %s: %s", path, exc.strerror)
        return None


def detect_target(
    root: Path = Path("/"),
    *,
    machine: str | None = None,
    python: str | None = None,
    tensorrt: Callable[[], str | None] = tensorrt_version,
) -> Target:
    """This device (files read under ``root``; ``machine``/``python`` default to this
    interpreter's ``platform.machine()`` and ``major.minor``)."""
    arch = normalize_machine(machine if machine is not None else platform.machine())
    model = _read_text(root / "proc/device-tree/model")
    release = _read_text(root / "etc/nv_tegra_release")
    return Target(
        board=board_from_model(model, arch),
        machine=arch,
        python=python or f"{sys.version_info.major}.{sys.version_info.minor}",
        l4t=parse_l4t_release(release) if release else None,
        tensorrt=tensorrt(),
        model=model or None,
    )


def version_matches(requirement: str, version: str) -> bool:
    """``requirement`` is a PEP 440 specifier set (``>=36.3,<37``) or a version prefix
    (``10.3`` matches ``10.3.0.26``); ValueError when it is neither."""
    req = requirement.strip()
    if req[:1] in "<>=!~":
        try:
            spec = SpecifierSet(req)
        except InvalidSpecifier as exc:
            raise ValueError(f"{requirement!r} is not a version specifier") from exc
        try:
            return Version(version) in spec
        except InvalidVersion:
            return False
    prefix = req.split(".")
    return version.strip().split(".")[: len(prefix)] == prefix


def _check_version(what: str, requirement: str | None, have: str | None) -> None:
    if requirement is None:
        return
    if have is None:
        raise BundleIncompatibleError(
            f"bundle needs {what} {requirement} but this device has no {what}: build the "
            "bundle without plans for this board"
        )
    try:
        ok = version_matches(requirement, have)
    except ValueError as exc:
        raise BundleIncompatibleError(f"bundle compat.{what.lower()}: {exc}") from exc
    if not ok:
        raise BundleIncompatibleError(
            f"bundle needs {what} {requirement}, this device has {have}: build the plans "
            f"for {what} {have}"
        )


def check_compat(manifest: BundleManifest, target: Target, agent_version: str) -> None:
    """BundleIncompatibleError (one line) unless ``manifest`` installs on ``target`` with an
    installing agent of ``agent_version``."""
    compat = manifest.compat
    label = f"bundle {manifest.name} {manifest.version}"
    if target.board is None or target.board not in compat.boards:
        raise BundleIncompatibleError(
            f"{label} is for {', '.join(compat.boards)}; this device is "
            f"{target.board or 'an unknown board'}" + (f" ({target.model})" if target.model else "")
        )
    if normalize_machine(compat.machine) != normalize_machine(target.machine):
        raise BundleIncompatibleError(
            f"{label} carries wheels for {compat.machine}; this device is {target.machine}"
        )
    if compat.python is not None and compat.python != target.python:
        raise BundleIncompatibleError(
            f"{label} carries wheels for Python {compat.python}; this device runs Python "
            f'{target.python}: rebuild it with python = "{target.python}"'
        )
    _check_version("L4T", compat.l4t, target.l4t)
    _check_version("TensorRT", compat.tensorrt, target.tensorrt)
    if compat.min_agent_version is not None:
        try:
            running = Version(agent_version)
        except InvalidVersion:
            running = Version("0")
        if running < Version(compat.min_agent_version):
            raise BundleIncompatibleError(
                f"{label} needs agent {compat.min_agent_version} or newer to install; this "
                f"agent is {agent_version}: install an intermediate bundle first"
            )
