"""Fixtures of the ARM64 smoke suite: one arm64 bookworm rootfs per session, run under qemu.

Needs root, qemu-user-static, binfmt-support, systemd-container, debootstrap and zstd
(``./bootstrap test`` installs them) and mosquitto. The first run builds the cached rootfs (see
arm64_harness); later runs unpack it. Measurements (cache hits, build times, both agents' run
times, frames/s, the largest differences between the two runs' detections) are printed at the
end of the run and written to ``$EDGE_AGENT_CI_CACHE/arm64-last-run.json``;
``tools/bench_arm64.py`` runs the suite cold and warm and puts both runs' measurements into
docs/benchmarks/arm64_smoke.json.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The rootfs cache helpers of the real-systemd suite and the MQTT suite's broker are shared, not
# copied: their folders go on sys.path as pytest's default "prepend" import mode puts them there
# for their own tests (neither folder is a package).
_TESTS = Path(__file__).resolve().parents[1]
for _folder in ("systemd", "mqtt"):
    if str(_TESTS / _folder) not in sys.path:
        sys.path.insert(0, str(_TESTS / _folder))

from arm64_harness import (  # noqa: E402
    MACHINE,
    Arm64Rootfs,
    deps_rootfs_tarball,
    ensure_binfmt,
    install_agent,
    missing_host_tools,
)
from nspawn_harness import (  # noqa: E402
    build_wheel,
    scratch_tmpfs,
    unpack,
    write_measurements,
)

MEASUREMENTS = pytest.StashKey[dict[str, object]]()
LAST_RUN = "arm64-last-run.json"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[MEASUREMENTS] = {}


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    write_measurements(
        terminalreporter,
        "arm64 smoke suite: measurements",
        config.stash.get(MEASUREMENTS, {}),
        LAST_RUN,
    )


@pytest.fixture(scope="session")
def measurements(pytestconfig: pytest.Config) -> dict[str, object]:
    return pytestconfig.stash[MEASUREMENTS]


@pytest.fixture(scope="session")
def arm64_rootfs(measurements: dict[str, object]) -> Iterator[Arm64Rootfs]:
    """The arm64 rootfs, unpacked into a scratch tmpfs, with the agent's wheel installed."""
    if os.geteuid() != 0:
        pytest.fail("the arm64 suite needs root (binfmt_misc, systemd-nspawn); -m 'not arm64'")
    missing = missing_host_tools()
    if missing:
        pytest.fail(
            f"missing host tools {missing}: apt-get install qemu-user-static binfmt-support "
            "systemd-container debootstrap zstd"
        )
    timings: dict[str, object] = {}
    measurements["setup"] = timings
    timings["binfmt_flags"] = ensure_binfmt()
    started = time.monotonic()
    with scratch_tmpfs("edge-agent-arm64-") as work:
        deps = deps_rootfs_tarball(timings)
        step = time.monotonic()
        rootfs = work / "rootfs"
        unpack(deps, rootfs)
        timings["unpack_s"] = round(time.monotonic() - step, 1)
        step = time.monotonic()
        installed = install_agent(rootfs, build_wheel(work / "dist"))
        timings["wheel_and_install_s"] = round(time.monotonic() - step, 1)
        timings["setup_total_s"] = round(time.monotonic() - started, 1)
        if installed.machine != MACHINE:
            pytest.fail(f"the rootfs python reports {installed.machine!r}, not {MACHINE!r}")
        yield installed
