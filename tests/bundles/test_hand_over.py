"""``bundle install`` run by root for a service with ``User=edge-agent``: what root writes under
``<state_dir>/bundles`` ends up owned by the state directory's owner, so the agent can take
install.lock, replace state.json, roll back and run the hooks (a root-owned install.lock alone
keeps the service from starting: tests/systemd/test_bundles.py shows it under systemd).

As root the state directory is given to ``nobody`` (a real other user, real chown); as another
user the hand-over is a no-op and everything stays ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bundle_support import BundleKeys, make_bundle
from http_support import serving

from agent.bundle_config import BundlesConfig
from agent.bundles.download import download_bundle
from agent.bundles.install import Installer
from agent.bundles.slots import SlotStore
from agent.bundles.target import detect_target
from agent.errors import BundleDownloadError

NOBODY = 65534


def _state_dir(tmp_path: Path) -> tuple[Path, int]:
    """A state directory owned by another user when we are root; (path, expected owner)."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() == 0:
        os.chown(state, NOBODY, NOBODY)
        return state, NOBODY
    return state, os.getuid()


def _owners(root: Path) -> dict[str, int]:
    found = {".": root.lstat().st_uid}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if not path.is_symlink():
                found[str(path.relative_to(root))] = path.lstat().st_uid
    return found


def test_lock_gives_the_folder_and_the_lock_file_to_the_state_dir_owner(tmp_path: Path) -> None:
    state, owner = _state_dir(tmp_path)
    store = SlotStore(state)
    with store.lock():
        pass
    assert store.root.stat().st_uid == owner
    assert store.lock_path.stat().st_uid == owner


def test_an_install_leaves_every_file_to_the_state_dir_owner(
    bundle_keys: BundleKeys, tmp_path: Path
) -> None:
    state, owner = _state_dir(tmp_path)
    bundle = make_bundle(
        tmp_path / "b.bundle",
        {
            "models/m.onnx": os.urandom(4096),
            "config/agent.toml": b'device_id = "cam-1"\n',
            "hooks/post-install": b"#!/bin/sh\nexit 0\n",
        },
        version="1.0.0",
        key=bundle_keys.key,
    )
    installer = Installer(
        BundlesConfig(trusted_keys_dir=bundle_keys.trusted_dir),
        state,
        agent_version="0.1.0",
        target=detect_target(),
    )
    result = installer.install(bundle)
    store = SlotStore(state)
    assert store.current_slot() == result.slot == "a"
    owners = _owners(store.root)
    assert {
        "state.json",
        "install.lock",
        "slots/a/INSTALLED",
        "slots/a/files/hooks/post-install",
    } <= set(owners)
    assert {path: uid for path, uid in owners.items() if uid != owner} == {}


def test_a_download_leaves_its_folders_and_files_to_the_state_dir_owner(tmp_path: Path) -> None:
    state, owner = _state_dir(tmp_path)
    downloads = SlotStore(state).downloads_dir  # bundles/downloads: both created here
    with serving({"/ok.bundle": os.urandom(200_000)}) as srv:
        srv.drops = [50_000, 0]  # a drop, then an attempt without a byte: give up
        with pytest.raises(BundleDownloadError):
            download_bundle(
                srv.url("/ok.bundle"),
                downloads,
                max_bytes=1 << 20,
                timeout=10,
                attempts_without_progress=1,
                backoff_s=0.01,
            )
        failed = _owners(state / "bundles")
        assert any(name.endswith(".bundle.part") for name in failed), failed
        assert {path: uid for path, uid in failed.items() if uid != owner} == {}
        path = download_bundle(srv.url("/ok.bundle"), downloads, max_bytes=1 << 20, timeout=10)
    assert path.stat().st_uid == owner
    assert {p: uid for p, uid in _owners(state / "bundles").items() if uid != owner} == {}
