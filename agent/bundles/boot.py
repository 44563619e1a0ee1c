"""Boot: which slot ``edge-agent run`` starts, the durable boot-attempt counter, rollback.

``select(config, state_dir)`` runs first in ``edge-agent run`` (not when ``EDGE_AGENT_SLOT`` is
set: then we already are the chosen slot's agent). Under ``install.lock``:

1. ``current`` points at no slot -> the factory install (the launcher itself runs).
2. A pending version whose slot is not ``current`` is stale (an install died before its
   switch): cleared (a failed one is recorded as bad).
3. ``current`` is pending: attempts += 1, first_boot_at set on the first boot, state.json
   written durably *before* the new code runs (a crash or power loss during the boot counts).
   If attempts > max_boot_attempts, the time since first_boot_at > health_timeout_s, or
   pending.failed is set (the gate or the start failed): rollback.
4. Rollback: ``current`` -> the committed slot (or removed: factory), bad_versions += version,
   pending = null. ``current`` is switched before pending is cleared, so a crash in between
   leaves a stale pending (cleared at the next boot), never the bad version without a trial.

``exec_slot`` then replaces the launcher with ``slots/X/venv/bin/python
slots/X/venv/bin/edge-agent run`` (the factory interpreter with ``-m agent`` for a slot without
wheels), env ``EDGE_AGENT_SLOT=X``, ``EDGE_AGENT_MODEL_PATH`` prefixed with the slot's models,
``STATE_DIRECTORY`` the launcher's state directory. The PID stays: systemd's notify handshake
and watchdog go on unchanged.

Every commit (and a manual rollback leaving a committed version) raises
``state.highest_committed``, the bar the installer's downgrade check keeps after a rollback,
even one back to the factory install.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from agent.bundle_config import BundlesConfig
from agent.bundles.slots import BadVersion, BootState, SlotName, SlotRef, SlotStore
from agent.errors import BundleBusyError, BundleError
from engines.store import MODEL_PATH_ENV

__all__ = [
    "SLOT_ENV",
    "BootChoice",
    "commit",
    "exec_slot",
    "manual_rollback",
    "mark_failed",
    "rollback",
    "select",
    "slot_env",
]

_log = logging.getLogger(__name__)

SLOT_ENV = "EDGE_AGENT_SLOT"
"""Set by the launcher for the slot's agent: the slot it runs from (and: do not select again)."""

_LOCK_WAIT_S = 10.0


@dataclass(frozen=True)
class BootChoice:
    slot: SlotName | None
    """The slot to run (None: the factory install)."""
    version: str | None
    pending: bool
    """The version is on trial (its health gate decides)."""
    rolled_back: str | None = None
    """The version this boot rolled back, if any."""


def select(config: BundlesConfig, state_dir: Path, *, now: float | None = None) -> BootChoice:
    """Decide what boots (see the module docstring); durable state changes happen here."""
    store = SlotStore(state_dir)
    if not store.root.is_dir():
        return BootChoice(slot=None, version=None, pending=False)
    try:
        with store.lock(_LOCK_WAIT_S):
            return _select_locked(store, config, time.time() if now is None else now)
    except BundleBusyError:
        # an install holds the lock: it switches `current` only as its last step, and refuses
        # to run while a version is on trial, so booting `current` untouched is safe
        why = f"the bundle install lock is still held after {_LOCK_WAIT_S:.0f} s"
    except (BundleError, OSError) as exc:
        # a broken state.json or a full disk must not keep the device from booting
        why = f"boot bookkeeping failed ({exc})"
    return _untracked(store, why)


def _untracked(store: SlotStore, why: str) -> BootChoice:
    """Boot what ``current`` points at without touching the state (factory when unusable)."""
    try:
        slot = store.current_slot()
    except BundleError as exc:
        _log.error("%s; %s: booting the factory install", why, exc)
        return BootChoice(slot=None, version=None, pending=False)
    record = None if slot is None else store.installed(slot)
    if record is None:
        slot = None
    _log.error(
        "%s: booting %s without boot bookkeeping",
        why,
        f"slot {slot}" if slot else "the factory install",
    )
    return BootChoice(slot=slot, version=None if record is None else record.version, pending=False)


