"""`edge-agent bundle install|status|rollback` as real commands (child processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent_process_support import ROOT, base_env
from bundle_support import BundleKeys, tampered_payload, without_signature
from http_support import serving
from install_support import config_text, lock_held_by_another_process, write_test_bundle

from agent.bundles.slots import SlotStore


def _config(tmp_path: Path, keys: BundleKeys) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n\n[bundles]\n'
        f'trusted_keys_dir = "{keys.trusted_dir}"\n'
    )
    return path


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "bundle", *map(str, args)],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _bundle(tmp_path: Path, keys: BundleKeys, version: str) -> Path:
    files: dict[str, bytes | Path] = {"config/agent.toml": config_text().encode()}
    return write_test_bundle(tmp_path / f"{version}.bundle", keys, version, files)


def test_install_status_rollback(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    config = _config(tmp_path, bundle_keys)
    bundle = _bundle(tmp_path, bundle_keys, "1.0.0")
    done = _cli("install", bundle, "--no-restart", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "installed version 1.0.0 into slot a (was the factory install)" in done.stdout
    assert "%] verifying 1.0.0.bundle" in done.stderr  # progress on stderr
    status = _cli("status", "--json", "--config", config)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["current"] == "a"
    assert data["slots"]["a"]["version"] == "1.0.0"
    assert data["slots"]["b"] is None
    assert data["state"]["pending"]["version"] == "1.0.0"
    text = _cli("status", "--config", config).stdout
    assert "pending:   1.0.0 (slot a, boot attempts 0)" in text
    back = _cli("rollback", "--no-restart", "--config", config)
    assert back.returncode == 0, back.stderr
    assert "current is now the factory install" in back.stdout
    state = SlotStore(tmp_path / "state").read_state()
    assert state.pending is None
    assert [b.version for b in state.bad_versions] == ["1.0.0"]


def test_errors_are_one_line_with_the_reason(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    config = _config(tmp_path, bundle_keys)
    missing = _cli("install", tmp_path / "nope.bundle", "--no-restart", "--config", config)
    assert missing.returncode == 1
    expected = (
        f"edge-agent: error [bundle_invalid]: bundle file {tmp_path / 'nope.bundle'} not found "
        "— give a .bundle file or a URL"
    )
    assert missing.stderr.strip().splitlines() == [expected]
    nothing = _cli("rollback", "--no-restart", "--config", config)
    assert nothing.returncode == 1
    assert "[bundle_invalid]: nothing to roll back" in nothing.stderr


def test_unsigned_and_tampered_bundles_are_one_line_refusals(
    tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    config = _config(tmp_path, bundle_keys)
    good = _bundle(tmp_path, bundle_keys, "1.0.0")
    cases = {
        "bundle_signature_invalid": without_signature(good, tmp_path / "unsigned.bundle"),
        "bundle_content_invalid": tampered_payload(
            good, tmp_path / "tampered.bundle", "config/agent.toml"
        ),
    }
    store = SlotStore(tmp_path / "state")
    for reason, bad in cases.items():
        done = _cli("install", bad, "--no-restart", "--config", config)
        assert done.returncode == 1, done.stdout
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith(f"edge-agent: error [{reason}]: "), done.stderr
        assert "Traceback" not in done.stderr
        assert store.current_slot() is None
        assert store.installed("a") is None
        assert store.read_state().pending is None


def test_second_install_gets_busy(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    config = _config(tmp_path, bundle_keys)
    bundle = _bundle(tmp_path, bundle_keys, "1.0.0")
    store = SlotStore(tmp_path / "state")
    with lock_held_by_another_process(store.lock_path):
        busy = _cli("install", bundle, "--no-restart", "--config", config)
    assert busy.returncode == 1
    assert "edge-agent: error [busy]: another bundle install or rollback is running" in busy.stderr
    assert store.current_slot() is None


def test_install_from_a_url(tmp_path: Path, bundle_keys: BundleKeys) -> None:
    config = _config(tmp_path, bundle_keys)
    bundle = _bundle(tmp_path, bundle_keys, "1.0.0")
    with serving({"/street-1.0.0.bundle": bundle.read_bytes()}) as server:
        done = _cli(
            "install", server.url("/street-1.0.0.bundle"), "--no-restart", "--config", config
        )
    assert done.returncode == 0, done.stderr
    assert "installed version 1.0.0 into slot a" in done.stdout
    assert "downloading http://127.0.0.1:" in done.stderr
    store = SlotStore(tmp_path / "state")
    assert store.current_slot() == "a"
    assert store.slot_problems("a") == []
    assert list(store.downloads_dir.glob("*.bundle")) == []  # removed once installed
