"""`edge-agent bundle install|status|rollback`: install a signed bundle into the inactive slot,
show the slots and the boot state, go back to the previous version.

``register(group)`` adds the three sub-commands to the ``bundle`` group that
``agent.cli.bundle_cmd`` creates.

Privilege separation: run as root for a state directory that belongs to another user (the
service's ``User=edge-agent``), ``install`` and ``rollback`` do their work — download, verify,
extract, venv, pip, config check, pre-install hook, switch; the rollback's bookkeeping — in a
child process running as that user (``subprocess`` with ``user=``, ``group=``,
``extra_groups=[]``, a minimal environment). That user may rename anything under ``bundles/``
at any time, so a root process must never run (or read code from) what lies there. The bundle
file is opened by root and inherited as a file descriptor, so a bundle only root may read still
installs. The root parent keeps only ``systemctl restart`` and the ``--wait`` polling (which
reads state.json without following links). The child's progress and its one-line error reach
the user on stderr unchanged; its exit status is the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from pydantic import Field, ValidationError

from agent.bundle_config import BundlesConfig
from agent.bundles.install import CRASH_POINT_ENV, Installer, InstallResult
from agent.bundles.slots import SLOT_NAMES, SlotName, SlotStore
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig
from agent.configfile import load_config, resolve_config_path
from agent.defaults import default_config
from agent.errors import BundleError, reason_code
from agent.process import agent_version, resolve_state_dir
from engines.configbase import StrictModel

__all__ = ["Owner", "child_main", "register", "state_dir_owner"]

_R = TypeVar("_R", bound=StrictModel)

_WAIT_POLL_S = 0.5
_WAIT_MARGIN_S = 60.0
_SYSTEMCTL_TIMEOUT_S = 120.0
_DOWNLOAD_TIMEOUT_S = 60.0
_CHILD_STOP_S = 30.0
_CHILD_UMASK = 0o022
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHILD_ENV_KEEP = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    # a URL install downloads in the child: proxies and CA bundles
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    CRASH_POINT_ENV,  # tests only: read by the child's installer
)
# the child: the installed agent (-I: no PYTHON* variables, no current folder on sys.path);
# an agent that cannot even load as that user is still one line
_CHILD_CODE = """import sys
try:
    from agent.cli.bundle_install_cmd import child_main
except Exception as exc:
    print(f"edge-agent: error [bundle_invalid]: the agent cannot load as the state "
          f"directory's owner ({exc}); its code must be readable by that user", file=sys.stderr)
    sys.exit(1)
