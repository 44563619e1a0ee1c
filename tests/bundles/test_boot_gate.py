"""Boot-time slot selection, the durable attempt counter, rollback and the health gate.

The boot rules run in-process on a real state directory; the gate and the counter's
durability run the real launcher (`python -m agent run`) as a child process that execs the
slot's agent, talks to a real notify socket and is SIGKILLed where a crash is wanted.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process_support import AgentProcess, base_env
from bundle_support import BundleKeys
from install_support import config_text, write_test_bundle
from notify_support import NotifyListener
from wait_support import wait_for

from agent.bundle_config import BundlesConfig
from agent.bundles.boot import BootChoice, commit, manual_rollback, mark_failed, select
from agent.bundles.install import Installer
from agent.bundles.slots import SlotStore
from agent.bundles.target import detect_target
from agent.errors import BundleError

RESTART = 75


def _install(
    tmp_path: Path, keys: BundleKeys, version: str, files: dict[str, bytes | Path] | None = None
) -> None:
    payload = files if files is not None else {"config/agent.toml": config_text().encode()}
    bundle = write_test_bundle(tmp_path / f"b-{version}.bundle", keys, version, payload)
    config = BundlesConfig(trusted_keys_dir=keys.trusted_dir)
    installer = Installer(config, tmp_path / "state", agent_version="0.1.0", target=detect_target())
    installer.install(bundle)


# ---------------------------------------------------------------------- boot rules, in-process


def test_no_bundles_boots_the_factory_install(tmp_path: Path) -> None:
    choice = select(BundlesConfig(), tmp_path / "state")
    assert choice == BootChoice(slot=None, version=None, pending=False)


def test_pending_boot_counts_attempts_durably(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    _install(tmp_path, bundle_keys, "1.0.0")
    config = BundlesConfig(max_boot_attempts=2)
    store = SlotStore(tmp_path / "state")
    first = select(config, tmp_path / "state", now=1000.0)
    assert first == BootChoice(slot="a", version="1.0.0", pending=True)
    pending = store.read_state().pending
    assert pending is not None
    assert (pending.attempts, pending.first_boot_at) == (1, 1000.0)
    assert select(config, tmp_path / "state", now=1001.0).pending
    pending = store.read_state().pending
    assert pending is not None
    assert (pending.attempts, pending.first_boot_at) == (2, 1000.0)
    third = select(config, tmp_path / "state", now=1002.0)
    assert third == BootChoice(slot=None, version=None, pending=False, rolled_back="1.0.0")
    state = store.read_state()
    assert state.pending is None
    assert store.current_slot() is None
    assert [b.version for b in state.bad_versions] == ["1.0.0"]
    assert "boot attempt 3" in state.bad_versions[0].reason


def _two_versions(tmp_path: Path, keys: BundleKeys) -> SlotStore:
    """1.0.0 committed in slot a, 1.1.0 pending in slot b (current -> b)."""
    _install(tmp_path, keys, "1.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "1.0.0")
    _install(tmp_path, keys, "1.1.0")
    return store


def test_rollback_after_the_health_timeout(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    store = _two_versions(tmp_path, bundle_keys)
    config = BundlesConfig(health_timeout_s=60, max_boot_attempts=5)
    assert select(config, tmp_path / "state", now=1000.0).slot == "b"
    assert select(config, tmp_path / "state", now=1059.0).slot == "b"
    choice = select(config, tmp_path / "state", now=1061.0)
    assert choice == BootChoice(slot="a", version="1.0.0", pending=False, rolled_back="1.1.0")
    assert store.current_slot() == "a"
    state = store.read_state()
    assert "health_timeout_s" in state.bad_versions[-1].reason
    assert state.committed is not None
    assert state.committed.version == "1.0.0"
    assert store.slot_problems("a") == []


def test_rollback_after_pending_failed(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    store = _two_versions(tmp_path, bundle_keys)
    assert select(BundlesConfig(), tmp_path / "state").slot == "b"
    assert mark_failed(store, "b", "self-test failed: pipeline street failed")
    assert not mark_failed(store, "a", "not pending")
    choice = select(BundlesConfig(), tmp_path / "state")
    assert (choice.slot, choice.rolled_back) == ("a", "1.1.0")
    state = store.read_state()
    assert state.bad_versions[-1].reason == "self-test failed: pipeline street failed"
    assert [e.event for e in state.history][-3:] == ["boot", "failed", "rolled_back"]


def test_stale_pending_is_cleared(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    """An install that died between its pending entry and the switch: `current` still points
    at the old slot, so the pending entry is stale and the old version boots."""
    store = _two_versions(tmp_path, bundle_keys)
    store.switch_current("a")  # as if the install had not switched yet
    choice = select(BundlesConfig(), tmp_path / "state")
    assert choice == BootChoice(slot="a", version="1.0.0", pending=False)
    state = store.read_state()
    assert state.pending is None
    assert state.bad_versions == []


def test_commit_then_manual_rollback(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    store = _two_versions(tmp_path, bundle_keys)
    commit(store, "b", "1.1.0")
    state = store.read_state()
    assert state.committed is not None
    assert state.previous is not None
    assert (state.committed.version, state.previous.version) == ("1.1.0", "1.0.0")
    with pytest.raises(BundleError, match="no longer pending"):
        commit(store, "b", "1.1.0")
    assert manual_rollback(store) == "a"
    state = store.read_state()
    assert state.committed is not None
    assert state.committed.version == "1.0.0"
    assert store.current_slot() == "a"
    assert manual_rollback(store) is None  # no previous left: the factory install
    with pytest.raises(BundleError, match="nothing to roll back"):
        manual_rollback(store)


def test_broken_boot_state_never_keeps_the_device_from_booting(
    tmp_path: Path, bundle_keys: BundleKeys, caplog: pytest.LogCaptureFixture
) -> None:
    store = _two_versions(tmp_path, bundle_keys)
    store.state_path.write_text("{ half a write")  # cannot happen through write_state
    choice = select(BundlesConfig(), tmp_path / "state")
    assert choice == BootChoice(slot="b", version="1.1.0", pending=False)
    assert "boot bookkeeping failed" in caplog.text
    assert store.state_path.read_text() == "{ half a write"  # left for a human to look at
    store.current_link.unlink()
    store.current_link.symlink_to("/somewhere/else")
    assert select(BundlesConfig(), tmp_path / "state").slot is None


# ---------------------------------------------------------------------- real agent processes


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def _launcher_config(tmp_path: Path, keys: BundleKeys, **bundles: object) -> Path:
    settings = {"trusted_keys_dir": str(keys.trusted_dir), **bundles}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\nstop_timeout_s = 5.0\n\n[bundles]\n{lines}\n'
    )
    return path


def _launch(config: Path, notify: NotifyListener, models_dir: Path) -> AgentProcess:
    env = base_env(NOTIFY_SOCKET=notify.address, EDGE_AGENT_MODEL_PATH=str(models_dir))
    notify.take_all()  # what an earlier process sent
    return AgentProcess(["run", "--config", str(config)], env)


def _status(tmp_path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((tmp_path / "state" / "status.json").read_text())
    return data


def _bundle_files(extra_config: str = "", **hooks: bytes) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {"config/agent.toml": config_text(extra=extra_config).encode()}
    for name, body in hooks.items():
        files[f"hooks/{name.replace('_', '-')}"] = body
    return files


def test_gate_commits_a_healthy_version(
    tmp_path: Path, bundle_keys: BundleKeys, notify: NotifyListener, models_dir: Path
) -> None:
    hook = b'#!/bin/sh\necho ok > "$EDGE_AGENT_BUNDLE_SLOT_DIR/post-install-ran"\n'
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files(post_install=hook))
    agent = _launch(_launcher_config(tmp_path, bundle_keys), notify, models_dir)
    try:
        notify.take("READY=1")
        store = SlotStore(tmp_path / "state")
        wait_for(lambda: store.read_state().pending is None, "the gate's decision", 60)
        state = store.read_state()
        assert state.committed is not None
        assert (state.committed.slot, state.committed.version) == ("a", "1.0.0")
        assert (store.slot_dir("a") / "post-install-ran").read_text() == "ok\n"
        wait_for(lambda: _status(tmp_path)["bundle"] == _committed("a", "1.0.0"), "status", 30)
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        agent.kill()


def _committed(slot: str, version: str) -> dict[str, object]:
    return {"slot": slot, "version": version, "pending": False}


VISION = """
[[pipelines]]
type = "vision"
name = "street"
model = "{model}"
policy = "latest"

