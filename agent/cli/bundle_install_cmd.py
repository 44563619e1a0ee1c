"""`edge-agent bundle install|status|rollback`: install a signed bundle into the inactive slot,
show the slots and the boot state, go back to the previous version.

``register(group)`` adds the three sub-commands to the ``bundle`` group that
``agent.cli.bundle_cmd`` creates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.bundle_config import BundlesConfig
from agent.bundles.install import CRASH_POINT_ENV, Installer
from agent.bundles.slots import SLOT_NAMES, SlotStore
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig
from agent.configfile import load_config, resolve_config_path
from agent.defaults import default_config
from agent.errors import BundleError
from agent.process import agent_version, resolve_state_dir

__all__ = ["register"]

_WAIT_POLL_S = 0.5
_WAIT_MARGIN_S = 60.0
_SYSTEMCTL_TIMEOUT_S = 120.0
_DOWNLOAD_TIMEOUT_S = 60.0


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
    from agent.bundles.target import detect_target  # noqa: PLC0415

    config, state_dir = _load(args)
    bundles = config.bundles
    store = SlotStore(state_dir)
    source: str = args.source
    downloaded: Path | None = None
    if source.lower().startswith(("http://", "https://")):
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
        result = installer.install(path, allow_downgrade=args.allow_downgrade)
    finally:
        if downloaded is not None:  # installed or refused: a verified-once copy is no use
            downloaded.unlink(missing_ok=True)
    was = result.previous_version or "the factory install"
    print(f"installed version {result.version} into slot {result.slot} (was {was})")
    if args.no_restart:
        print("not restarted (--no-restart): the new version boots at the next start")
        return 0
    _restart(bundles)
    if args.wait:
        return _wait(store, result.version, bundles)
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
    store = SlotStore(state_dir)
    target = manual_rollback(store)
    print(f"rolled back: current is now {target or 'the factory install'}")
    if not args.no_restart:
        _restart(config.bundles)
    return 0
