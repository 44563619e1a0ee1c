"""The MQTT command ``bundle.install``: a signed bundle from a URL or a file on the device.

    command          class     long  args                                   does
    bundle.install   critical  yes   url | path [, allow_downgrade]         download (url), verify,
                                                                            extract, venv, switch;
                                                                            then exit 75 (restart)

``register_bundle_commands(registry, agent)`` is called by ``agent.control``. The handler runs on
the dispatcher's long-command thread: progress replies name the phase (``download``, then the
installer's ``verifying``, ``extracting``/``extracted``, virtual environment, wheels, config,
``installed ... into slot X``) with a fraction that only grows; at most one reply per 2 % step
or phase change, so a large bundle does not flood the broker. The terminal reply's result is
``{"slot", "version", "previous_version", "restarting": true}``; the agent then stops
gracefully and exits 75 (``Agent.request_restart``) so that systemd starts it again and the
launcher boots the new slot, on trial until its health gate commits it.

A second ``bundle.install`` while one runs (the dispatcher answers it: the same long command is
running), or while ``edge-agent bundle install`` holds the slots' lock, or while a version is
still on trial, answers status ``busy``, reason ``busy``. Every other
failure answers ``failed`` with the bundle error's reason code (``bundle_signature_invalid``,
``bundle_download_failed``, ``bundle_downgrade``, ...); nothing is switched and the agent keeps
running. An agent already stopping answers ``agent_stopping``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from agent.commands.registry import CommandContext, CommandError, CommandRegistry, CommandSpec
from agent.errors import BundleBusyError, BundleError
from engines.configbase import StrictModel

if TYPE_CHECKING:
    from agent.process import Agent

__all__ = ["BundleInstallArgs", "ProgressRelay", "register_bundle_commands"]

_log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0
"""Socket timeout of a URL install's HTTP requests (each read; retried, resumable)."""

_DOWNLOAD_SHARE = 0.3  # fraction of the command's progress given to the download
_STEP = 0.02


class BundleInstallArgs(StrictModel):
    """Exactly one of ``url`` and ``path``."""

    url: str | None = Field(
        default=None,
        pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s]+$",
        max_length=2048,
        description="http:// or https:// URL of the bundle: downloaded into the state "
        "directory first (resumable, at most bundles.max_download_bytes).",
    )
    path: str | None = Field(
        default=None,
        pattern=r"^/",
        max_length=4096,
        description="Absolute path of a bundle file already on the device.",
    )
    allow_downgrade: bool = Field(
        default=False,
        description="Install even if the bundle is not newer than the installed version.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BundleInstallArgs:
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url (http/https) and path (a file on the device)")
        return self


class ProgressRelay:
    """Turns download and installer progress into one growing sequence of progress replies.

    The download gets the first 30 % of the fraction (none without a URL), the installer the
    rest. A reply goes out when the first word of the message changes, when the fraction grew
    by 2 % since the last reply, when the download is complete, or at the end; the fraction
    never goes back.
    """

    def __init__(self, send: Callable[[float, str], None], *, download: bool) -> None:
        self._send = send
        self._base = _DOWNLOAD_SHARE if download else 0.0
        self._last_fraction = -1.0
        self._last_word = ""

    def download(self, done: int, total: int | None) -> None:
        if total:
            self._emit(
                _DOWNLOAD_SHARE * min(1.0, done / total),
                f"download {done}/{total} bytes",
                last=done >= total,
            )
        else:
            self._emit(0.0, f"download {done} bytes")

    def install(self, fraction: float, message: str) -> None:
        self._emit(self._base + (1.0 - self._base) * fraction, message)

    def _emit(self, fraction: float, message: str, *, last: bool = False) -> None:
        fraction = max(fraction, self._last_fraction, 0.0)
        word = message.split(" ", 1)[0]
        quiet = word == self._last_word and fraction - self._last_fraction < _STEP
        if quiet and not last and fraction < 1.0:
            return
        self._last_fraction, self._last_word = fraction, word
        self._send(fraction, message)


def register_bundle_commands(registry: CommandRegistry, agent: Agent) -> None:
    """Register ``bundle.install`` (see the module docstring); ``agent`` is only used when the
    command runs."""

    def bundle_install(ctx: CommandContext) -> dict[str, Any]:
        if agent.stop_event.is_set():
            raise CommandError("agent_stopping", "the agent is stopping: bundle.install not done")
        try:
            return _install(agent, ctx.args, ctx.progress)
        except BundleBusyError as exc:
            raise CommandError("busy", str(exc), status="busy") from exc

    registry.register(
        CommandSpec(
            "bundle.install",
            bundle_install,
            "critical",
            "Install a signed firmware bundle (url or path) into the inactive slot, then "
            "restart (exit 75) to boot it on trial.",
            BundleInstallArgs,
            long_running=True,
        )
    )


def _install(
    agent: Agent, args: BundleInstallArgs, send: Callable[[float, str], None]
) -> dict[str, Any]:
    from agent.bundles.install import Installer  # noqa: PLC0415
    from agent.bundles.slots import SlotStore  # noqa: PLC0415
    from agent.bundles.target import detect_target  # noqa: PLC0415

    state_dir = agent.state_dir
    if state_dir is None:
        raise BundleError("bundle.install before the agent opened its state directory")
    config = agent.config.bundles
    store = SlotStore(state_dir)
    relay = ProgressRelay(send, download=args.url is not None)
    downloaded: Path | None = None
    if args.url is not None:
        from agent.bundles.download import download_bundle  # noqa: PLC0415

        _log.info("bundle.install: downloading %s", args.url)
        relay.download(0, None)
        downloaded = download_bundle(
            args.url,
            store.downloads_dir,
            max_bytes=config.max_download_bytes,
            timeout=DOWNLOAD_TIMEOUT_S,
            progress=relay.download,
        )
        bundle = downloaded
    else:
        bundle = Path(args.path or "")
        if not bundle.is_file():
            raise BundleError(f"bundle file {bundle} not found on the device; check the path")
    installer = Installer(
        config,
        state_dir,
        agent_version=agent.version,
        target=detect_target(),
        progress=relay.install,
    )
    try:
        result = installer.install(bundle, allow_downgrade=args.allow_downgrade)
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    _log.warning(
        "bundle.install: version %s installed into slot %s (was %s); restarting to boot it",
        result.version,
        result.slot,
        result.previous_version or "the factory install",
    )
    agent.request_restart(f"bundle.install {result.version} into slot {result.slot}")
    return {
        "slot": result.slot,
        "version": result.version,
        "previous_version": result.previous_version,
        "restarting": True,
    }