[pipelines.engine]
type = "onnxruntime"
intra_op_threads = 1

[[pipelines.sources]]
type = "file"
name = "bikes"
path = "{video}"
loop = true
realtime = true
"""


def test_gate_commits_a_real_vision_pipeline(
    tmp_path: Path,
    bundle_keys: BundleKeys,
    notify: NotifyListener,
    models_dir: Path,
    data_dir: Path,
) -> None:
    video = data_dir / "videos" / "bikes.mp4"
    extra = VISION.format(model="yolox_nano_416", video=video)
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files(extra))
    agent = _launch(_launcher_config(tmp_path, bundle_keys), notify, models_dir)
    try:
        notify.take("READY=1", timeout_s=120)
        store = SlotStore(tmp_path / "state")
        wait_for(lambda: store.read_state().pending is None, "the gate's decision", 120)
        state = store.read_state()
        assert state.committed is not None, state.history
        assert state.committed.version == "1.0.0"
        status = _status(tmp_path)
        pipelines = status["pipelines"]
        assert isinstance(pipelines, list)
        assert [p["state"] for p in pipelines] == ["running"]
        watchdog = status["watchdog"]
        assert isinstance(watchdog, dict)
        beats = [w["beats"] for n, w in watchdog["workers"].items() if n.startswith("street/")]
        assert beats
        assert min(beats) > 0
        agent.signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        agent.kill()


def _expect_rollback_to_factory(
    tmp_path: Path, config: Path, notify: NotifyListener, models_dir: Path, reason: str
) -> None:
    """The next start rolls the failed version back and the factory install becomes READY."""
    agent = _launch(config, notify, models_dir)
    try:
        notify.take("READY=1")
        store = SlotStore(tmp_path / "state")
        assert store.current_slot() is None
        state = store.read_state()
        assert state.pending is None
        assert reason in state.bad_versions[-1].reason
        wait_for(lambda: _status(tmp_path)["state"] == "ready", "status ready", 30)
        assert _status(tmp_path)["bundle"] == {"slot": None, "version": None, "pending": False}
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        agent.kill()


def test_failing_pipeline_fails_the_gate_then_rolls_back(
    tmp_path: Path, bundle_keys: BundleKeys, notify: NotifyListener, models_dir: Path
) -> None:
    extra = VISION.format(model="no_such_model", video="/nonexistent.mp4")
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files(extra))
    config = _launcher_config(tmp_path, bundle_keys)
    agent = _launch(config, notify, models_dir)
    try:
        assert agent.wait(60) == RESTART
    finally:
        agent.kill()
    pending = SlotStore(tmp_path / "state").read_state().pending
    assert pending is not None
    assert pending.failed is not None
    assert "pipeline street failed" in pending.failed
    _expect_rollback_to_factory(tmp_path, config, notify, models_dir, "pipeline street failed")


def test_post_install_hook_failure_rolls_back(
    tmp_path: Path, bundle_keys: BundleKeys, notify: NotifyListener, models_dir: Path
) -> None:
    hook = b"#!/bin/sh\necho 'no camera' >&2\nexit 2\n"
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files(post_install=hook))
    config = _launcher_config(tmp_path, bundle_keys)
    agent = _launch(config, notify, models_dir)
    try:
        notify.take("READY=1")
        assert agent.wait(60) == RESTART
    finally:
        agent.kill()
    _expect_rollback_to_factory(
        tmp_path, config, notify, models_dir, "post-install exited 2: no camera"
    )


def test_start_failure_while_pending_exits_75_then_rolls_back(
    tmp_path: Path, bundle_keys: BundleKeys, notify: NotifyListener, models_dir: Path
) -> None:
    # a CPU this machine does not have: the pinning start step fails
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files("\n[pinning]\nprocess = [1023]\n"))
    config = _launcher_config(tmp_path, bundle_keys)
    agent = _launch(config, notify, models_dir)
    try:
        assert agent.wait(60) == RESTART
    finally:
        agent.kill()
    assert any("[pinning_invalid]" in line for line in agent.stderr)
    _expect_rollback_to_factory(tmp_path, config, notify, models_dir, "start failed [pinning")


def test_config_that_no_longer_loads_while_pending_exits_75_then_rolls_back(
    tmp_path: Path, bundle_keys: BundleKeys, notify: NotifyListener, models_dir: Path
) -> None:
    """The installer validated the config; a slot whose config file went bad on disk afterwards
    is the version's failure (exit 75, rolled back), not exit 78, after which systemd would
    never start the agent again."""
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files())
    slot_config = tmp_path / "state/bundles/slots/a/files/config/agent.toml"
    slot_config.write_text("this is = = not toml\n")
    config = _launcher_config(tmp_path, bundle_keys)
    agent = _launch(config, notify, models_dir)
    try:
        assert agent.wait(60) == RESTART
    finally:
        agent.kill()
    assert agent.stderr[-1].startswith("edge-agent: error [config_invalid]: "), agent.stderr
    _expect_rollback_to_factory(tmp_path, config, notify, models_dir, "start failed [config")


def test_attempt_counter_survives_sigkill_then_rolls_back(
    tmp_path: Path, bundle_keys: BundleKeys, notify: NotifyListener, models_dir: Path
) -> None:
    """The gate never decides (its post-install check hangs); each boot is SIGKILLed. The
    counter was written before the new code ran, so the boot after the last allowed one rolls
    back."""
    hang = b"#!/bin/sh\nexec sleep 15\n"  # outlives the SIGKILLed agent briefly
    _install(tmp_path, bundle_keys, "1.0.0", _bundle_files(post_install=hang))
    config = _launcher_config(tmp_path, bundle_keys, max_boot_attempts=2)
    store = SlotStore(tmp_path / "state")
    for attempt in (1, 2):
        agent = _launch(config, notify, models_dir)
        try:
            notify.take("READY=1")
            agent.proc.send_signal(signal.SIGKILL)
            assert agent.wait(30) == -signal.SIGKILL
        finally:
            agent.kill()
        pending = store.read_state().pending
        assert pending is not None
        assert (pending.attempts, pending.failed) == (attempt, None)
    _expect_rollback_to_factory(tmp_path, config, notify, models_dir, "boot attempt 3")
