"""The installer on real bundles, real files and real processes (hooks, venv, pip)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bundle_support import BundleKeys, tampered_payload, with_oversized_member
from install_support import (
    agent_wheel,
    config_text,
    host_compat,
    lock_held_by_another_process,
    runtime_wheels,
    tree_digest,
    wheel_files,
    write_test_bundle,
)

from agent.bundle_config import BundlesConfig
from agent.bundles.boot import commit, manual_rollback
from agent.bundles.install import CRASH_POINTS, Installer, InstallResult
from agent.bundles.slots import BootState, SlotStore
from agent.bundles.target import detect_target
from agent.errors import (
    BundleBusyError,
    BundleContentError,
    BundleDowngradeError,
    BundleError,
    BundleHookError,
    BundleIncompatibleError,
    BundleSignatureError,
)

MODEL = b"\x08\x07" + b"model-bytes" * 1000


def _installer(state_dir: Path, keys: BundleKeys, **settings: object) -> Installer:
    config = BundlesConfig.model_validate(
        {"trusted_keys_dir": keys.trusted_dir, "hook_timeout_s": 30, **settings}
    )
    return Installer(config, state_dir, agent_version="0.1.0", target=detect_target())


def _files(version: str, **extra: bytes) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {
        "models/detector.onnx": MODEL,
        "models/manifests/detector.toml": f"# {version}\n".encode(),
        "config/agent.toml": config_text().encode(),
    }
    files.update({k.replace("__", "/").replace("_", "-"): v for k, v in extra.items()})
    return files


def _install(tmp_path: Path, keys: BundleKeys, version: str, **kwargs: object) -> InstallResult:
    bundle = write_test_bundle(tmp_path / f"b-{version}.bundle", keys, version, _files(version))
    return _installer(tmp_path / "state", keys).install(bundle, **kwargs)  # type: ignore[arg-type]


def test_first_install_goes_to_slot_a_and_is_pending(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    result = _install(tmp_path, bundle_keys, "1.0.0")
    assert result == InstallResult(slot="a", version="1.0.0", previous_version=None)
    store = SlotStore(tmp_path / "state")
    assert store.current_slot() == "a"
    assert (store.files_dir("a") / "models/detector.onnx").read_bytes() == MODEL
    assert store.slot_problems("a") == []
    record = store.installed("a")
    assert record is not None
    assert (record.version, record.venv, record.config) == ("1.0.0", False, True)
    state = store.read_state()
    assert state.pending is not None
    assert (state.pending.slot, state.pending.version, state.pending.attempts) == ("a", "1.0.0", 0)
    assert state.committed is None
    assert [e.event for e in state.history] == ["installed"]


def test_next_install_uses_the_other_slot_and_never_touches_the_active_one(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    _install(tmp_path, bundle_keys, "1.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "1.0.0")
    before = tree_digest(store.slot_dir("a"))
    result = _install(tmp_path, bundle_keys, "1.1.0")
    assert result == InstallResult(slot="b", version="1.1.0", previous_version="1.0.0")
    assert tree_digest(store.slot_dir("a")) == before
    assert store.current_slot() == "b"
    state = store.read_state()
    assert state.committed is not None
    assert state.committed.version == "1.0.0"
    assert state.pending is not None
    assert state.pending.version == "1.1.0"
    # and the third install reuses slot a only after wiping it... which is now inactive
    commit(store, "b", "1.1.0")
    before_b = tree_digest(store.slot_dir("b"))
    assert _install(tmp_path, bundle_keys, "1.2.0").slot == "a"
    assert tree_digest(store.slot_dir("b")) == before_b
    assert store.slot_problems("a") == []


def test_wrong_target_is_refused_before_any_slot_write(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    other = "rpi5" if detect_target().board != "rpi5" else "rpi4"
    bundle = write_test_bundle(
        tmp_path / "x.bundle",
        bundle_keys,
        "1.0.0",
        _files("1.0.0"),
        compat=host_compat(boards=[other]),
    )
    with pytest.raises(BundleIncompatibleError, match=f"is for {other}"):
        _installer(tmp_path / "state", bundle_keys).install(bundle)
    store = SlotStore(tmp_path / "state")
    assert not (store.root / "slots").exists()
    assert store.current_slot() is None
    assert store.read_state() == BootState()


def test_wrong_key_is_refused_before_any_slot_write(
    tmp_path: Path, bundle_keys: BundleKeys, other_keys: BundleKeys
) -> None:
    bundle = write_test_bundle(tmp_path / "x.bundle", other_keys, "1.0.0", _files("1.0.0"))
    with pytest.raises(BundleSignatureError):
        _installer(tmp_path / "state", bundle_keys).install(bundle)
    assert not (tmp_path / "state/bundles/slots").exists()


@pytest.mark.parametrize("damage", ["tampered", "oversized"])
def test_bad_payload_leaves_the_active_slot_current_and_state_as_they_were(
    tmp_path: Path, bundle_keys: BundleKeys, damage: str
) -> None:
    _install(tmp_path, bundle_keys, "1.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "1.0.0")
    slot_a = tree_digest(store.slot_dir("a"))
    state = store.read_state()
    good = write_test_bundle(tmp_path / "good.bundle", bundle_keys, "1.1.0", _files("1.1.0"))
    bad = tmp_path / "bad.bundle"
    if damage == "tampered":
        tampered_payload(good, bad, "models/detector.onnx")
    else:
        with_oversized_member(good, bad, "models/detector.onnx", b"\0" * 4096)
    with pytest.raises(BundleContentError) as info:
        _installer(tmp_path / "state", bundle_keys).install(bad)
    assert "models/detector.onnx" in str(info.value)
    assert "\n" not in str(info.value)
    assert tree_digest(store.slot_dir("a")) == slot_a
    assert store.current_slot() == "a"
    assert store.read_state() == state
    assert store.installed("b") is None  # garbage, wiped by the next install
    assert not (store.files_dir("b") / "models/detector.onnx").exists()
    # only the staging slot was written: nothing else under bundles/
    assert sorted(p.name for p in store.root.iterdir()) == [
        "current",
        "install.lock",
        "slots",
        "state.json",
    ]
    assert sorted(p.name for p in (store.root / "slots").iterdir()) == ["a", "b"]


def test_downgrade_against_the_committed_version_when_current_is_unreadable(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    _install(tmp_path, bundle_keys, "2.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "2.0.0")
    (store.slot_dir("a") / "INSTALLED").write_bytes(b"not json")
    with pytest.raises(BundleDowngradeError, match=r"not newer than the installed 2\.0\.0"):
        _install(tmp_path, bundle_keys, "1.0.0")
    assert store.current_slot() == "a"


def test_downgrade_refused_unless_allowed(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    _install(tmp_path, bundle_keys, "2.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "2.0.0")
    for version in ("1.9.0", "2.0.0"):
        with pytest.raises(BundleDowngradeError, match="--allow-downgrade") as info:
            _install(tmp_path, bundle_keys, version)
        assert info.value.reason == "bundle_downgrade"
    assert not (store.root / "slots/b").exists()  # refused before the wipe
    assert store.current_slot() == "a"
    result = _install(tmp_path, bundle_keys, "1.9.0", allow_downgrade=True)
    assert result == InstallResult(slot="b", version="1.9.0", previous_version="2.0.0")


def test_second_install_while_one_holds_the_lock_is_busy(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    bundle = write_test_bundle(tmp_path / "x.bundle", bundle_keys, "1.0.0", _files("1.0.0"))
    store = SlotStore(tmp_path / "state")
    # a real second process holds install.lock (flock) while this one installs
    with lock_held_by_another_process(store.lock_path), pytest.raises(BundleBusyError) as info:
        _installer(tmp_path / "state", bundle_keys).install(bundle)
    assert info.value.reason == "busy"
    assert store.current_slot() is None
    assert _installer(tmp_path / "state", bundle_keys).install(bundle).slot == "a"


def test_install_during_a_trial_is_busy(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    _install(tmp_path, bundle_keys, "1.0.0")  # pending, current -> a
    with pytest.raises(BundleBusyError, match="still on trial"):
        _install(tmp_path, bundle_keys, "1.1.0")


def test_pre_install_hook_failure_leaves_the_device_as_it_was(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    hook = b"#!/bin/sh\necho 'camera missing' >&2\nexit 3\n"
    bundle = write_test_bundle(
        tmp_path / "x.bundle", bundle_keys, "1.0.0", _files("1.0.0", hooks__pre_install=hook)
    )
    with pytest.raises(BundleHookError, match="pre-install exited 3: camera missing") as info:
        _installer(tmp_path / "state", bundle_keys).install(bundle)
    assert info.value.reason == "bundle_hook_failed"
    store = SlotStore(tmp_path / "state")
    assert store.current_slot() is None
    assert store.installed("a") is None
    assert store.read_state().pending is None


def test_pre_install_hook_timeout(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    hook = b"#!/bin/sh\nexec sleep 30\n"
    bundle = write_test_bundle(
        tmp_path / "x.bundle", bundle_keys, "1.0.0", _files("1.0.0", hooks__pre_install=hook)
    )
    installer = _installer(tmp_path / "state", bundle_keys, hook_timeout_s=0.5)
    with pytest.raises(BundleHookError, match=r"did not finish within 0\.5 s"):
        installer.install(bundle)
    assert SlotStore(tmp_path / "state").current_slot() is None


def test_pre_install_hook_passing_runs_in_the_slot(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    hook = (
        b"#!/bin/sh\nset -e\ntest -f files/models/detector.onnx\n"
        b'echo "$EDGE_AGENT_BUNDLE_VERSION" > ran\n'
    )
    bundle = write_test_bundle(
        tmp_path / "x.bundle", bundle_keys, "1.0.0", _files("1.0.0", hooks__pre_install=hook)
    )
    result = _installer(tmp_path / "state", bundle_keys).install(bundle)
    store = SlotStore(tmp_path / "state")
    assert (store.slot_dir(result.slot) / "ran").read_text() == "1.0.0\n"


def test_bundle_config_invalid_without_wheels_is_refused(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    files = _files("1.0.0")
    files["config/agent.toml"] = b"no_such_key = 1\n"
    bundle = write_test_bundle(tmp_path / "x.bundle", bundle_keys, "1.0.0", files)
    with pytest.raises(BundleIncompatibleError, match="no_such_key"):
        _installer(tmp_path / "state", bundle_keys).install(bundle)
    assert SlotStore(tmp_path / "state").current_slot() is None


@pytest.mark.slow
def test_bundle_config_is_validated_by_the_new_code(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    """With wheels the slot's own `edge-agent config validate` (the bundle's agent, in the new
    venv) judges the config; a refused one leaves the slot unfinished and `current` alone."""
    wheels = wheel_files(agent_wheel(tmp_path / "dist"), runtime_wheels())
    good = {**wheels, "config/agent.toml": config_text().encode()}
    bad = {**wheels, "config/agent.toml": b"[bundles]\nmax_boot_attempts = 99\n"}
    state = tmp_path / "state"
    bundle = write_test_bundle(tmp_path / "bad.bundle", bundle_keys, "1.0.0", bad)
    with pytest.raises(BundleIncompatibleError, match="max_boot_attempts") as info:
        _installer(state, bundle_keys).install(bundle)
    assert "validating the bundle's config with the new agent" in str(info.value)
    store = SlotStore(state)
    assert store.current_slot() is None
    assert store.installed("a") is None
    bundle = write_test_bundle(tmp_path / "good.bundle", bundle_keys, "1.0.0", good)
    result = _installer(state, bundle_keys).install(bundle)
    venv_python = store.venv_dir(result.slot) / "bin/python"
    shown = subprocess.run(
        [
            venv_python,
            "-c",
            "import agent.process as p; print(p.__file__); print(p.agent_version())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    assert shown[0].startswith(str(store.venv_dir(result.slot)))
    assert shown[1] == "0.1.0"


def test_crash_point_names_are_checked(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    config = BundlesConfig(trusted_keys_dir=bundle_keys.trusted_dir)
    with pytest.raises(BundleError, match="is not a crash point"):
        Installer(config, tmp_path, agent_version="0", target=detect_target(), crash_at="nope")
    assert len(set(CRASH_POINTS)) == len(CRASH_POINTS)


def test_downgrade_bar_survives_a_rollback_to_the_factory_install(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    _install(tmp_path, bundle_keys, "2.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "2.0.0")
    assert store.read_state().highest_committed == "2.0.0"
    assert manual_rollback(store) is None  # committed -> nothing before it: the factory install
    state = store.read_state()
    assert (state.committed, store.current_slot()) == (None, None)
    assert state.highest_committed == "2.0.0"
    # neither `current` nor `committed` knows 2.0.0 any more; the high-water mark does
    for version in ("1.5.0", "2.0.0"):
        with pytest.raises(BundleDowngradeError) as info:
            _install(tmp_path, bundle_keys, version)
        assert str(info.value) == (
            f"bundle version {version} is not newer than 2.0.0, the highest version ever "
            "committed on this device; pass --allow-downgrade to install it anyway"
        )
    assert store.current_slot() is None
    assert _install(tmp_path, bundle_keys, "1.5.0", allow_downgrade=True).version == "1.5.0"
    commit(store, "a", "1.5.0")
    assert store.read_state().highest_committed == "2.0.0"  # an allowed downgrade keeps the bar
    assert _install(tmp_path, bundle_keys, "2.0.1").slot == "b"


def test_an_old_state_json_without_the_high_water_mark_still_counts_committed(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    _install(tmp_path, bundle_keys, "2.0.0")
    store = SlotStore(tmp_path / "state")
    commit(store, "a", "2.0.0")
    # as written before highest_committed existed (an older agent committed 2.0.0)
    data = json.loads(store.state_path.read_text())
    del data["highest_committed"]
    store.state_path.write_text(json.dumps(data))
    assert store.read_state().highest_committed is None
    with pytest.raises(BundleDowngradeError, match=r"not newer than the installed 2\.0\.0"):
        _install(tmp_path, bundle_keys, "1.0.0")
    _install(tmp_path, bundle_keys, "2.1.0")  # the install raises the mark to what was committed
    assert store.read_state().highest_committed == "2.0.0"
