"""SlotStore: the durable boot state, the `current` symlink, slot wipe, the install lock."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from agent.bundles.slots import (
    HISTORY_LIMIT,
    BootState,
    InstalledRecord,
    Pending,
    SlotRef,
    SlotStore,
    other_slot,
    parse_slot,
)
from agent.errors import BundleBusyError, BundleError


def _record(version: str) -> InstalledRecord:
    return InstalledRecord(
        name="b", version=version, agent_version=None, venv=False, config=False, installed_at=1.0
    )


def test_state_round_trip_and_empty_default(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    assert store.read_state() == BootState()
    state = BootState(
        committed=SlotRef(slot="a", version="1.0"),
        pending=Pending(slot="b", version="2.0", attempts=2, first_boot_at=5.0),
    )
    state.record("installed", version="2.0", slot="b")
    store.write_state(state)
    assert store.read_state() == state
    on_disk = json.loads(store.state_path.read_text())
    assert on_disk["pending"] == {
        "slot": "b",
        "version": "2.0",
        "attempts": 2,
        "first_boot_at": 5.0,
        "failed": None,
    }
    # the temporary file of the atomic write is gone
    assert [p.name for p in store.root.iterdir()] == ["state.json"]


def test_history_keeps_the_last_events(tmp_path: Path) -> None:
    state = BootState()
    for n in range(HISTORY_LIMIT + 5):
        state.record("boot", detail=str(n))
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[0].detail == "5"
    assert state.history[-1].detail == str(HISTORY_LIMIT + 4)


def test_corrupt_state_is_one_clear_error(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.root.mkdir()
    store.state_path.write_text('{"pending": {"slot": "c"}}')
    with pytest.raises(BundleError, match="not a valid boot state"):
        store.read_state()


def test_switch_current_is_a_symlink_rename(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    assert store.current_slot() is None
    assert store.inactive_slot() == "a"
    store.switch_current("a")
    assert str(store.current_link.readlink()) == "slots/a"
    assert store.current_slot() == "a"
    assert store.inactive_slot() == "b"
    store.switch_current("b")
    assert store.current_slot() == "b"
    assert not (store.root / ".current.tmp").exists()
    store.switch_current(None)
    assert not store.current_link.is_symlink()
    assert store.current_slot() is None


def test_current_pointing_elsewhere_is_refused(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.root.mkdir()
    store.current_link.symlink_to("/etc")
    with pytest.raises(BundleError, match="not slots/a or slots/b"):
        store.current_slot()


def test_wipe_removes_the_inactive_slot_and_refuses_the_active_one(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    for slot in ("a", "b"):
        (store.files_dir(slot) / "models").mkdir(parents=True)
        (store.files_dir(slot) / "models" / "m.onnx").write_bytes(b"x")
    store.switch_current("a")
    with pytest.raises(BundleError, match="active slot"):
        store.wipe("a")
    store.wipe("b")
    assert store.slot_dir("b").is_dir()
    assert list(store.slot_dir("b").iterdir()) == []
    assert (store.files_dir("a") / "models" / "m.onnx").read_bytes() == b"x"


def test_wipe_removes_a_symlinked_slot_without_following_it(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "state")
    victim = tmp_path / "victim"
    (victim / "files").mkdir(parents=True)
    (victim / "files" / "keep").write_bytes(b"keep me")
    store.slot_dir("b").parent.mkdir(parents=True)
    store.slot_dir("b").symlink_to(victim)
    store.wipe("b")
    assert (victim / "files" / "keep").read_bytes() == b"keep me"
    assert not store.slot_dir("b").is_symlink()
    assert store.slot_dir("b").is_dir()
    assert list(store.slot_dir("b").iterdir()) == []


def test_symlinked_slots_folder_or_lock_is_refused(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "state")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store.root.mkdir(parents=True)
    (store.root / "slots").symlink_to(elsewhere)
    with pytest.raises(BundleError, match="symbolic link") as info:
        store.wipe("a")
    assert "\n" not in str(info.value)
    assert list(elsewhere.iterdir()) == []
    (store.root / "slots").unlink()
    store.lock_path.symlink_to(elsewhere / "created-by-root")
    with pytest.raises(BundleError, match="regular file"), store.lock():
        pass
    assert list(elsewhere.iterdir()) == []


def test_installed_record_missing_or_unreadable_is_none(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    assert store.installed("a") is None
    store.slot_dir("a").mkdir(parents=True)
    (store.slot_dir("a") / "INSTALLED").write_text("{not json")
    assert store.installed("a") is None
    store.mark_installed("a", _record("1.0"))
    record = store.installed("a")
    assert record is not None
    assert record.version == "1.0"


def test_slot_problems_finds_a_changed_file(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    files = store.files_dir("a")
    files.mkdir(parents=True)
    (files / "x.bin").write_bytes(b"hello")
    manifest = {
        "files": [
            {
                "path": "x.bin",
                "size": 5,
                "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            }
        ]
    }
    (store.slot_dir("a") / "manifest.json").write_text(json.dumps(manifest))
    assert store.slot_problems("a") == []
    (files / "x.bin").write_bytes(b"hellO")
    assert store.slot_problems("a") == ["x.bin: size/sha256 differ from the manifest"]
    (files / "x.bin").unlink()
    assert len(store.slot_problems("a")) == 1


def test_lock_is_exclusive_and_busy_at_once(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    with store.lock():
        # flock belongs to the open file: a second open of the lock file is another holder
        with pytest.raises(BundleBusyError, match=r"lock .* is held") as info, store.lock():
            pass
        assert info.value.reason == "busy"
    with store.lock():
        pass


def test_lock_waits_for_a_holder_that_lets_go(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    with store.lock(wait_s=30):
        assert release.is_set()
    thread.join(10)


def test_slot_names() -> None:
    assert other_slot("a") == "b"
    assert other_slot("b") == "a"
    assert parse_slot("b") == "b"
    assert parse_slot("c") is None
    assert parse_slot(None) is None


def test_state_fields_of_a_newer_agent_are_kept_and_old_files_load(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.root.mkdir()
    # written before highest_committed existed: loads, the mark unknown
    store.state_path.write_text('{"committed": {"slot": "a", "version": "1.0"}}')
    assert store.read_state().highest_committed is None
    # a field of a newer agent survives this version's rewrite (the launcher rewrites it)
    store.state_path.write_text('{"committed": null, "future_field": {"x": 1}}')
    state = store.read_state()
    state.record("boot")
    store.write_state(state)
    assert json.loads(store.state_path.read_text())["future_field"] == {"x": 1}


def test_state_json_is_never_read_through_a_link_or_from_a_fifo(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.root.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"committed": {"slot": "a", "version": "9.9"}}')
    store.state_path.symlink_to(elsewhere)
    with pytest.raises(BundleError, match=r"state\.json is unreadable"):
        store.read_state()
    store.state_path.unlink()
    os.mkfifo(store.state_path)  # a reader that blocked here would hang `bundle status`
    with pytest.raises(BundleError, match="not a regular file"):
        store.read_state()
