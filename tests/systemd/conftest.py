"""Fixtures of the real-systemd suite: one booted bookworm container per session, and a unit
handle that puts the agent's service back into a known state before every test.

Needs root, systemd-container, debootstrap and zstd (``./bootstrap`` installs them). The first
run builds the cached rootfs (see nspawn_harness); later runs unpack it. Measurements (cache hits,
build/boot times, start-to-READY, watchdog latency) are printed at the end of the run and
written to ``$EDGE_AGENT_CI_CACHE/last-run.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from agent_unit import CI_DROPIN, CONFIG, CONFIG_PATH, FREEZE_FILE, AgentUnit
from nspawn_harness import (
    AGENT_UNIT,
    Container,
    build_wheel,
    deps_rootfs_tarball,
    install_agent,
    missing_host_tools,
    scratch_tmpfs,
    unpack,
    write_measurements,
)

TIMINGS = pytest.StashKey[dict[str, object]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[TIMINGS] = {}


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    write_measurements(
        terminalreporter,
        "real systemd suite: measurements",
        config.stash.get(TIMINGS, {}),
        "last-run.json",
    )


@pytest.fixture(scope="session")
def timings(pytestconfig: pytest.Config) -> dict[str, object]:
    return pytestconfig.stash[TIMINGS]


@pytest.fixture(scope="session")
def container(timings: dict[str, object]) -> Iterator[Container]:
    """A booted bookworm container with the agent installed as edge-agent.service."""
    if os.geteuid() != 0:
        pytest.fail(
            "the real-systemd suite needs root (systemd-nspawn); deselect: -m 'not systemd'"
        )
    missing = missing_host_tools()
    if missing:
        pytest.fail(
            f"missing host tools {missing}: apt-get install systemd-container debootstrap zstd"
        )
    started = time.monotonic()
    with scratch_tmpfs("edge-agent-nspawn-") as work:
        booted: Container | None = None
        try:
            deps = deps_rootfs_tarball(timings)
            step = time.monotonic()
            rootfs = work / "rootfs"
            unpack(deps, rootfs)
            timings["unpack_s"] = round(time.monotonic() - step, 1)
            step = time.monotonic()
            wheel = build_wheel(work / "dist")
            install_agent(rootfs, wheel, config=CONFIG, dropins={"50-ci.conf": CI_DROPIN})
            timings["wheel_and_install_s"] = round(time.monotonic() - step, 1)
            booted = Container(rootfs, work / "console.log")
            timings["boot_s"] = round(booted.boot(), 2)
            timings["setup_total_s"] = round(time.monotonic() - started, 1)
            yield booted
        finally:
            step = time.monotonic()
            if booted is not None:
                booted.shutdown()
            timings["poweroff_s"] = round(time.monotonic() - step, 1)


@pytest.fixture
def unit(container: Container) -> AgentUnit:
    """The unit stopped, reset (start limit too), default config and drop-ins, no switches."""
    container.run(["systemctl", "stop", AGENT_UNIT], check=False, timeout=120)
    container.sh(
        'rm -f "$1"; rm -rf /etc/credstore; rm -f /etc/systemd/system/edge-agent.service.d/6*.conf',
        FREEZE_FILE,
    )
    container.write(CONFIG_PATH, CONFIG)
    container.run(["systemctl", "daemon-reload"])
    container.run(["systemctl", "reset-failed", AGENT_UNIT], check=False)
    return AgentUnit(container, container.journal_cursor())