sys.exit(child_main())
"""


def register(group: Any) -> None:
    """Add ``install``, ``status`` and ``rollback`` to the ``bundle`` sub-parser group."""
    fmt = argparse.RawDescriptionHelpFormatter
    install = group.add_parser(
        "install",
        help="install a signed bundle into the inactive slot and restart the agent",
        description="Verify FILE's signature against bundles.trusted_keys_dir before anything "
        "else, check it fits this device and is newer than the installed version, extract it "
        "into the inactive A/B slot (each file's size and sha256 checked), create the slot's "
        "virtual environment from the bundle's wheels, validate the bundle's config with the "
        "new code, run its pre-install check, then switch `current` to the slot atomically and "
        "restart the service. The new version must pass its health gate (READY + self-test "
        "within bundles.health_timeout_s), else the previous slot comes back by itself. "
        "An http(s):// URL is downloaded first (resumable, bundles.max_download_bytes).",
        epilog="Example:\n"
        "  edge-agent bundle install street-counter-1.5.0.bundle --wait\n"
        "  edge-agent bundle install https://updates.example.com/street-counter-1.5.0.bundle",
        formatter_class=fmt,
    )
    install.add_argument("source", metavar="FILE|URL", help="bundle file or http(s):// URL")
    install.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="install even if the bundle is not newer than the installed version",
    )
    install.add_argument(
        "--no-restart",
        action="store_true",
        help="do not restart the service (the new slot boots at the next start)",
    )
    install.add_argument(
        "--wait",
        action="store_true",
        help="after the restart, wait until the new version is committed or rolled back",
    )
    _config_option(install)
    install.set_defaults(func=_install)

    status = group.add_parser(
        "status",
        help="show the slots, the committed / pending version and the boot history",
        description="Show what `current` points at, each slot's installed version, the "
        "committed, previous and pending (on trial) versions, the versions rolled back and the "
        "last events, from <state_dir>/bundles/.",
        epilog="Example:\n  edge-agent bundle status --json",
        formatter_class=fmt,
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    _config_option(status)
    status.set_defaults(func=_status)

    rollback = group.add_parser(
        "rollback",
        help="go back to the previous version and restart the agent",
        description="Point `current` back at the previous slot (a version on trial: the "
        "committed one; else the previous committed one, or the factory install) and restart "
        "the service. A version on trial that is rolled back is recorded as bad.",
        epilog="Example:\n  edge-agent bundle rollback",
        formatter_class=fmt,
    )
    rollback.add_argument("--no-restart", action="store_true", help="do not restart the service")
    _config_option(rollback)
    rollback.set_defaults(func=_rollback)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"agent config for the state directory and [bundles] (default: {DEFAULT_CONFIG_PATH} "
        "if present, else built-in defaults)",
    )


def _load(args: argparse.Namespace) -> tuple[AgentConfig, Path]:
    path = resolve_config_path(args.config)
    config = default_config() if path is None else load_config(path)
    return config, resolve_state_dir(config, os.environ)


def _progress(fraction: float, message: str) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)


def _install(args: argparse.Namespace) -> int:
    config, state_dir = _load(args)
    bundles = config.bundles
    store = SlotStore(state_dir)
    source: str = args.source
    owner = state_dir_owner(state_dir)
    result: InstallResult | int
    if owner is None:
        result = _run_install(
            bundles, state_dir, source, allow_downgrade=args.allow_downgrade, file=None
        )
    else:
        result = _install_as(owner, args, bundles, state_dir)
    if isinstance(result, int):
        return result  # the child printed its one-line error
    was = result.previous_version or "the factory install"
    print(f"installed version {result.version} into slot {result.slot} (was {was})")
    if args.no_restart:
        print("not restarted (--no-restart): the new version boots at the next start")
        return 0
    _restart(bundles)
    if args.wait:
        return _wait(store, result.version, bundles)
    return 0


def _run_install(
    bundles: BundlesConfig,
    state_dir: Path,
    source: str,
    *,
    allow_downgrade: bool,
    file: BinaryIO | None,
) -> InstallResult:
    """Download (a URL) and install, in this process, as whoever we are."""
    from agent.bundles.target import detect_target  # noqa: PLC0415

    store = SlotStore(state_dir)
    downloaded: Path | None = None
    if file is not None:
        path = Path(source)
    elif _is_url(source):
        downloaded = _download(source, store, bundles)
        path = downloaded
    else:
        path = Path(source)
        if not path.is_file():
            raise BundleError(f"bundle file {path} not found — give a .bundle file or a URL")
    installer = Installer(
        bundles,
        state_dir,
        agent_version=agent_version(),
        target=detect_target(),
        progress=_progress,
        crash_at=os.environ.get(CRASH_POINT_ENV) or None,
    )
    try:
        return installer.install(path, allow_downgrade=allow_downgrade, file=file)
    finally:
        if downloaded is not None:  # installed or refused: a verified-once copy is no use
            downloaded.unlink(missing_ok=True)


def _is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


# ---------------------------------------------------------------------- privilege separation
@dataclass(frozen=True)
class Owner:
    """The user a root ``bundle install`` / ``rollback`` does its work as."""

    uid: int
    gid: int
    name: str
    home: str


def state_dir_owner(state_dir: Path) -> Owner | None:
    """The owner of ``bundles/`` (else of the state directory) when we run as root and that is
    another user; None otherwise (then this process does the work itself)."""
    if os.geteuid() != 0:
        return None
    for folder, follow in ((state_dir / "bundles", False), (state_dir, True)):
        try:
            info = folder.stat(follow_symlinks=follow)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BundleError(f"cannot inspect {folder}: {exc.strerror}") from exc
        if info.st_uid == 0:
            continue
        try:
            entry = pwd.getpwuid(info.st_uid)
        except KeyError:  # no such user any more: its ids still are who may write there
            return Owner(info.st_uid, info.st_gid, f"uid {info.st_uid}", "/")
        return Owner(info.st_uid, entry.pw_gid, entry.pw_name, entry.pw_dir or "/")
    return None


class _ChildJob(StrictModel):
    """What the root parent hands the child (on its stdin, JSON)."""

    action: Literal["install", "rollback"] = Field(description="What the child does.")
    state_dir: str = Field(description="The resolved state directory.")
    bundles: BundlesConfig = Field(description="The [bundles] section of the parent's config.")
    source: str = Field(default="", description="Bundle path (names the fd) or URL.")
    fd: int | None = Field(default=None, description="The bundle opened by root, inherited.")
    allow_downgrade: bool = Field(default=False, description="--allow-downgrade.")
    debug: bool = Field(default=False, description="--debug: tracebacks on failure.")


class _InstallReply(StrictModel):
    slot: SlotName = Field(description="Slot installed into.")
    version: str = Field(description="Version installed.")
    previous_version: str | None = Field(description="Version current pointed at before.")


class _RollbackReply(StrictModel):
    target: SlotName | None = Field(description="Slot current points at now (null: factory).")


def _child_env(owner: Owner) -> dict[str, str]:
    env = {k: os.environ[k] for k in _CHILD_ENV_KEEP if k in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update(HOME=owner.home, USER=owner.name, LOGNAME=owner.name, PYTHONUNBUFFERED="1")
    return env


def _run_as(owner: Owner, job: _ChildJob, pass_fds: tuple[int, ...] = ()) -> str | int:
    """Run ``job`` in a child process as ``owner``: its stdout (the reply) when it succeeded,
    else its exit status (it printed its one-line error on our stderr)."""
    cmd = [sys.executable, "-I", "-c", _CHILD_CODE]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # progress and the error line go straight to the user
            env=_child_env(owner),
            cwd="/",
            user=owner.uid,
            group=owner.gid,
            extra_groups=[],
            umask=_CHILD_UMASK,
            pass_fds=pass_fds,
            text=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BundleError(
            f"cannot start the {job.action} as {owner.name} (uid {owner.uid}), the owner of the "
            f"state directory {job.state_dir}: {exc}"
        ) from exc
    try:
        out, _ = proc.communicate(job.model_dump_json())
    except BaseException:  # Ctrl-C reached the child too: let it stop, then make sure
        try:
            proc.wait(_CHILD_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise BundleError(
            f"the {job.action}, run as {owner.name} (uid {owner.uid}), was killed by {sig} before "
            "it finished; every step is safe to interrupt — see `edge-agent bundle status` and "
            "run it again"
        )
    if proc.returncode != 0:
        return proc.returncode
    return out


def _install_as(
    owner: Owner, args: argparse.Namespace, bundles: BundlesConfig, state_dir: Path
) -> InstallResult | int:
    source: str = args.source
    job = _ChildJob(
        action="install",
        state_dir=str(state_dir),
        bundles=bundles,
        source=source,
        allow_downgrade=args.allow_downgrade,
        debug=bool(getattr(args, "debug", False)),
    )
    if _is_url(source):
        reply = _run_as(owner, job)
    else:
        with _open_as_root(Path(source)) as bundle:
            fd = bundle.fileno()
            reply = _run_as(owner, job.model_copy(update={"fd": fd}), pass_fds=(fd,))
    if isinstance(reply, int):
        return reply
    data = _parse_reply(_InstallReply, reply, job.action)
    return InstallResult(
        slot=data.slot, version=data.version, previous_version=data.previous_version
    )


def _open_as_root(path: Path) -> BinaryIO:
    """The bundle file, opened here (root may read what the service's user may not)."""
    try:
        bundle = path.open("rb")
    except FileNotFoundError as exc:
        raise BundleError(f"bundle file {path} not found — give a .bundle file or a URL") from exc
    except OSError as exc:
        raise BundleError(f"cannot open bundle file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(bundle.fileno()).st_mode):
        bundle.close()
        raise BundleError(f"bundle file {path} is not a regular file — give a .bundle file")
    return bundle


def _parse_reply(model: type[_R], text: str, action: str) -> _R:
    lines = text.strip().splitlines()
    try:
        return model.model_validate_json(lines[-1] if lines else "")
    except ValidationError as exc:
        raise BundleError(
            f"the {action} process succeeded but its reply is unreadable ({exc.error_count()} "
            "problem(s)) — see `edge-agent bundle status`"
        ) from exc


def child_main() -> int:
    """The child of a root ``bundle install`` / ``rollback``: run the job on stdin as the
    user we were started as; the reply (JSON) on stdout, progress and one error line on
    stderr."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    debug = False
    try:
        job = _ChildJob.model_validate_json(sys.stdin.read())
        debug = job.debug
        state_dir = Path(job.state_dir)
        if job.action == "rollback":
            from agent.bundles.boot import manual_rollback  # noqa: PLC0415

            reply: StrictModel = _RollbackReply(target=manual_rollback(SlotStore(state_dir)))
        else:
            with contextlib.ExitStack() as stack:
                file = None if job.fd is None else stack.enter_context(os.fdopen(job.fd, "rb"))
                result = _run_install(
                    job.bundles,
                    state_dir,
                    job.source,
                    allow_downgrade=job.allow_downgrade,
                    file=file,
                )
            reply = _InstallReply(
                slot=result.slot,
                version=result.version,
                previous_version=result.previous_version,
            )
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is one line, like the CLI's
        if debug:
            traceback.print_exc()
        print(f"edge-agent: error [{reason_code(exc)}]: {exc}", file=sys.stderr, flush=True)
        return 1
    print(reply.model_dump_json(), flush=True)
    return 0


def _download(url: str, store: SlotStore, bundles: BundlesConfig) -> Path:
    from agent.bundles.download import download_bundle  # noqa: PLC0415

    def progress(done: int, total: int | None) -> None:
        if total:
            _progress(done / total, f"downloading {url}: {done}/{total} bytes")
        else:
            _progress(0.0, f"downloading {url}: {done} bytes")

    return download_bundle(
        url,
        store.downloads_dir,
        max_bytes=bundles.max_download_bytes,
        timeout=_DOWNLOAD_TIMEOUT_S,
        progress=progress,
    )


def _restart(bundles: BundlesConfig) -> None:
    unit = bundles.service_unit
    print(f"restarting {unit}", file=sys.stderr)
    try:
        proc = subprocess.run(
            ["systemctl", "restart", unit],
            capture_output=True,
            text=True,
            timeout=_SYSTEMCTL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundleError(
            f"cannot restart {unit} ({exc}); the new version boots at the next start — restart "
            "it yourself"
        ) from exc
    if proc.returncode != 0:
        raise BundleError(
            f"`systemctl restart {unit}` exited {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()} — the new version boots at the next "
            "start (bundles.service_unit names the unit)"
        )


def _wait(store: SlotStore, version: str, bundles: BundlesConfig) -> int:
    """Poll state.json until ``version`` is committed or rolled back; 0 committed, 1 not."""
    budget = bundles.health_timeout_s + _WAIT_MARGIN_S
    deadline = time.monotonic() + budget
    print(f"waiting up to {budget:.0f} s for version {version}'s health gate", file=sys.stderr)
    while time.monotonic() < deadline:
        state = store.read_state()
        if state.pending is None or state.pending.version != version:
            if state.committed is not None and state.committed.version == version:
                print(f"version {version} committed (slot {state.committed.slot})")
                return 0
            bad = [b for b in state.bad_versions if b.version == version]
            if bad:
                print(f"version {version} rolled back: {bad[-1].reason}")
                return 1
        time.sleep(_WAIT_POLL_S)
    print(
        f"version {version} neither committed nor rolled back within {budget:.0f} s — see "
        "`edge-agent bundle status` and the service's journal"
    )
    return 1


def _status(args: argparse.Namespace) -> int:
    _config, state_dir = _load(args)
    store = SlotStore(state_dir)
    data = status_data(store)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"bundles:   {store.root}")
    print(f"current:   {data['current'] or 'factory install'}")
    for slot, info in data["slots"].items():
        text = "empty" if info is None else f"{info['name']} {info['version']}"
        print(f"slot {slot}:    {text}")
    state: dict[str, Any] = data["state"]
    for key in ("committed", "previous"):
        ref = state[key]
        text = "-" if ref is None else f"{ref['version']} (slot {ref['slot']})"
        print(f"{key + ':':<10} {text}")
    pending = state["pending"]
    if pending is None:
        print("pending:   -")
    else:
        failed = f", failed: {pending['failed']}" if pending["failed"] else ""
        print(
            f"pending:   {pending['version']} (slot {pending['slot']}, boot attempts "
            f"{pending['attempts']}{failed})"
        )
    for bad in state["bad_versions"]:
        print(f"bad:       {bad['version']}: {bad['reason']}")
    for event in state["history"][-5:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
        what = " ".join(str(event[k]) for k in ("version", "detail") if event[k])
        print(f"event:     {when} {event['event']} {what}".rstrip())
    return 0


def status_data(store: SlotStore) -> dict[str, Any]:
    """``bundle status --json``: current slot, each slot's INSTALLED record, state.json."""
    state = store.read_state()
    slots: dict[str, Any] = {}
    for slot in SLOT_NAMES:
        record = store.installed(slot)
        slots[slot] = None if record is None else record.model_dump(mode="json")
    return {
        "bundles_dir": str(store.root),
        "current": store.current_slot(),
        "slots": slots,
        "state": state.model_dump(mode="json"),
    }


def _rollback(args: argparse.Namespace) -> int:
    from agent.bundles.boot import manual_rollback  # noqa: PLC0415

    config, state_dir = _load(args)
    owner = state_dir_owner(state_dir)
    if owner is None:
        target = manual_rollback(SlotStore(state_dir))
    else:
        job = _ChildJob(
            action="rollback",
            state_dir=str(state_dir),
            bundles=config.bundles,
            debug=bool(getattr(args, "debug", False)),
        )
        reply = _run_as(owner, job)
        if isinstance(reply, int):
            return reply
        target = _parse_reply(_RollbackReply, reply, job.action).target
    print(f"rolled back: current is now {target or 'the factory install'}")
    if not args.no_restart:
        _restart(config.bundles)
    return 0
