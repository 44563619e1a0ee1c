"""Benchmark: the ARM64 smoke suite (tests/arm64) cold and warm, and emulated vs native speed.

Runs ``pytest tests/arm64`` twice against one cache folder: first empty (cold: debootstrap of
the arm64 rootfs under qemu, the aarch64 wheel download, the venv install under qemu), then
again (warm: unpack the cached rootfs, install the project wheel, run the tests). Each run's
measurements come from the suite itself (``$EDGE_AGENT_CI_CACHE/arm64-last-run.json``: build
step times, the x86 and arm64 agents' frames/s measured in the same test, the largest
differences between their detections and between the libraries' outputs).

    sudo .venv/bin/python tools/bench_arm64.py     # writes docs/benchmarks/arm64_smoke.{json,png}

Needs what the suite needs (root, qemu-user-static, binfmt-support, systemd-container,
debootstrap, zstd, mosquitto; network access to the Debian mirror and PyPI for the cold run).
``--cache DIR`` measures against an existing cache instead of a fresh one (then the first run
is only as cold as that cache is).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAST_RUN = "arm64-last-run.json"


def _run_suite(cache: Path) -> tuple[float, dict[str, Any]]:
    """One ``pytest tests/arm64`` run against ``cache``: its wall time and measurements."""
    (cache / LAST_RUN).unlink(missing_ok=True)
    env = dict(os.environ, EDGE_AGENT_CI_CACHE=str(cache))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/arm64"],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"tests/arm64 failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return wall, json.loads((cache / LAST_RUN).read_text())


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    qemu = subprocess.run(
        ["qemu-aarch64-static", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "unknown",
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    agent = result["warm"]["agent"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ms = [1000 / agent["x86_frames_per_s"], 1000 / agent["arm64_emulated_frames_per_s"]]
    left.bar(["x86-64 native", "arm64 under qemu\n(Cortex-A72)"], ms, color=["C0", "C1"])
    left.set_yscale("log")
    left.set_ylabel("ms per frame (pre + inference + post)")
    left.set_title(f"YOLOX-nano 416, 1 thread: {agent['x86_over_arm64_emulated_fps']}x slower")
    walls = [result["cold_s"], result["warm_s"]]
    right.bar(["cold (empty cache)", "warm (cached rootfs)"], walls, color=["C3", "C2"])
    right.set_ylabel("s (pytest tests/arm64)")
    right.set_title(f"suite wall time: cold / warm = {result['cold_over_warm']}")
    for axis, values in ((left, ms), (right, walls)):
        for x, value in enumerate(values):
            axis.annotate(f"{value:.0f}", (x, value), ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="cache folder (default: a fresh one)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks" / "arm64_smoke.json"
    )
    args = parser.parse_args()
    fresh = args.cache is None
    cache = Path(tempfile.mkdtemp(prefix="edge-agent-arm64-bench-", dir="/var/tmp"))
    if not fresh:
        cache = args.cache
    try:
        cold_s, cold = _run_suite(cache)
        warm_s, warm = _run_suite(cache)
    finally:
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "arm64_smoke",
        "host": _machine(),
        "cache": "fresh (empty)" if fresh else str(cache),
        "cold_s": round(cold_s, 1),
        "warm_s": round(warm_s, 1),
        "cold_over_warm": round(cold_s / warm_s, 1),
        "cold_build": cold["setup"],
        "warm": warm,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    print(f"written: {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