def _select_locked(store: SlotStore, config: BundlesConfig, now: float) -> BootChoice:
    state = store.read_state()
    current = store.current_slot()
    if current is not None and store.installed(current) is None:
        reason = f"slot {current} has no INSTALLED record"
        _log.error("current points at an incomplete slot (%s): rolling back", reason)
        if state.pending is None or state.pending.slot != current:
            store.switch_current(_fallback(store, state, current))
            state.record("rolled_back", slot=current, detail=reason)
            store.write_state(state)
            return _choice(store, store.current_slot(), state)
        state.pending.failed = reason
    pending = state.pending
    if pending is not None and pending.slot != current:
        _log.warning(
            "pending version %s (slot %s) is not what current points at: stale, cleared",
            pending.version,
            pending.slot,
        )
        if pending.failed is not None:
            _add_bad(state, pending.version, pending.failed, now)
        state.record("stale_pending_cleared", version=pending.version, slot=pending.slot)
        state.pending = None
        store.write_state(state)
        return _choice(store, current, state)
    if pending is None:
        return _choice(store, current, state)
    pending.attempts += 1
    if pending.first_boot_at is None:
        pending.first_boot_at = now
    why: str | None = pending.failed
    if why is None and pending.attempts > config.max_boot_attempts:
        why = (
            f"boot attempt {pending.attempts} is over bundles.max_boot_attempts "
            f"({config.max_boot_attempts}) without passing the health gate"
        )
    elapsed = now - pending.first_boot_at
    if why is None and elapsed > config.health_timeout_s:
        why = (
            f"{elapsed:.0f} s since its first boot, over bundles.health_timeout_s "
            f"({config.health_timeout_s:g} s), without passing the health gate"
        )
    if why is not None:
        version = pending.version
        target = rollback(store, state, why, now=now)
        return BootChoice(
            slot=target,
            version=_version_of(store, target),
            pending=False,
            rolled_back=version,
        )
    state.record(
        "boot", version=pending.version, slot=pending.slot, detail=f"attempt {pending.attempts}"
    )
    store.write_state(state)
    _log.info(
        "booting version %s (slot %s) on trial: attempt %d of %d",
        pending.version,
        pending.slot,
        pending.attempts,
        config.max_boot_attempts,
    )
    return BootChoice(slot=current, version=pending.version, pending=True)


def _choice(store: SlotStore, slot: SlotName | None, state: BootState) -> BootChoice:
    pending = state.pending is not None and state.pending.slot == slot and slot is not None
    return BootChoice(slot=slot, version=_version_of(store, slot), pending=pending)


def _version_of(store: SlotStore, slot: SlotName | None) -> str | None:
    record = None if slot is None else store.installed(slot)
    return None if record is None else record.version


def _fallback(store: SlotStore, state: BootState, leaving: SlotName) -> SlotName | None:
    """Where a rollback from ``leaving`` goes: the committed slot if it is another, complete
    slot holding that version; else the factory install (None)."""
    committed = state.committed
    if committed is None or committed.slot == leaving:
        return None
    record = store.installed(committed.slot)
    if record is None or record.version != committed.version:
        _log.error(
            "committed version %s is no longer in slot %s: rolling back to the factory install",
            committed.version,
            committed.slot,
        )
        return None
    return committed.slot


def _add_bad(state: BootState, version: str, reason: str, now: float) -> None:
    state.bad_versions.append(BadVersion(version=version, reason=reason, at=now))


def rollback(
    store: SlotStore, state: BootState, reason: str, *, now: float | None = None
) -> SlotName | None:
    """Leave the pending version (caller holds the lock): record why, switch ``current`` back,
    then clear pending; returns the slot ``current`` now points at (None: factory)."""
    pending = state.pending
    if pending is None:
        raise BundleError("rollback without a pending version — a bug")
    when = time.time() if now is None else now
    if pending.failed is None:
        pending.failed = reason
        store.write_state(state)  # the reason survives a crash before the switch
    target = _fallback(store, state, pending.slot)
    store.switch_current(target)
    _add_bad(state, pending.version, reason, when)
    state.record("rolled_back", version=pending.version, slot=pending.slot, detail=reason)
    state.pending = None
    store.write_state(state)
    _log.error(
        "version %s rolled back (%s); booting %s",
        pending.version,
        reason,
        f"slot {target}" if target else "the factory install",
    )
    return target


