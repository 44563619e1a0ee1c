"""Crash safety: `edge-agent bundle install` SIGKILLed at every step (CRASH_POINTS, all of
them, in order) leaves a device that is on the old or the new version, intact, and boots.

Setup, once: two real bundles (1.0.0 and 2.0.0) holding the agent wheel built from this
checkout, the locked runtime wheels, a config and a model file; a device state directory with
1.0.0 installed in slot a and committed. Per crash point: a hard-linked copy of that state
directory (an install never writes into the active slot: the checksums below would catch it),
the install of 2.0.0 in a subprocess with ``EDGE_AGENT_TEST_CRASH_AT=<point>``, which must die
by SIGKILL; then: ``current`` points at a complete slot whose every file matches its
manifest's sha256, holding 1.0.0 (crash before the switch) or 2.0.0 (after it); and the real
launcher (`python -m agent run`) execs that slot's venv agent, which reaches READY on the
notify socket and reports the version in status.json (2.0.0 then passes its gate: committed).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_process_support import AgentProcess, base_env
from bundle_support import BundleKeys, make_key
from install_support import (
    agent_wheel,
    config_text,
    runtime_wheels,
    wheel_files,
    write_test_bundle,
)
from notify_support import NotifyListener
from wait_support import wait_for

from agent.bundle_config import BundlesConfig
from agent.bundles.boot import commit
from agent.bundles.install import CRASH_POINT_ENV, CRASH_POINTS, Installer
from agent.bundles.slots import SlotStore
from agent.bundles.target import detect_target

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OLD, NEW = "1.0.0", "2.0.0"
AFTER_SWITCH = CRASH_POINTS[CRASH_POINTS.index("switched") :]


@dataclass(frozen=True)
class Device:
    """The prepared pieces: bundles, the launcher config and the baseline state directory."""

    new_bundle: Path
    trusted_dir: Path
    baseline: Path


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Device:
    work = tmp_path_factory.mktemp("crash")
    key, _private, public = make_key(work, "release")
    trusted = work / "trusted"
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    keys = BundleKeys(key=key, key_path=_private, public_path=public, trusted_dir=trusted)
    wheels = wheel_files(agent_wheel(work / "dist"), runtime_wheels())
    bundles = {}
    for version in (OLD, NEW):
        files: dict[str, bytes | Path] = {
            **wheels,
            "models/marker.bin": f"model of {version}\n".encode() * 100,
            "config/agent.toml": config_text().encode(),
        }
        bundles[version] = write_test_bundle(work / f"{version}.bundle", keys, version, files)
    baseline = work / "baseline"
    installer = Installer(
        BundlesConfig(trusted_keys_dir=trusted),
        baseline,
        agent_version="0.1.0",
        target=detect_target(),
    )
    result = installer.install(bundles[OLD])
    commit(SlotStore(baseline), result.slot, OLD)
    return Device(bundles[NEW], trusted, baseline)


def _launcher_config(state_dir: Path, trusted: Path) -> Path:
    path = state_dir.parent / "agent.toml"
    path.write_text(
        f'state_dir = "{state_dir}"\nstop_timeout_s = 5.0\n\n'
        f'[bundles]\ntrusted_keys_dir = "{trusted}"\n'
    )
    return path


def _wait_or_dump_stacks(agent: AgentProcess, timeout_s: float) -> int:
    """The agent's exit status; if it is still running after ``timeout_s``, SIGABRT makes
    faulthandler (PYTHONFAULTHANDLER=1) write every thread's stack to stderr, and the test
    fails with them."""
    try:
        return agent.wait(timeout_s)
    except subprocess.TimeoutExpired:
        agent.signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(30)
        stacks = "\n".join(agent.stderr[-80:])
        pytest.fail(f"agent did not stop within {timeout_s:g} s of SIGTERM; stderr:\n{stacks}")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def test_every_crash_point_is_enumerated() -> None:
    assert CRASH_POINTS[0] == "locked"
    assert CRASH_POINTS[-1] == "switched"
    assert len(set(CRASH_POINTS)) == len(CRASH_POINTS) == 14


@pytest.fixture
def state(device: Device, tmp_path: Path) -> Iterator[Path]:
    """A hard-linked copy of the baseline device (removed after the test: a slot is ~400 MB)."""
    path = tmp_path / "state"
    subprocess.run(["cp", "-al", str(device.baseline), str(path)], check=True)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_install_killed_at(point: str, device: Device, state: Path, notify: NotifyListener) -> None:
    config = _launcher_config(state, device.trusted_dir)
    store = SlotStore(state)
    active_before = store.slot_problems("a")
    assert active_before == []

    env = base_env(**{CRASH_POINT_ENV: point})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "bundle",
            "install",
            str(device.new_bundle),
            "--no-restart",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    expected = NEW if point in AFTER_SWITCH else OLD
    slot = store.current_slot()
    assert slot is not None
    record = store.installed(slot)
    assert record is not None
    assert record.version == expected
    assert store.slot_problems(slot) == []
    assert store.slot_problems("a") == []  # the old version is intact whatever happened

    # PYTHONFAULTHANDLER: a hang is dumped (SIGABRT -> every thread's stack on stderr)
    env = base_env(NOTIFY_SOCKET=notify.address, PYTHONFAULTHANDLER="1")
    agent = AgentProcess(["run", "--config", str(config)], env)
    try:
        notify.take("READY=1", timeout_s=120)
        cmdline = Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().split(b"\0")
        venv = store.venv_dir(slot)
        assert [c.decode() for c in cmdline[:3]] == [
            str(venv / "bin/python"),
            str(venv / "bin/edge-agent"),
            "run",
        ]
        status = json.loads((state / "status.json").read_text())
        assert status["bundle"]["slot"] == slot
        assert status["bundle"]["version"] == expected
        if expected == NEW:
            wait_for(lambda: store.read_state().pending is None, "the gate's decision", 60)
            committed = store.read_state().committed
            assert committed is not None
            assert (committed.slot, committed.version) == (slot, NEW)
        else:
            assert store.read_state().pending is None  # a stale pending entry was cleared
        agent.signal(signal.SIGTERM)
        code = _wait_or_dump_stacks(agent, 60)
        assert code == 0, agent.stderr[-10:]
    finally:
        agent.kill()
