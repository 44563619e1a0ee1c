"""A/B slots under ``<state_dir>/bundles/`` and the durable boot state (``state.json``).

Layout (see docs/bundles.md)::

    install.lock        flock(LOCK_EX|LOCK_NB) held by an install; held -> BundleBusyError
    downloads/          URL installs (agent.bundles.download)
    slots/a/ slots/b/   manifest.json, manifest.sig, files/<payload>, venv/, INSTALLED (last)
    current -> slots/a  symlink: what boots; absent = the factory install
    state.json          BootState: committed / previous / pending (attempts) / bad versions

Every write here is crash-safe on its own: ``state.json`` goes through a temporary file, fsync,
rename and an fsync of the folder; ``current`` is switched by renaming a temporary symlink over
it (``rename(2)`` is atomic) and fsyncing the folder. A slot without ``INSTALLED`` is garbage
and is wiped before reuse.

Everything here is created and written by the state directory's owner: ``bundle install`` /
``bundle rollback`` run by root for a service with ``User=edge-agent`` do their work in a child
process running as that user (``agent.cli.bundle_install_cmd``), so no root process ever
writes, reads code from, or runs anything under ``bundles/`` (the service's user could swap a
folder there under it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from packaging.version import InvalidVersion, Version
from pydantic import ConfigDict, Field, ValidationError

from agent.errors import BundleBusyError, BundleError
from engines.configbase import StrictModel
from engines.fetch import atomic_write_bytes, fsync_dir, hash_file

__all__ = [
    "HISTORY_LIMIT",
    "SLOT_NAMES",
    "BadVersion",
    "BootState",
    "HistoryEvent",
    "InstalledRecord",
    "Pending",
    "SlotName",
    "SlotRef",
    "SlotStore",
    "newest_version",
    "other_slot",
    "parse_slot",
]

_log = logging.getLogger(__name__)

SlotName = Literal["a", "b"]
SLOT_NAMES: tuple[SlotName, SlotName] = ("a", "b")
HISTORY_LIMIT = 20
"""Events kept in ``BootState.history`` (the oldest are dropped)."""

INSTALLED_FILE = "INSTALLED"
_CURRENT_TMP = ".current.tmp"
_LOCK_POLL_S = 0.2
_MAX_STATE_BYTES = 4 << 20


def parse_slot(text: str | None) -> SlotName | None:
    """``"a"`` / ``"b"`` as a SlotName; None for anything else."""
    if text == "a":
        return "a"
    if text == "b":
        return "b"
    return None


def newest_version(*versions: str | None) -> str | None:
    """The highest of ``versions`` by PEP 440 (None ignored; an unparsable one wins, so the
    downgrade check reports it instead of passing silently)."""
    known = [v for v in versions if v is not None]
    if not known:
        return None
    try:
        return max(known, key=Version)
    except InvalidVersion:
        return next(v for v in known if not _is_version(v))


def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


def other_slot(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"


class SlotRef(StrictModel):
    slot: SlotName = Field(description="Slot folder under bundles/slots/ (a or b).")
    version: str = Field(description="Bundle version installed in that slot.")


class Pending(StrictModel):
    slot: SlotName = Field(description="Slot of the version on trial.")
    version: str = Field(description="Bundle version on trial.")
    attempts: int = Field(default=0, ge=0, description="Boots of this version so far.")
    first_boot_at: float | None = Field(
        default=None, description="Epoch seconds of its first boot (the health time starts)."
    )
    failed: str | None = Field(
        default=None, description="Why the version failed its gate/start; the next boot rolls back."
    )


class BadVersion(StrictModel):
    version: str = Field(description="A bundle version that was rolled back.")
    reason: str = Field(description="Why it was rolled back.")
    at: float = Field(description="Epoch seconds of the rollback.")


class HistoryEvent(StrictModel):
    at: float = Field(description="Epoch seconds of the event.")
    event: str = Field(description="installed, boot, committed, failed, rolled_back, ...")
    version: str | None = Field(default=None, description="Bundle version concerned.")
    slot: SlotName | None = Field(default=None, description="Slot concerned.")
    detail: str | None = Field(default=None, description="Free text (reason, attempt number).")


class BootState(StrictModel):
    # fields a newer agent adds are kept, not refused: the launcher (the factory install) and
    # an older slot's agent read and rewrite the file a newer version wrote
    model_config = ConfigDict(extra="allow", validate_default=True, str_strip_whitespace=True)

    committed: SlotRef | None = Field(
        default=None, description="The version that passed its health gate (null: factory)."
    )
    highest_committed: str | None = Field(
        default=None,
        description="The highest version ever committed here (kept through rollbacks, also to "
        "the factory install): an install must be newer unless downgrades are allowed. Absent "
        "in a state.json written before it existed (then committed / current count).",
    )
    previous: SlotRef | None = Field(
        default=None, description="The committed version before it (rollback target)."
    )
    pending: Pending | None = Field(
        default=None, description="A newly installed version on trial, if any."
    )
    bad_versions: list[BadVersion] = Field(
        default_factory=list, description="Versions rolled back, with the reason."
    )
    history: list[HistoryEvent] = Field(
        default_factory=list, description=f"The last {HISTORY_LIMIT} events."
    )

    def record(
        self,
        event: str,
        *,
        version: str | None = None,
        slot: SlotName | None = None,
        detail: str | None = None,
    ) -> None:
        """Append an event to ``history`` (keeping the last ``HISTORY_LIMIT``)."""
        self.history.append(
            HistoryEvent(at=time.time(), event=event, version=version, slot=slot, detail=detail)
        )
        del self.history[:-HISTORY_LIMIT]

    def note_committed(self) -> None:
        """Raise ``highest_committed`` to ``committed`` when that is higher (called wherever
        ``committed`` is set or left: commit, install, manual rollback)."""
        if self.committed is not None:
            self.highest_committed = newest_version(self.highest_committed, self.committed.version)


class InstalledRecord(StrictModel):
    name: str = Field(description="Bundle name.")
    version: str = Field(description="Bundle version.")
    agent_version: str | None = Field(description="Version of the edge_agent wheel inside.")
    venv: bool = Field(description="The slot has a venv/ with the bundle's wheels.")
    config: bool = Field(description="The slot has files/config/agent.toml.")
    installed_at: float = Field(description="Epoch seconds when the install finished.")


class SlotStore:
    """The ``bundles/`` folder of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "bundles"

    # ------------------------------------------------------------------ paths
    @property
    def lock_path(self) -> Path:
        return self.root / "install.lock"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    def slot_dir(self, slot: SlotName) -> Path:
        return self.root / "slots" / slot

    def files_dir(self, slot: SlotName) -> Path:
        return self.slot_dir(slot) / "files"

    def venv_dir(self, slot: SlotName) -> Path:
        return self.slot_dir(slot) / "venv"

    def config_file(self, slot: SlotName) -> Path:
        return self.files_dir(slot) / "config" / "agent.toml"

    def models_dir(self, slot: SlotName) -> Path:
        return self.files_dir(slot) / "models"

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, wait_s: float = 0.0) -> Iterator[None]:
        """Hold ``install.lock`` (the kernel releases it if we die); still held by another
        process after ``wait_s`` (0: at once) -> BundleBusyError."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.refuse_links(self.root)
        try:
            # never through a symlink: run as root, a link planted in the service user's
            # state directory must not make us create or lock a file elsewhere
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise BundleError(
                f"cannot open {self.lock_path} ({exc.strerror}); it must be a regular file — "
                "remove it"
            ) from exc
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise BundleBusyError(
                            f"another bundle install or rollback is running (lock "
                            f"{self.lock_path} is held); wait for it to finish and try again"
                        ) from exc
                time.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)

    def refuse_links(self, *paths: Path) -> None:
        """BundleError when one of ``paths`` is a symbolic link: the folders an install writes
        in (``bundles/``, ``slots/``, a slot) are never followed elsewhere."""
        for path in paths:
            if path.is_symlink():
                raise BundleError(
                    f"{path} is a symbolic link; bundles/ and its slots must be real folders "
                    "(remove the link)"
                )

    # ------------------------------------------------------------------ current
    def current_slot(self) -> SlotName | None:
        """The slot ``current`` points at, or None (factory install)."""
        try:
            target = str(self.current_link.readlink())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BundleError(
                f"{self.current_link} is not a readable symlink ({exc.strerror}) — remove it to "
                "boot the factory install"
            ) from exc
        name = Path(target).name
        if Path(target).parent != Path("slots") or name not in SLOT_NAMES:
            raise BundleError(
                f"{self.current_link} points at {target!r}, not slots/a or slots/b — remove it to "
                "boot the factory install"
            )
        return "a" if name == "a" else "b"

    def inactive_slot(self) -> SlotName:
        """Where the next install goes: the slot ``current`` does not point at."""
        current = self.current_slot()
        return "a" if current is None else other_slot(current)

    def switch_current(self, slot: SlotName | None) -> None:
        """Point ``current`` at ``slot`` atomically (None: remove it, back to factory)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if slot is None:
            with contextlib.suppress(FileNotFoundError):
                self.current_link.unlink()
        else:
            tmp = self.root / _CURRENT_TMP
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(f"slots/{slot}")
            tmp.replace(self.current_link)  # rename(2): atomic
        fsync_dir(self.root)

    # ------------------------------------------------------------------ slots
    def installed(self, slot: SlotName) -> InstalledRecord | None:
        """The slot's INSTALLED record; None when it has none (garbage) or it is unreadable."""
        path = self.slot_dir(slot) / INSTALLED_FILE
        try:
            return InstalledRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            _log.warning("slot %s: unreadable %s (%s): treated as not installed", slot, path, exc)
            return None

    def mark_installed(self, slot: SlotName, record: InstalledRecord) -> None:
        """Write INSTALLED last: from now on the slot is complete."""
        data = record.model_dump_json(indent=2).encode() + b"\n"
        atomic_write_bytes(self.slot_dir(slot) / INSTALLED_FILE, data)

    def wipe(self, slot: SlotName) -> None:
        """Remove everything in ``slot`` (never the one ``current`` points at) and create it
        again, empty, as a new folder of ours (a symlink found there is removed, not
        followed; one planted after this cannot take the folder's place)."""
        if slot == self.current_slot():
            raise BundleError(f"refusing to wipe slot {slot}: it is the active slot — a bug")
        folder = self.slot_dir(slot)
        self.refuse_links(self.root, folder.parent)
        try:
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                folder.unlink()
            elif folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
            fsync_dir(folder.parent)
        except OSError as exc:
            raise BundleError(
                f"cannot empty slot {slot} ({folder}): {exc.strerror or exc}"
            ) from exc

    def slot_problems(self, slot: SlotName) -> list[str]:
        """Files of the slot that do not match its manifest.json (size, sha256); [] = intact."""
        manifest = self.slot_dir(slot) / "manifest.json"
        try:
            entries = json.loads(manifest.read_bytes())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"{manifest}: unreadable ({exc})"]
        problems: list[str] = []
        for entry in entries:
            path = self.files_dir(slot) / entry["path"]
            try:
                size = path.stat().st_size
                digest = hash_file(path).hexdigest()
            except OSError as exc:
                problems.append(f"{entry['path']}: {exc.strerror}")
                continue
            if size != entry["size"] or digest != entry["sha256"]:
                problems.append(f"{entry['path']}: size/sha256 differ from the manifest")
        return problems

    # ------------------------------------------------------------------ state.json
    def read_state(self) -> BootState:
        """The boot state (empty when there is no state.json yet)."""
        try:
            raw = self._read_regular(self.state_path, _MAX_STATE_BYTES)
        except FileNotFoundError:
            return BootState()
        except OSError as exc:
            raise BundleError(
                f"{self.state_path} is unreadable: {exc.strerror or exc} — it must be a regular "
                "file (remove it to boot what `current` points at)"
            ) from exc
        try:
            return BootState.model_validate_json(raw)
        except ValidationError as exc:
            raise BundleError(
                f"{self.state_path} is not a valid boot state ({exc.error_count()} problem(s)) — "
                "it is only written atomically, so the disk or a manual edit broke it; remove it "
                "to boot what `current` points at"
            ) from exc

    @staticmethod
    def _read_regular(path: Path, limit: int) -> bytes:
        """A regular file's bytes (at most ``limit``), never through a link, never blocking
        on a FIFO: root reads state.json (``bundle status``, ``--wait``) in the service
        user's folder."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"over {limit} bytes")
        return data

    def write_state(self, state: BootState) -> None:
        """Write ``state.json`` atomically and durably (tmp + fsync + rename + fsync dir)."""
        data = state.model_dump_json(indent=2).encode() + b"\n"
        atomic_write_bytes(self.state_path, data, prefix=".state-")