def manual_rollback(store: SlotStore) -> SlotName | None:
    """``bundle rollback``: leave the version on trial (recorded as bad), or else go from the
    committed version to the previous one (or the factory install)."""
    with store.lock():
        state = store.read_state()
        current = store.current_slot()
        if current is None:
            raise BundleError("nothing to roll back: the factory install is running")
        if state.pending is not None and state.pending.slot == current:
            return rollback(store, state, "rolled back by `edge-agent bundle rollback`")
        back: SlotRef | None = None
        previous = state.previous
        if previous is not None and previous.slot != current:
            record = store.installed(previous.slot)
            if record is not None and record.version == previous.version:
                back = previous
        target = None if back is None else back.slot
        store.switch_current(target)
        state.note_committed()  # the version left stays the bar for the next install
        left = state.committed
        state.committed = back
        state.previous = None
        state.pending = None
        state.record(
            "manual_rollback",
            version=None if left is None else left.version,
            slot=current,
            detail=f"now {target or 'factory'}",
        )
        store.write_state(state)
        return target


def commit(store: SlotStore, slot: SlotName, version: str) -> None:
    """The gate passed: committed = slot, previous = the old committed, pending = null."""
    with store.lock(_LOCK_WAIT_S):
        state = store.read_state()
        pending = state.pending
        if pending is None or pending.slot != slot or pending.version != version:
            raise BundleError(
                f"cannot commit version {version} (slot {slot}): it is no longer pending"
            )
        if state.committed is not None and state.committed.slot != slot:
            state.previous = state.committed
        state.committed = SlotRef(slot=slot, version=version)
        state.note_committed()
        state.pending = None
        state.record(
            "committed", version=version, slot=slot, detail=f"after {pending.attempts} boot(s)"
        )
        store.write_state(state)
    _log.info("version %s (slot %s) passed its health gate: committed", version, slot)


def mark_failed(store: SlotStore, slot: SlotName, reason: str) -> bool:
    """Record that the pending version in ``slot`` failed (the next boot rolls it back);
    False when ``slot`` is not pending (nothing recorded)."""
    with store.lock(_LOCK_WAIT_S):
        state = store.read_state()
        pending = state.pending
        if pending is None or pending.slot != slot:
            return False
        pending.failed = reason
        state.record("failed", version=pending.version, slot=slot, detail=reason)
        store.write_state(state)
    _log.error("version %s (slot %s) failed: %s", pending.version, slot, reason)
    return True


def slot_env(
    store: SlotStore, slot: SlotName, state_dir: Path, environ: Mapping[str, str]
) -> dict[str, str]:
    """The environment of the slot's agent: ``EDGE_AGENT_SLOT``, the slot's models first on
    ``EDGE_AGENT_MODEL_PATH``, ``STATE_DIRECTORY`` = the launcher's state directory."""
    env = dict(environ)
    env[SLOT_ENV] = slot
    models = str(store.models_dir(slot))
    inherited = env.get(MODEL_PATH_ENV, "")
    env[MODEL_PATH_ENV] = models + (os.pathsep + inherited if inherited else "")
    env["STATE_DIRECTORY"] = str(state_dir)
    return env


def exec_slot(
    store: SlotStore,
    slot: SlotName,
    *,
    state_dir: Path,
    config_path: Path | None,
    run_args: Sequence[str],
    global_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> NoReturn:
    """Replace this process with the slot's agent (``edge-agent run``)."""
    record = store.installed(slot)
    if record is None:
        raise BundleError(f"slot {slot} is not installed (no INSTALLED) — a bug in select()")
    config = store.config_file(slot) if record.config else config_path
    if record.venv:
        # the venv's python runs the venv's script: its #! line (an absolute path fixed when
        # the venv was made) is not relied on, so a moved or restored state dir still works
        program = str(store.venv_dir(slot) / "bin" / "python")
        argv = [program, str(store.venv_dir(slot) / "bin" / "edge-agent"), *global_args, "run"]
    else:
        program = sys.executable
        argv = [program, "-m", "agent", *global_args, "run"]
    if config is not None:
        argv += ["--config", str(config)]
    argv += list(run_args)
    env = slot_env(store, slot, state_dir, os.environ if environ is None else environ)
    _log.info("starting version %s from slot %s: %s", record.version, slot, " ".join(argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        os.execve(program, argv, env)  # noqa: S606 - argv is ours, no shell
    except OSError as exc:
        raise BundleError(
            f"cannot start the agent of slot {slot} ({program}: {exc.strerror})"
        ) from exc
