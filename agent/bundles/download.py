"""URL installs: download a bundle over HTTP(S), resumable, size-limited, retried.

:func:`download_bundle` writes into ``<dest_dir>/<sha256(url)[:16]>.bundle.part`` and renames
the finished file to ``<key>.bundle`` (fsync, rename, fsync of the folder). The partial file
survives a dropped connection and a killed process: the next attempt (in the same call, after a
jittered backoff, or a later call, after a reboot) resumes it with an HTTP ``Range`` request.
A ``Content-Length`` over ``max_bytes`` is refused before a byte is written; a body that runs
past ``max_bytes`` is aborted and the partial file removed. Nothing here trusts the file: the
installer verifies the downloaded bundle exactly as a local one (signature first).

The transfer itself is :func:`engines.fetch.http_download` (size unknown, at most
``max_bytes``). Every failure is one :class:`~agent.errors.BundleDownloadError` line (HTTP
status, size limit, no progress); a second process downloading the same URL gets
:class:`~agent.errors.BundleBusyError`, a full disk :class:`~agent.errors.BundleSpaceError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlsplit

from agent.errors import BundleBusyError, BundleDownloadError, BundleSpaceError
from engines import fetch
from engines.errors import DownloadError, DownloadInterruptedError

__all__ = ["DownloadProgress", "download_bundle", "download_paths"]

_log = logging.getLogger(__name__)

DownloadProgress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes)``; total is None while the server has not said."""

_MAX_BACKOFF_S = 30.0


def download_paths(url: str, dest_dir: Path) -> tuple[Path, Path]:
    """The partial and the final file of ``url`` in ``dest_dir`` (``<sha256(url)[:16]>``)."""
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return dest_dir / f"{key}.bundle.part", dest_dir / f"{key}.bundle"


def _retryable(exc: DownloadError) -> bool:
    """A dropped connection, an early end, a network error or a 5xx: worth another attempt."""
    if isinstance(exc, DownloadInterruptedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, HTTPError):
        return cause.code >= 500 or cause.code == 429
    return isinstance(cause, OSError)  # cannot reach the host (URLError is an OSError)


