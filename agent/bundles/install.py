"""The installer: a verified bundle into the inactive A/B slot, then ``current`` switched.

``Installer(...).install(bundle)`` runs these steps; after each one the crash point of the same
name (``CRASH_POINTS``) lets a test SIGKILL the process there (``crash_at``):

    locked              install.lock held (a second install gets ``busy``)
    verified            zstd+tar readable, manifest.sig verified against the trusted keys
    compat_checked      board, machine, python, L4T, TensorRT, minimum agent version
    downgrade_checked   newer than the current slot's, the committed and the highest version
                        ever committed (unless allowed)
    slot_wiped          the inactive slot emptied (the active one is never written)
    extract_first_file  the first payload file written and checked (mid-extract)
    extracted           every payload file written, size + sha256 checked, fsynced
    venv_created        ``python -m venv slots/X/venv`` (only with wheels)
    wheels_installed    ``venv/bin/python -m pip install --no-index --no-deps`` the wheels
    config_validated    the bundle's config validated by the NEW code
    pre_install_hook    ``files/hooks/pre-install`` exited 0 within hook_timeout_s
    installed_marked    everything synced to disk, then ``INSTALLED`` written: the slot is
                        complete
    state_pending       state.json: pending = {slot, version, attempts 0}
    switched            ``current`` renamed to the new slot

Why every point is safe: until ``switched`` the only writes are in the inactive slot (garbage
until INSTALLED exists) and in state.json, whose pending entry is stale (cleared at boot) while
``current`` points elsewhere; the switch is one rename. After it the next boot is the new
version's first trial.

Privileges: the installer runs as the state directory's owner. ``bundle install`` run by root
for a service with ``User=edge-agent`` runs the whole installer (download included) in a child
process as that user (``agent.cli.bundle_install_cmd``), so the venv's python, pip, the new
agent's ``config validate`` and the pre-install hook run as the service's user too.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from packaging.version import InvalidVersion, Version

from agent.bundle_config import BundlesConfig
from agent.bundles.archive import BundleReader, open_bundle, verify_signature
from agent.bundles.signing import load_trusted_keys, signature_bytes
from agent.bundles.slots import (
    BootState,
    InstalledRecord,
    Pending,
    SlotName,
    SlotStore,
    newest_version,
)
from agent.bundles.target import Target, check_compat
from agent.errors import (
    AgentError,
    BundleBusyError,
    BundleDowngradeError,
    BundleError,
    BundleHookError,
    BundleIncompatibleError,
    BundleSpaceError,
)
from engines.fetch import atomic_write_bytes

__all__ = [
    "CRASH_POINTS",
    "CRASH_POINT_ENV",
    "InstallProgress",
    "InstallResult",
    "Installer",
    "run_hook",
]

_log = logging.getLogger(__name__)

CRASH_POINTS: tuple[str, ...] = (
    "locked",
    "verified",
    "compat_checked",
    "downgrade_checked",
    "slot_wiped",
    "extract_first_file",
    "extracted",
    "venv_created",
    "wheels_installed",
    "config_validated",
    "pre_install_hook",
    "installed_marked",
    "state_pending",
    "switched",
)
"""Every step of an install, in order (see the module docstring)."""

CRASH_POINT_ENV = "EDGE_AGENT_TEST_CRASH_AT"
"""Tests only: ``edge-agent bundle install`` reads it and passes it as ``crash_at``."""

InstallProgress = Callable[[float, str], None]
"""``progress(fraction, message)``."""

_VENV_TIMEOUT_S = 600.0
_PIP_TIMEOUT_S = 1800.0
_VALIDATE_TIMEOUT_S = 120.0
_OUTPUT_TAIL = 600

# fraction of the whole install reached at the end of each phase
_EXTRACT_END = 0.55
_VENV_END = 0.6
_WHEELS_END = 0.85


@dataclass(frozen=True)
class InstallResult:
    slot: SlotName
    version: str
    previous_version: str | None
    """The version ``current`` pointed at before (None: the factory install)."""


class Installer:
    """Installs bundles into the slots of one state directory (see the module docstring)."""

    def __init__(
        self,
        config: BundlesConfig,
        state_dir: Path,
        *,
        agent_version: str,
        target: Target,
        progress: InstallProgress | None = None,
        crash_at: str | None = None,
        python: Path | None = None,
    ) -> None:
        if crash_at is not None and crash_at not in CRASH_POINTS:
            raise BundleError(
                f"{CRASH_POINT_ENV}={crash_at!r} is not a crash point ({', '.join(CRASH_POINTS)})"
            )
        self.config = config
        self.store = SlotStore(state_dir)
        self.agent_version = agent_version
        self.target = target
        self._progress = progress
        self._crash_at = crash_at
        self._python = Path(sys.executable) if python is None else python

    # ------------------------------------------------------------------ steps
    def install(
        self, bundle: Path, *, allow_downgrade: bool = False, file: BinaryIO | None = None
    ) -> InstallResult:
        """Install ``bundle`` into the inactive slot and switch ``current`` to it; the caller
        restarts the service. Raises a BundleError subclass (one line, a reason code).

        ``file``: the bundle already open (read once from its start and closed here; ``bundle``
        then only names it), e.g. a file descriptor inherited from root."""
        try:
            return self._install(bundle, allow_downgrade=allow_downgrade, file=file)
        except OSError as exc:  # our own files (slot, state.json, current): one line
            where = f" ({exc.filename})" if exc.filename else ""
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BundleSpaceError(
                    f"disk full while installing {bundle.name}{where}; free space and install "
                    "again (the active slot is untouched)"
                ) from exc
            raise BundleError(
                f"installing {bundle.name} failed: {exc.strerror or exc}{where}"
            ) from exc

    def _install(
        self, bundle: Path, *, allow_downgrade: bool, file: BinaryIO | None
    ) -> InstallResult:
        with self.store.lock():
            self._reached("locked")
            state = self.store.read_state()
            current = self.store.current_slot()
            self._refuse_during_trial(state, current)
            previous = self.store.installed(current) if current is not None else None
            slot = self.store.inactive_slot()
            self._report(0.0, f"verifying {bundle.name}")
            trusted = load_trusted_keys(self.config.trusted_keys_dir)
            with open_bundle(bundle, file=file) as reader:
                key_id = verify_signature(reader, trusted)
                manifest = reader.manifest
                _log.info(
                    "bundle %s %s: signature verified with key %r",
                    manifest.name,
                    manifest.version,
                    key_id,
                )
                self._reached("verified")
                check_compat(manifest, self.target, self.agent_version)
                self._reached("compat_checked")
                self._check_downgrade(
                    manifest.version,
                    None if previous is None else previous.version,
                    state,
                    allow_downgrade or self.config.allow_downgrade,
                )
                self._reached("downgrade_checked")
                self.store.wipe(slot)
                self._reached("slot_wiped")
                self._extract(reader, slot)
            self._reached("extracted")
            has_wheels = bool(manifest.wheels)
            if has_wheels:
                self._make_venv(slot, [f.path for f in manifest.wheels])
            has_config = manifest.file("config/agent.toml") is not None
            if has_config:
                self._validate_config(slot, venv=has_wheels)
            self._reached("config_validated")
            self._pre_install_hook(slot, manifest.version)
            self._reached("pre_install_hook")
            # the venv (pip does not fsync) and the hook's files reach the disk before the
            # record that declares the slot complete
            os.sync()
            self.store.mark_installed(
                slot,
                InstalledRecord(
                    name=manifest.name,
                    version=manifest.version,
                    agent_version=manifest.agent_version,
                    venv=has_wheels,
                    config=has_config,
                    installed_at=time.time(),
                ),
            )
            self._reached("installed_marked")
            state = self.store.read_state()
            state.note_committed()  # committed by an older agent that did not raise the bar
            state.pending = Pending(slot=slot, version=manifest.version)
            state.record("installed", version=manifest.version, slot=slot)
            self.store.write_state(state)
            self._reached("state_pending")
            self.store.switch_current(slot)
            self._reached("switched")
            self._report(1.0, f"installed {manifest.name} {manifest.version} into slot {slot}")
        return InstallResult(
            slot=slot,
            version=manifest.version,
            previous_version=None if previous is None else previous.version,
        )

    def _refuse_during_trial(self, state: BootState, current: SlotName | None) -> None:
        pending = state.pending
        if pending is not None and pending.slot == current and pending.failed is None:
            raise BundleBusyError(
                f"version {pending.version} (slot {pending.slot}) is still on trial: wait "
                "until it is committed or rolled back (`edge-agent bundle status`), or run "
                "`edge-agent bundle rollback`"
            )

    @staticmethod
    def _check_downgrade(
        version: str, current: str | None, state: BootState, allowed: bool
    ) -> None:
        """``version`` must be newer than the current slot's version, the committed one and
        the highest ever committed (a rollback, even to the factory install, does not lower
        the bar); nothing known (factory, nothing ever committed): any version goes."""
        committed = None if state.committed is None else state.committed.version
        bar = newest_version(current, committed, state.highest_committed)
        if bar is None:
            return
        try:
            newer = Version(version) > Version(bar)
        except InvalidVersion as exc:
            raise BundleDowngradeError(
                f"cannot compare bundle version {version!r} with the installed {bar!r}"
            ) from exc
        if newer:
            return
        if allowed:
            _log.warning("installing %s, not newer than %s: downgrade allowed", version, bar)
            return
        if bar in (current, committed):
            what = f"the installed {bar}"
        else:
            what = f"{bar}, the highest version ever committed on this device"
        raise BundleDowngradeError(
            f"bundle version {version} is not newer than {what}; pass --allow-downgrade to "
            "install it anyway"
        )

    def _extract(self, reader: BundleReader, slot: SlotName) -> None:
        slot_dir = self.store.slot_dir(slot)  # made empty (and no symlink) by wipe()
        atomic_write_bytes(slot_dir / "manifest.json", reader.manifest_bytes)
        if reader.signature is not None:
            atomic_write_bytes(slot_dir / "manifest.sig", signature_bytes(reader.signature))
        first = [True]

        def progress(fraction: float, message: str) -> None:
            self._report(_EXTRACT_END * fraction, message)
            if first[0]:
                first[0] = False
                self._reached("extract_first_file")

        reader.extract_to(self.store.files_dir(slot), progress)

    def _make_venv(self, slot: SlotName, wheels: Sequence[str]) -> None:
        venv = self.store.venv_dir(slot)
        cmd: list[str | Path] = [self._python, "-m", "venv"]
        if self.config.venv_system_site_packages:
            cmd.append("--system-site-packages")
        self._report(_EXTRACT_END, f"creating the virtual environment of slot {slot}")
        _run_step("creating the slot's virtual environment", [*cmd, venv], _VENV_TIMEOUT_S)
        self._reached("venv_created")
        self._report(_VENV_END, f"installing {len(wheels)} wheel(s) into slot {slot}")
        files = self.store.files_dir(slot)
        _run_step(
            "installing the bundle's wheels",
            [
                venv / "bin" / "python",
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--disable-pip-version-check",
                *(files / w for w in wheels),
            ],
            _PIP_TIMEOUT_S,
            incompatible=True,
        )
        self._reached("wheels_installed")
        self._report(_WHEELS_END, "wheels installed")

    def _validate_config(self, slot: SlotName, *, venv: bool) -> None:
        config = self.store.config_file(slot)
        self._report(_WHEELS_END, "validating the bundle's config with the new agent")
        if venv:
            _run_step(
                "validating the bundle's config with the new agent",
                [self.store.venv_dir(slot) / "bin" / "edge-agent", "config", "validate", config],
                _VALIDATE_TIMEOUT_S,
                incompatible=True,
            )
            return
        from agent.configfile import load_config  # noqa: PLC0415

        try:
            load_config(config)
        except AgentError as exc:
            raise BundleIncompatibleError(f"the bundle's config/agent.toml: {exc}") from exc

    def _pre_install_hook(self, slot: SlotName, version: str) -> None:
        hook = self.store.files_dir(slot) / "hooks" / "pre-install"
        if not hook.is_file():
            return
        self._report(0.9, "running the pre-install check")
        run_hook(hook, self.store.slot_dir(slot), version, self.config.hook_timeout_s)

    # ------------------------------------------------------------------ helpers
    def _report(self, fraction: float, message: str) -> None:
        if self._progress is not None:
            self._progress(min(1.0, max(0.0, fraction)), message)

    def _reached(self, point: str) -> None:
        _log.debug("install step done: %s", point)
        if point == self._crash_at:
            _log.warning("test crash point %s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)


def run_hook(hook: Path, slot_dir: Path, version: str, timeout_s: float) -> None:
    """Run a bundle hook (``hooks/pre-install`` / ``hooks/post-install``) in ``slot_dir``;
    BundleHookError when it exits non-zero, cannot start or overruns ``timeout_s``."""
    hook.chmod(hook.stat().st_mode | 0o755)
    env = dict(
        os.environ,
        EDGE_AGENT_BUNDLE_SLOT_DIR=str(slot_dir),
        EDGE_AGENT_BUNDLE_VERSION=version,
    )
    try:
        proc = subprocess.run(
            [str(hook)],
            cwd=slot_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BundleHookError(
            f"{hook.name} did not finish within {timeout_s:g} s (bundles.hook_timeout_s)"
        ) from exc
    except OSError as exc:
        raise BundleHookError(
            f"{hook.name} cannot run ({exc.strerror}); it needs a #! line"
        ) from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[-_OUTPUT_TAIL:]
        raise BundleHookError(f"{hook.name} exited {proc.returncode}: {tail or 'no output'}")


def _run_step(
    what: str, cmd: Sequence[str | Path], timeout_s: float, *, incompatible: bool = False
) -> None:
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BundleError(f"{what} took over {timeout_s:g} s: `{' '.join(args[:4])} ...`") from exc
    except OSError as exc:
        raise BundleError(f"{what}: cannot run {args[0]} ({exc.strerror})") from exc
    if proc.returncode == 0:
        return
    output = (proc.stdout + proc.stderr).strip()
    tail = " | ".join(output.splitlines()[-3:])[-_OUTPUT_TAIL:]
    if "No space left on device" in output:
        raise BundleSpaceError(f"{what}: disk full ({tail}); free space and install again")
    cls = BundleIncompatibleError if incompatible else BundleError
    raise cls(f"{what} failed (exit {proc.returncode}): {tail or 'no output'}")
