"""``bundle install`` / ``bundle rollback`` run by root for a state directory that belongs to
another user (the service's ``User=edge-agent``): the whole install — download, verify, extract,
config check, pre-install hook, switch — runs in a child process as that user, so nothing under
``bundles/`` (which that user may rename at any time) is ever run or written by root.

Real users, real chown: the state directory is given to ``nobody``; the commands are the real
CLI run as root. The folders the child needs (state, trusted keys) are world-traversable ones
of their own (pytest's temporary root is 0700, closed to ``nobody``); the bundle itself is
root-only (0600) inside it — root opens it and hands the child the file descriptor.

The child runs the interpreter that runs the CLI (``sys.executable``). When ``nobody`` cannot
run this one (here it lives under /root, mode 0700), the CLI runs with a venv of the system
interpreter of the same version whose ``.pth`` adds this venv's site-packages and the checkout:
the same packages, readable by every user, like an installed agent's.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process_support import ROOT, base_env
from bundle_support import BundleKeys
from http_support import serving
from install_support import config_text, write_test_bundle

from agent.bundles.slots import SlotStore
from agent.cli.bundle_install_cmd import state_dir_owner

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to another user needs root (run the suite as root)"
)

NOBODY = 65534
HOOK = b'#!/bin/sh\nid -u > "$EDGE_AGENT_BUNDLE_SLOT_DIR/hook-uid"\n'
FAILING_HOOK = b"#!/bin/sh\necho 'no camera' >&2\nexit 3\n"


@pytest.fixture(scope="module")
def python() -> Iterator[Path]:
    """An interpreter with the project's packages that ``nobody`` may run (see the docstring)."""
    if _runs_as_nobody(Path(sys.executable)):
        yield Path(sys.executable)
        return
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.is_file():
        pytest.skip(f"nobody cannot run {sys.executable} and there is no {system}")
    top = Path(tempfile.mkdtemp(prefix="edge-privsep-python-"))
    try:
        top.chmod(0o755)
        subprocess.run([system, "-m", "venv", "--without-pip", top / "venv"], check=True)
        pure = subprocess.run(
            [
                top / "venv/bin/python",
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        paths = [*site.getsitepackages(), str(ROOT)]
        Path(pure, "edge_agent_test.pth").write_text("\n".join(paths) + "\n")
        venv_python = top / "venv/bin/python"
        if not _runs_as_nobody(venv_python):
            pytest.skip(f"nobody cannot import the agent with {system} and this venv's packages")
        yield venv_python
    finally:
        shutil.rmtree(top)


def _runs_as_nobody(python: Path) -> bool:
    try:
        done = subprocess.run(
            [python, "-I", "-c", "import agent.cli.bundle_install_cmd"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return False
    return done.returncode == 0


@pytest.fixture
def shared(bundle_keys: BundleKeys) -> Iterator[Path]:
    """A world-traversable folder with ``state/`` (owned by nobody), ``trusted/`` (the public
    key) and ``agent.toml`` (root's config naming both)."""
    top = Path(tempfile.mkdtemp(prefix="edge-privsep-"))
    try:
        top.chmod(0o755)
        trusted = top / "trusted"
        shutil.copytree(bundle_keys.trusted_dir, trusted)
        trusted.chmod(0o755)
        state = top / "state"
        state.mkdir()
        os.chown(state, NOBODY, NOBODY)
        (top / "agent.toml").write_text(
            f'state_dir = "{state}"\n\n[bundles]\ntrusted_keys_dir = "{trusted}"\n'
        )
        yield top
    finally:
        shutil.rmtree(top)


def _bundle(tmp_path: Path, keys: BundleKeys, version: str, hook: bytes = HOOK) -> Path:
    files: dict[str, bytes | Path] = {
        "config/agent.toml": config_text().encode(),
        "models/m.bin": os.urandom(8192),
        "hooks/pre-install": hook,
    }
    bundle = write_test_bundle(tmp_path / f"{version}.bundle", keys, version, files)
    bundle.chmod(0o600)  # root only, inside pytest's 0700 folder
    return bundle


def _cli(
    python: Path, shared: Path, *args: str | Path, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "agent", "bundle", *map(str, args), "--config", shared / "agent.toml"],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _not_nobodys(root: Path) -> list[str]:
    """Everything under ``root`` (links included, by their own owner) not owned by nobody."""
    found = [] if root.lstat().st_uid == NOBODY else ["."]
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if path.lstat().st_uid != NOBODY:
                found.append(f"{path.relative_to(root)} (uid {path.lstat().st_uid})")
    return found


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("edge-agent: error")]


def test_the_owner_is_the_state_dirs_user_when_root(shared: Path, tmp_path: Path) -> None:
    owner = state_dir_owner(shared / "state")
    assert owner is not None
    assert (owner.uid, owner.name) == (NOBODY, "nobody")
    mine = tmp_path / "mine"
    mine.mkdir()
    assert state_dir_owner(mine) is None  # root's own state directory: no switch
    (mine / "bundles").mkdir()
    os.chown(mine / "bundles", NOBODY, NOBODY)  # bundles/ given away: that user decides
    owner = state_dir_owner(mine)
    assert owner is not None
    assert owner.uid == NOBODY


def test_root_install_runs_as_the_owner_from_a_root_only_bundle(
    python: Path, shared: Path, tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    bundle = _bundle(tmp_path, bundle_keys, "1.0.0")
    assert bundle.stat().st_uid == 0
    assert bundle.stat().st_mode & 0o777 == 0o600
    done = _cli(python, shared, "install", bundle, "--no-restart")
    assert done.returncode == 0, done.stderr
    assert "installed version 1.0.0 into slot a (was the factory install)" in done.stdout
    assert "%] verifying 1.0.0.bundle" in done.stderr  # the child's progress reaches the user
    store = SlotStore(shared / "state")
    assert store.current_slot() == "a"
    assert store.slot_problems("a") == []
    # the pre-install hook ran as nobody, and everything was created by nobody
    assert (store.slot_dir("a") / "hook-uid").read_text().strip() == str(NOBODY)
    assert _not_nobodys(store.root) == []
    assert {"install.lock", "state.json", "current"} <= {p.name for p in store.root.iterdir()}

    back = _cli(python, shared, "rollback", "--no-restart")
    assert back.returncode == 0, back.stderr
    assert "current is now the factory install" in back.stdout
    assert store.current_slot() is None
    assert [b.version for b in store.read_state().bad_versions] == ["1.0.0"]
    assert _not_nobodys(store.root) == []


def test_a_failing_and_a_killed_child_are_one_line_and_leave_nothing_of_roots(
    python: Path, shared: Path, tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    store = SlotStore(shared / "state")
    failing = _bundle(tmp_path, bundle_keys, "1.0.0", FAILING_HOOK)
    done = _cli(python, shared, "install", failing, "--no-restart")
    assert done.returncode == 1
    assert _error_lines(done.stderr) == [
        "edge-agent: error [bundle_hook_failed]: pre-install exited 3: no camera"
    ], done.stderr
    assert "Traceback" not in done.stderr
    assert store.current_slot() is None

    good = _bundle(tmp_path, bundle_keys, "1.0.1")
    killed = _cli(
        python, shared, "install", good, "--no-restart", EDGE_AGENT_TEST_CRASH_AT="extracted"
    )
    assert killed.returncode == 1
    errors = _error_lines(killed.stderr)
    assert len(errors) == 1, killed.stderr
    assert errors[0].startswith(
        "edge-agent: error [bundle_invalid]: the install, run as nobody (uid 65534), was killed "
        "by SIGKILL before it finished"
    ), errors
    assert "Traceback" not in killed.stderr
    assert store.current_slot() is None
    assert store.installed("a") is None  # extracted, never marked: garbage for the next one
    assert (store.files_dir("a") / "models/m.bin").is_file()
    assert _not_nobodys(store.root) == []

    missing = _cli(python, shared, "install", tmp_path / "nope.bundle", "--no-restart")
    assert missing.returncode == 1
    expected = (
        f"edge-agent: error [bundle_invalid]: bundle file {tmp_path / 'nope.bundle'} not found "
        "— give a .bundle file or a URL"
    )
    assert _error_lines(missing.stderr) == [expected]


def test_root_url_install_downloads_as_the_owner(
    python: Path, shared: Path, tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    bundle = _bundle(tmp_path, bundle_keys, "1.0.0")
    with serving({"/b.bundle": bundle.read_bytes()}) as server:
        done = _cli(python, shared, "install", server.url("/b.bundle"), "--no-restart")
    assert done.returncode == 0, done.stderr
    assert "downloading http://127.0.0.1:" in done.stderr
    store = SlotStore(shared / "state")
    assert store.current_slot() == "a"
    assert store.downloads_dir.is_dir()
    assert list(store.downloads_dir.glob("*.bundle")) == []  # removed once installed
    assert (store.slot_dir("a") / "hook-uid").read_text().strip() == str(NOBODY)
    assert _not_nobodys(store.root) == []