def _no_space(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def download_bundle(
    url: str,
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout: float,
    progress: DownloadProgress | None = None,
    attempts_without_progress: int = 5,
    backoff_s: float = 1.0,
) -> Path:
    """Download ``url`` into ``dest_dir`` and return the finished ``<key>.bundle``.

    Retries within the call while attempts bring new bytes: a dropped connection, a body that
    ends early, a network error or an HTTP 5xx is retried after ``backoff_s * 2**n`` seconds
    (at most 30, times a random 0.5..1 so devices do not retry in step), resuming the partial
    file; after ``attempts_without_progress`` attempts in a row without a new byte it gives up
    (the partial file stays for the next call). A finished file from an earlier call is
    replaced. The caller removes the returned file once it is installed.

    ``bundle install`` run by root for a service with ``User=edge-agent`` calls this in its
    child process running as that user: what it creates belongs to the agent, which can resume
    or reuse it.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise BundleDownloadError(
            f"bundle URL {url!r} is not http:// or https://; give an http(s) URL or a file path"
        )
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleDownloadError(
            f"cannot create the download folder {dest_dir} ({exc.strerror}); check the state "
            "directory's permissions"
        ) from exc
    return _locked_download(
        url,
        dest_dir,
        max_bytes=max_bytes,
        timeout=timeout,
        progress=progress,
        attempts_without_progress=attempts_without_progress,
        backoff_s=backoff_s,
    )


def _locked_download(
    url: str,
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout: float,
    progress: DownloadProgress | None,
    attempts_without_progress: int,
    backoff_s: float,
) -> Path:
    """The download under ``<key>.lock`` (a second process for the same URL: busy)."""
    partial, final = download_paths(url, dest_dir)
    lock_path = partial.with_suffix(".lock")
    _drop_links(dest_dir, lock_path, partial, final)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(fetch.exclusive_lock(lock_path, url))
        except DownloadError as exc:
            raise BundleBusyError(
                f"another process is already downloading {url} (lock {lock_path}); wait for it"
            ) from exc
        except OSError as exc:
            raise BundleDownloadError(
                f"cannot lock {lock_path} ({exc.strerror}); check the state directory's permissions"
            ) from exc
        final.unlink(missing_ok=True)
        _download(
            url,
            partial,
            max_bytes=max_bytes,
            timeout=timeout,
            progress=progress,
            attempts_without_progress=attempts_without_progress,
            backoff_s=backoff_s,
        )
        try:
            fetch.atomic_replace(partial, final)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BundleSpaceError(
                    f"disk full while finishing the download of {url} into {dest_dir}; "
                    "free space and install again"
                ) from exc
            raise BundleDownloadError(
                f"cannot move the downloaded bundle {partial} to {final} ({exc.strerror})"
            ) from exc
    return final


def _drop_links(dest_dir: Path, *paths: Path) -> None:
    """Never write through a symbolic link: run as root in the service user's state directory,
    a link planted as the partial file would have the download appended to its target."""
    if dest_dir.is_symlink():
        raise BundleDownloadError(
            f"download folder {dest_dir} is a symbolic link; it must be a real folder (remove it)"
        )
    for path in paths:
        if path.is_symlink():
            _log.warning("bundle download: %s is a symbolic link, removed (not followed)", path)
            try:
                path.unlink()
            except OSError as exc:
                raise BundleDownloadError(
                    f"cannot remove the symbolic link {path} ({exc.strerror})"
                ) from exc


def _download(
    url: str,
    partial: Path,
    *,
    max_bytes: int,
    timeout: float,
    progress: DownloadProgress | None,
    attempts_without_progress: int,
    backoff_s: float,
) -> None:
    """Attempts of :func:`engines.fetch.http_download` until the file is complete."""
    rng = random.Random()  # noqa: S311 - jitter, not cryptography
    stalled = 0
    moved = False

    def report(done: int, total: int, phase: str) -> None:
        nonlocal moved
        if phase.startswith("check partial"):
            return
        moved = True
        if progress is not None:
            progress(done, total or None)

    while True:
        moved = False
        try:
            fetch.http_download(
                url,
                partial,
                size=None,
                max_bytes=max_bytes,
                timeout=timeout,
                progress=report,
                phase="bundle",
            )
        except OSError as exc:  # reading back the partial file, not the network
            raise BundleDownloadError(
                f"cannot read the partial download {partial} ({exc.strerror}); delete it and "
                "install again"
            ) from exc
        except DownloadError as exc:
            if _no_space(exc):
                raise BundleSpaceError(
                    f"disk full while downloading {url} into {partial.parent}; free space and "
                    "install again (the partial download is kept and resumes)"
                ) from exc
            if not _retryable(exc):
                raise BundleDownloadError(_fatal_message(url, exc, max_bytes)) from exc
            stalled = 0 if moved else stalled + 1
            if stalled >= attempts_without_progress:
                have = partial.stat().st_size if partial.exists() else 0
                raise BundleDownloadError(
                    f"download of {url} made no progress in {stalled} attempts (at byte "
                    f"{have}; last error: {exc}); check the network and install again to resume"
                ) from exc
            delay = min(_MAX_BACKOFF_S, backoff_s * 2 ** max(stalled - 1, 0))
            delay *= rng.uniform(0.5, 1.0)
            _log.warning("bundle download: %s; retrying in %.1f s", exc, delay)
            time.sleep(delay)
            continue
        return


def _fatal_message(url: str, exc: DownloadError, max_bytes: int) -> str:
    cause = exc.__cause__
    if isinstance(cause, HTTPError):
        return f"download of {url} failed: HTTP {cause.code} {cause.reason}; check the URL"
    text = str(exc)
    if f"limit of {max_bytes} bytes" in text:
        return (
            f"bundle download refused: {text}; raise [bundles] max_download_bytes if the "
            "bundle really is that large"
        )
    return f"bundle download failed: {text}"
