"""Signed bundles under a real systemd (bookworm in systemd-nspawn, the shipped unit with
ProtectSystem=strict and User=edge-agent): ``edge-agent bundle install FILE --wait`` run as the
container's root installs into the A/B slots of the service's StateDirectory, restarts the
service, and the new version must pass its health gate; a version that fails it is rolled back
by the launcher on the restart systemd makes, and the old version is READY again.

The good bundle is what a release ships: the agent wheel built from this checkout plus the
wheelhouse of the locked runtime dependencies (the harness's, for the container's Python), a
config and a pre-install check that records the user it runs as, signed with a real Ed25519 key
whose public half is in /etc/edge-agent/bundle-keys; the bundle file is root's, mode 0600. Run
by root, the install itself runs as the service's user (privilege separation): the check sees
``edge-agent`` and nothing under bundles/ belongs to root. The bad one has a post-install check
that exits 1. Every assertion reads systemd's view of the unit
(``systemctl show``, /proc of its main process) or the files in the state directory, besides
the CLI's own output. Times are recorded in the suite's measurements.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_unit import CONFIG, AgentUnit
from nspawn_harness import (
    AGENT_UNIT,
    VENV,
    Container,
    base_rootfs_tarball,
    build_wheel,
    locked_requirements,
    wheelhouse,
)

from agent.bundles.archive import PayloadSource, write_bundle
from agent.bundles.manifest import BundleCompat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles"))

from bundle_support import make_key

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(3600)]

STATE = "/var/lib/edge-agent"
BUNDLES = f"{STATE}/bundles"
SLOT_A = f"{BUNDLES}/slots/a"
KEYS_DIR = "/etc/edge-agent/bundle-keys"
EDGE_AGENT = f"{VENV}/bin/edge-agent"
GOOD, BAD = "1.0.0", "2.0.0"
# the bundles' own config: the test config under another device id, so the status file shows
# which config the running agent has
BUNDLE_CONFIG = CONFIG.replace('device_id = "nspawn-ci"', 'device_id = "nspawn-bundle"')


@dataclass(frozen=True)
class Bundles:
    good: str  # paths inside the container
    bad: str
    good_bytes: int


@pytest.fixture(scope="module")
def bundles(
    container: Container, tmp_path_factory: pytest.TempPathFactory, timings: dict[str, object]
) -> Iterator[Bundles]:
    """Both bundles built on the host and copied into the container, the key trusted there."""
    work = tmp_path_factory.mktemp("bundles")
    started = time.monotonic()
    key, _private, public = make_key(work / "keys", "release")
    _, target = base_rootfs_tarball(timings)
    house = wheelhouse(target, locked_requirements(target), timings)
    agent_wheel = build_wheel(work / "dist")
    agent_version = agent_wheel.name.split("-")[1]
    wheels = [*sorted(house.glob("*.whl")), agent_wheel]
    (work / "agent.toml").write_text(BUNDLE_CONFIG, encoding="utf-8")
    hook = work / "post-install"
    hook.write_text("#!/bin/sh\necho 'self-check: camera not found' >&2\nexit 1\n")
    whoami = work / "pre-install"
    whoami.write_text('#!/bin/sh\nid -un > "$EDGE_AGENT_BUNDLE_SLOT_DIR/pre-install-user"\n')
    compat = BundleCompat.model_validate(
        {"boards": ["x86_64"], "machine": target.machine, "python": target.short}
    )
    good = work / f"street-{GOOD}.bundle"
    write_bundle(
        good,
        name="street",
        version=GOOD,
        compat=compat,
        files=[
            *(PayloadSource(f"wheels/{w.name}", w) for w in wheels),
            PayloadSource("config/agent.toml", work / "agent.toml"),
            PayloadSource("hooks/pre-install", whoami),
        ],
        agent_version=agent_version,
        key=key,
    )
    bad = work / f"street-{BAD}.bundle"
    write_bundle(
        bad,
        name="street",
        version=BAD,
        compat=compat,
        files=[
            PayloadSource("config/agent.toml", work / "agent.toml"),
            PayloadSource("hooks/post-install", hook),
        ],
        key=key,
    )
    timings["bundle_build_s"] = round(time.monotonic() - started, 1)
    timings["bundle_good_mb"] = round(good.stat().st_size / 2**20, 1)
    keys = container.rootfs / KEYS_DIR.lstrip("/")
    keys.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public, keys / public.name)
    inbox = container.rootfs / "var/tmp"
    for item in (good, bad):
        shutil.copyfile(item, inbox / item.name)
        (inbox / item.name).chmod(0o600)  # root's only: the installer gets an open descriptor
    try:
        yield Bundles(f"/var/tmp/{good.name}", f"/var/tmp/{bad.name}", good.stat().st_size)
    finally:
        # the other tests of the session run the factory install again
        container.run(["systemctl", "stop", AGENT_UNIT], check=False, timeout=120)
        container.run(["rm", "-rf", BUNDLES, KEYS_DIR], check=False)
        for item in (good, bad):
            (inbox / item.name).unlink(missing_ok=True)


def _running(state: dict[str, str]) -> bool:
    return (state["ActiveState"], state["SubState"]) == ("active", "running")


def _json(container: Container, path: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(container.run(["cat", path]).stdout)
    return data


def _bundle_status(container: Container, version: str) -> dict[str, object]:
    """status.json once it shows ``version`` committed (it is rewritten right after the
    commit that ``--wait`` saw in state.json)."""
    deadline = time.monotonic() + 30
    while True:
        status = _json(container, f"{STATE}/status.json")
        bundle = status.get("bundle")
        if (
            isinstance(bundle, dict)
            and bundle.get("version") == version
            and not bundle.get("pending")
        ):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"status.json does not show version {version} committed: {status}")
        time.sleep(0.2)


def _main_process(container: Container, pid: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the unit's main process, as the kernel sees them."""
    argv = container.run(["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")
    environ = container.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
    return [a for a in argv if a], dict(e.split("=", 1) for e in environ if "=" in e)


def _mono(container: Container, *props: str) -> dict[str, float]:
    shown = container.show(AGENT_UNIT, *props)
    return {k: int(v) / 1e6 for k, v in shown.items()}


def _install(container: Container, bundle: str) -> tuple[int, str, float]:
    """``edge-agent bundle install BUNDLE --wait`` as the container's root: (exit, output, t0)."""
    started = time.monotonic()
    proc = container.run(
        [EDGE_AGENT, "bundle", "install", bundle, "--wait"], check=False, timeout=900
    )
    return proc.returncode, proc.stdout + proc.stderr, started


def test_install_restarts_into_the_new_slot_and_commits_it(
    unit: AgentUnit, container: Container, bundles: Bundles, timings: dict[str, object]
) -> None:
    container.sh(f"rm -rf {BUNDLES}")
    unit.start()
    before = unit.state()
    assert _running(before), before

    code, output, started = _install(container, bundles.good)
    done = time.monotonic()
    assert code == 0, output
    assert f"installed version {GOOD} into slot a (was the factory install)" in output
    assert f"version {GOOD} committed (slot a)" in output

    state = unit.state()
    assert _running(state), state
    assert state["MainPID"] != before["MainPID"]
    argv, environ = _main_process(container, state["MainPID"])
    # the launcher exec'd the slot's own agent (same PID, so READY and the watchdog went on)
    assert argv[:2] == [f"{SLOT_A}/venv/bin/python", f"{SLOT_A}/venv/bin/edge-agent"], argv
    assert argv[-2:] == ["--config", f"{SLOT_A}/files/config/agent.toml"], argv
    assert environ["EDGE_AGENT_SLOT"] == "a"
    status = _bundle_status(container, GOOD)
    assert status["bundle"] == {"slot": "a", "version": GOOD, "pending": False}, status
    assert status["device_id"] == "nspawn-bundle"
    assert status["pid"] == int(state["MainPID"])
    boot = _json(container, f"{BUNDLES}/state.json")
    assert boot["committed"] == {"slot": "a", "version": GOOD}, boot
    assert boot["pending"] is None
    assert boot["bad_versions"] == []
    # root ran the command, the service's user did the install: it created everything (links
    # included) and ran the pre-install check
    owners = container.sh(
        f"find {BUNDLES} -not -user edge-agent -printf '%u %p\\n' | head -5; "
        f"stat -c %U {BUNDLES}/slots/a/venv/bin/python3 {BUNDLES}/state.json {BUNDLES}/current"
    )
    assert owners.split() == ["edge-agent"] * 3, owners
    hook_user = container.run(["cat", f"{SLOT_A}/pre-install-user"]).stdout.strip()
    assert hook_user == "edge-agent"

    mono = _mono(container, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    timings["bundle_install_s"] = round(mono["ExecMainStartTimestampMonotonic"] - started, 1)
    timings["bundle_restart_to_ready_s"] = round(
        mono["ActiveEnterTimestampMonotonic"] - mono["ExecMainStartTimestampMonotonic"], 2
    )
    timings["bundle_ready_to_committed_seen_s"] = round(
        done - mono["ActiveEnterTimestampMonotonic"], 2
    )


def test_a_version_failing_its_health_gate_is_rolled_back(
    unit: AgentUnit, container: Container, bundles: Bundles, timings: dict[str, object]
) -> None:
    boot = _json(container, f"{BUNDLES}/state.json")
    if boot.get("committed") != {"slot": "a", "version": GOOD}:
        pytest.fail(f"needs {GOOD} committed in slot a (the previous test): {boot}")
    unit.start()
    before = unit.state()
    assert _running(before), before

    code, output, started = _install(container, bundles.bad)
    assert code == 1, output
    assert f"installed version {BAD} into slot b (was {GOOD})" in output
    assert re.search(rf"version {re.escape(BAD)} rolled back: .*post-install", output), output

    state, _ = unit.wait(_running, timeout=60)
    # the bad version's agent exited 75 after its gate failed; systemd restarted the service
    assert int(state["NRestarts"]) == int(before["NRestarts"]) + 1, state
    argv, environ = _main_process(container, state["MainPID"])
    assert argv[:2] == [f"{SLOT_A}/venv/bin/python", f"{SLOT_A}/venv/bin/edge-agent"], argv
    assert environ["EDGE_AGENT_SLOT"] == "a"
    status = _bundle_status(container, GOOD)
    assert status["bundle"] == {"slot": "a", "version": GOOD, "pending": False}, status
    assert status["pid"] == int(state["MainPID"])
    boot = _json(container, f"{BUNDLES}/state.json")
    assert boot["committed"] == {"slot": "a", "version": GOOD}, boot
    assert boot["pending"] is None
    bad = boot["bad_versions"]
    assert isinstance(bad, list)
    assert [b["version"] for b in bad] == [BAD], bad
    assert "post-install check failed" in bad[0]["reason"], bad
    assert "exited 1" in bad[0]["reason"], bad
    assert container.run(["readlink", f"{BUNDLES}/current"]).stdout.strip() == "slots/a"
    messages = unit.messages()
    assert any("failed its health gate" in m for m in messages), messages[-20:]
    assert any(f"version {BAD} rolled back" in m for m in messages), messages[-20:]

    mono = _mono(container, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    timings["bundle_rollback_install_to_old_ready_s"] = round(
        mono["ActiveEnterTimestampMonotonic"] - started, 1
    )
    timings["bundle_rollback_restart_to_ready_s"] = round(
        mono["ActiveEnterTimestampMonotonic"] - mono["ExecMainStartTimestampMonotonic"], 2
    )
