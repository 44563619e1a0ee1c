"""Target detection from a fake root (device-tree model, nv_tegra_release) and check_compat."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.bundles.manifest import BundleManifest
from agent.bundles.target import (
    Target,
    board_from_model,
    check_compat,
    detect_target,
    parse_l4t_release,
    version_matches,
)
from agent.errors import BundleIncompatibleError

ORIN_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36106755, BOARD: generic, EABI: aarch64, "
    "DATE: Thu Apr 25 03:14:05 UTC 2024\n# KERNEL_VARIANT: oot\n"
)


def fake_root(tmp_path: Path, model: str | None, release: str | None = None) -> Path:
    root = tmp_path / "root"
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    if release is not None:
        (root / "etc").mkdir(parents=True)
        (root / "etc/nv_tegra_release").write_text(release)
    root.mkdir(exist_ok=True)
    return root


def test_jetson_orin(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "NVIDIA Jetson Orin Nano Developer Kit", ORIN_RELEASE)
    target = detect_target(root, machine="aarch64", python="3.10", tensorrt=lambda: "10.3.0.30")
    assert target == Target(
        board="jetson-orin",
        machine="aarch64",
        python="3.10",
        l4t="36.3.0",
        tensorrt="10.3.0.30",
        model="NVIDIA Jetson Orin Nano Developer Kit",
    )
    assert "L4T 36.3.0" in target.describe()


@pytest.mark.parametrize(
    ("model", "machine", "board"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", "aarch64", "rpi5"),
        ("Raspberry Pi Compute Module 5 Rev 1.0", "aarch64", "rpi5"),
        ("Raspberry Pi 4 Model B Rev 1.5", "aarch64", "rpi4"),
        ("Raspberry Pi Compute Module 4 Rev 1.0", "aarch64", "rpi4"),
        ("Rockchip RK3588 EVB", "aarch64", "generic-arm64"),
        (None, "arm64", "generic-arm64"),
        (None, "x86_64", "x86_64"),
        (None, "AMD64", "x86_64"),
        (None, "armv7l", None),
    ],
)
def test_boards(tmp_path: Path, model: str | None, machine: str, board: str | None) -> None:
    assert board_from_model(model, machine) == board
    target = detect_target(fake_root(tmp_path, model), machine=machine, tensorrt=lambda: None)
    assert target.board == board
    assert target.l4t is None
    assert target.tensorrt is None


def test_this_machine() -> None:
    target = detect_target()
    assert target.machine == platform.machine().lower()
    assert target.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert target.board in ("x86_64", "generic-arm64", "rpi4", "rpi5", "jetson-orin")


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (ORIN_RELEASE, "36.3.0"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref", "35.4.1"),
        ("# R32 (release), REVISION: 7, GCID: 1", "32.7.0"),
        ("garbage", None),
    ],
)
def test_l4t_release(text: str, version: str | None) -> None:
    assert parse_l4t_release(text) == version


@pytest.mark.parametrize(
    ("requirement", "version", "ok"),
    [
        (">=36.3", "36.3.0", True),
        (">=36.3", "35.4.1", False),
        (">=36,<37", "36.4.0", True),
        ("10.3", "10.3.0.30", True),
        ("10.3", "10.30.1", False),
        ("10", "10.3.0", True),
        ("==10.3.*", "10.3.0.30", True),
    ],
)
def test_version_matches(requirement: str, version: str, ok: bool) -> None:
    assert version_matches(requirement, version) is ok


def manifest(**compat: Any) -> BundleManifest:
    base: dict[str, Any] = {"boards": ["jetson-orin"], "machine": "aarch64", "python": "3.10"}
    base.update(compat)
    return BundleManifest.model_validate(
        json.loads(
            json.dumps(
                {
                    "schema": 1,
                    "name": "n",
                    "version": "1.0.0",
                    "created": "2026-11-21T10:00:00Z",
                    "compat": base,
                    "files": [],
                }
            )
        )
    )


ORIN = Target("jetson-orin", "aarch64", "3.10", "36.3.0", "10.3.0.30", "NVIDIA Jetson Orin")


def test_compatible() -> None:
    check_compat(manifest(l4t=">=36.3", tensorrt="10.3", min_agent_version="0.1"), ORIN, "0.1.0")


@pytest.mark.parametrize(
    ("compat", "target", "agent", "fragment"),
    [
        ({"boards": ["rpi5"]}, ORIN, "0.1.0", "is for rpi5; this device is jetson-orin"),
        ({"machine": "x86_64"}, ORIN, "0.1.0", "wheels for x86_64; this device is aarch64"),
        ({"python": "3.11"}, ORIN, "0.1.0", "Python 3.11; this device runs Python 3.10"),
        ({"l4t": ">=36.4"}, ORIN, "0.1.0", "needs L4T >=36.4, this device has 36.3.0"),
        ({"tensorrt": "10.7"}, ORIN, "0.1.0", "needs TensorRT 10.7, this device has 10.3.0.30"),
        (
            {"tensorrt": "10.3"},
            Target("jetson-orin", "aarch64", "3.10", "36.3.0", None),
            "0.1.0",
            "no TensorRT",
        ),
        ({"min_agent_version": "0.2.0"}, ORIN, "0.1.0", "needs agent 0.2.0 or newer"),
        ({"min_agent_version": "0.2.0"}, ORIN, "0+unknown", "needs agent 0.2.0"),
        (
            {"boards": ["rpi5"]},
            Target(None, "armv7l", "3.10"),
            "0.1.0",
            "an unknown board",
        ),
    ],
)
def test_incompatible(compat: dict[str, Any], target: Target, agent: str, fragment: str) -> None:
    with pytest.raises(BundleIncompatibleError, match=fragment) as info:
        check_compat(manifest(**compat), target, agent_version=agent)
    assert info.value.reason == "bundle_incompatible"
    assert "\n" not in str(info.value)
