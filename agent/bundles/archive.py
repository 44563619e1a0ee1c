"""Writing a bundle file, and the verifying stream reader that installs from it.

A bundle is a PAX tar stream compressed with zstd. Members, in this order: ``manifest.json``,
``manifest.sig`` (absent: unsigned), then ``payload/<path>`` for each manifest file in manifest
order. Only regular files.

Reading (:func:`open_bundle`) is one forward pass, so a bundle is never unpacked twice and a
URL download can be read as it is:

1. the first member must be ``manifest.json`` (at most 4 MiB), the second may be
   ``manifest.sig``; until the signature has verified at most :data:`PRE_VERIFY_LIMIT`
   decompressed bytes are read (a zstd bomb or a giant tar header cannot exhaust memory);
2. :func:`verify_signature` (or ``reader.verify``) checks the signature against the trusted
   keys; nothing can be extracted before;
3. the manifest is parsed and checked (``reader.manifest``), compat / downgrade by the caller;
4. :meth:`BundleReader.extract_to` streams each payload member into the slot: the member must be
   the next manifest entry, a regular file, exactly the declared size; bytes go through a
   sha256 and a counter and the write stops before the first byte past the declared size; each
   file is fsynced, then its size and sha256 compared. A full disk is BundleSpaceError. Only
   files under the destination are created (``O_EXCL | O_NOFOLLOW``; parents are made here).

Every failure is one of the BundleError classes with a one-line reason naming the member.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO

import zstandard

from agent.bundles.manifest import (
    MAX_MANIFEST_BYTES,
    BundleCompat,
    BundleFile,
    BundleManifest,
    check_payload_path,
    manifest_bytes,
    parse_manifest,
    utc_timestamp,
)
from agent.bundles.signing import (
    MAX_SIGNATURE_BYTES,
    BundleSignature,
    SigningKey,
    parse_signature,
    sign_manifest,
    signature_bytes,
    verify_manifest,
)
from agent.commands.signing import TrustedKeys
from agent.errors import (
    BundleContentError,
    BundleError,
    BundleFormatError,
    BundleSignatureError,
    BundleSpaceError,
)
from engines.fetch import CHUNK, fsync_dir, hash_file

__all__ = [
    "MANIFEST_MEMBER",
    "PAYLOAD_PREFIX",
    "PRE_VERIFY_LIMIT",
    "SIGNATURE_MEMBER",
    "BundleProgress",
    "BundleReader",
    "PayloadSource",
    "open_bundle",
    "resign_bundle",
    "verify_signature",
    "write_bundle",
]

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
PAYLOAD_PREFIX = "payload/"
PRE_VERIFY_LIMIT = MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + (1 << 20)
"""Decompressed bytes a reader consumes before the signature has been verified."""
ZSTD_LEVEL = 6
_MEMBER_FRAMING = 16 << 10
"""Tar bytes allowed per payload member besides its content: header, PAX record (long path,
size, mtime), padding to 512 bytes."""
_ARCHIVE_TAIL = 64 << 10
"""End-of-archive blocks, record padding and tarfile's read-ahead."""

BundleProgress = Callable[[float, str], None]
"""``progress(fraction 0..1, message)`` for long steps (the install command's progress)."""

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class PayloadSource:
    """One file to put in a bundle: its payload path and where to read it."""

    path: str
    source: Path


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.isdir():
        return "a directory"
    if member.ischr() or member.isblk():
        return "a device node"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    if not member.isreg():
        return f"an entry of tar type {member.type!r}"
    return "a regular file"


class _ReadOnly(io.RawIOBase):
    """A readable raw stream whose subclasses implement only ``read``."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _LimitedReader(_ReadOnly):
    """Reads from ``raw`` but fails once more than ``limit`` bytes were read (None: no limit)."""

    def __init__(self, raw: IO[bytes], limit: int | None) -> None:
        super().__init__()
        self._raw = raw
        self.limit = limit
        self.consumed = 0
        self.over = (
            f"bundle headers exceed {limit} bytes before the signature is checked: not a "
            "bundle, or a malicious one"
        )

    def read(self, size: int = -1) -> bytes:
        if self.limit is not None:
            left = self.limit - self.consumed
            if left < 0:
                raise BundleFormatError(self.over)
            size = left + 1 if size < 0 else min(size, left + 1)
        data: bytes = self._raw.read(size)
        self.consumed += len(data)
        if self.limit is not None and self.consumed > self.limit:
            raise BundleFormatError(self.over)
        return data


class BundleReader:
    """One forward pass over a bundle file (see the module docstring); use :func:`open_bundle`."""

    def __init__(self, path: Path, file: BinaryIO | None = None) -> None:
        self.path = path
        self._given = file
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._limited: _LimitedReader | None = None
        self._pending: tarfile.TarInfo | None = None
        self._manifest: BundleManifest | None = None
        self._payload_started = False
        self.manifest_bytes = b""
        self.signature: BundleSignature | None = None
        self.key_id: str | None = None
        """The trusted key the signature verified with; None until :meth:`verify`."""

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        if self._given is not None:
            self._file, self._given = self._given, None
        else:
            try:
                self._file = self.path.open("rb")
            except OSError as exc:
                raise BundleFormatError(f"cannot open bundle {self.path}: {exc.strerror}") from exc
        magic = self._file.read(4)
        self._file.seek(0)
        if magic != b"\x28\xb5\x2f\xfd":
            raise BundleFormatError(
                f"{self.path} is not a bundle: not zstd-compressed (build one with "
                "`edge-agent bundle build SPEC`)"
            )
        stream = zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True)
        self._limited = _LimitedReader(stream, PRE_VERIFY_LIMIT)
        try:
            self._tar = tarfile.open(fileobj=self._limited, mode="r|")  # noqa: SIM115
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BundleFormatError(
                f"{self.path} is corrupt or truncated ({exc}): download or build it again"
            ) from exc
        first = self._next()
        if first is None or first.name != MANIFEST_MEMBER:
            name = "nothing" if first is None else repr(first.name)
            raise BundleFormatError(
                f"{self.path}: first member is {name}, expected {MANIFEST_MEMBER}"
            )
        self.manifest_bytes = self._read_small(first, MAX_MANIFEST_BYTES)
        second = self._next()
        if second is not None and second.name == SIGNATURE_MEMBER:
            self.signature = parse_signature(
                self._read_small(second, MAX_SIGNATURE_BYTES), source=f"{self.path}: manifest.sig"
            )
            second = self._next()
        self._pending = second

    def _next(self) -> tarfile.TarInfo | None:
        if self._tar is None:
            raise BundleFormatError(f"{self.path}: bundle is closed")
        try:
            return self._tar.next()
        except BundleError:
            raise
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BundleFormatError(
                f"{self.path}: archive is corrupt or truncated ({exc}); download it again"
            ) from exc

    def _read_small(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if not member.isreg() or member.issparse():
            raise BundleContentError(
                f"{self.path}: {member.name} is {_member_kind(member)}, not a regular file"
            )
        if member.size > limit:
            raise BundleFormatError(
                f"{self.path}: {member.name} is {member.size} bytes, over the {limit} byte limit"
            )
        if self._tar is None:
            raise BundleFormatError(f"{self.path}: bundle is closed")
        try:
            f = self._tar.extractfile(member)
            data = b"" if f is None else f.read()
        except BundleError:
            raise
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BundleFormatError(
                f"{self.path}: archive is corrupt or truncated in {member.name} ({exc})"
            ) from exc
        if len(data) != member.size:
            raise BundleFormatError(f"{self.path}: {member.name} is truncated")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ checks

    @property
    def manifest(self) -> BundleManifest:
        """The parsed manifest (BundleFormatError when invalid); parsed on first use."""
        if self._manifest is None:
            self._manifest = parse_manifest(
                self.manifest_bytes, source=f"{self.path}: manifest.json"
            )
        return self._manifest

    @property
    def verified(self) -> bool:
        return self.key_id is not None

    def trust_for_signing(self, key_id: str) -> None:
        """Let the payload be read without a trusted-key check: only for ``bundle sign``, which
        is about to put its own signature on this manifest (the payload is still checked
        against it member by member)."""
        self.key_id = key_id
        self._limit_to_payload()

    def verify(self, trusted: TrustedKeys) -> str:
        """Check the signature against ``trusted``; the key id. BundleSignatureError if not."""
        self.key_id = verify_manifest(self.manifest_bytes, self.signature, trusted)
        self._limit_to_payload()
        return self.key_id

    def _limit_to_payload(self) -> None:
        """From here on read at most the declared payload plus tar framing: the signature
        covers the manifest, not the tar headers between members, so a giant PAX header (held
        in memory by tarfile) or endless padding in a re-packed signed bundle stops here."""
        if self._limited is None:
            return
        manifest = self.manifest
        framing = (len(manifest.files) + 1) * _MEMBER_FRAMING + _ARCHIVE_TAIL
        self._limited.limit = self._limited.consumed + manifest.total_size + framing
        self._limited.over = (
            f"{self.path}: more than the manifest's {manifest.total_size} payload bytes plus "
            "tar framing: not the signed bundle (re-packed or corrupt)"
        )

    # ------------------------------------------------------------------ payload

    def _payload(self) -> Iterator[tuple[BundleFile, tarfile.TarInfo, IO[bytes]]]:
        """Each manifest entry with its member (checked: next in order, regular file, exact
        size) and a stream of its content; then checks nothing follows."""
        if not self.verified:
            raise BundleSignatureError(
                f"{self.path}: payload read before the signature was verified"
            )
        if self._payload_started:
            raise BundleFormatError(f"{self.path}: payload already read (one pass per open)")
        self._payload_started = True
        manifest = self.manifest
        listed = {entry.path for entry in manifest.files}
        seen: set[str] = set()
        member = self._pending
        for entry in manifest.files:
            if member is None:
                raise BundleContentError(
                    f"{self.path}: payload/{entry.path} is missing (archive ends early: "
                    "truncated or incomplete bundle)"
                )
            self._check_member(member, entry, listed, seen)
            seen.add(entry.path)
            if self._tar is None:
                raise BundleFormatError(f"{self.path}: bundle is closed")
            stream = self._tar.extractfile(member)
            if stream is None:  # not reachable for a regular file; keep mypy and us honest
                raise BundleContentError(f"{self.path}: {member.name} has no content")
            yield entry, member, stream
            member = self._next()
        if member is not None:
            name = member.name
            rel = name[len(PAYLOAD_PREFIX) :] if name.startswith(PAYLOAD_PREFIX) else None
            what = "appears twice" if rel in seen else "is not listed in the manifest"
            raise BundleContentError(f"{self.path}: member {name!r} {what}")

    def _check_member(
        self, member: tarfile.TarInfo, entry: BundleFile, listed: set[str], seen: set[str]
    ) -> None:
        name = member.name
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise BundleContentError(
                f"{self.path}: member {name!r} has an absolute or '..' path (path traversal)"
            )
        if not name.startswith(PAYLOAD_PREFIX):
            raise BundleContentError(
                f"{self.path}: member {name!r} is not listed in the manifest "
                f"(expected payload/{entry.path})"
            )
        rel = name[len(PAYLOAD_PREFIX) :]
        try:
            check_payload_path(rel)
        except ValueError as exc:
            raise BundleContentError(f"{self.path}: member {name!r}: {exc}") from exc
        if not member.isreg() or member.issparse():
            raise BundleContentError(
                f"{self.path}: member {name!r} is {_member_kind(member)}; only regular "
                "files are allowed"
            )
        if rel != entry.path:
            if rel in seen:
                raise BundleContentError(f"{self.path}: member {name!r} appears twice")
            if rel in listed:
                raise BundleContentError(
                    f"{self.path}: member {name!r} is out of order (expected payload/"
                    f"{entry.path} next)"
                )
            raise BundleContentError(f"{self.path}: member {name!r} is not listed in the manifest")
        if member.size != entry.size:
            raise BundleContentError(
                f"{self.path}: payload/{entry.path} is {member.size} bytes but the manifest "
                f"declares {entry.size}"
            )

    def _copy(self, entry: BundleFile, stream: IO[bytes], write: Callable[[bytes], object]) -> None:
        """Stream ``entry``'s bytes into ``write`` through sha256 and a counter; never past the
        declared size; then compare size and sha256."""
        digest = hashlib.sha256()
        done = 0
        while True:
            try:
                chunk = stream.read(CHUNK)
            except BundleError:
                raise
            except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
                raise BundleFormatError(
                    f"{self.path}: archive is corrupt or truncated in payload/{entry.path} "
                    f"({exc}); download it again"
                ) from exc
            if not chunk:
                break
            if done + len(chunk) > entry.size:
                raise BundleContentError(
                    f"{self.path}: payload/{entry.path} has more bytes than the "
                    f"{entry.size} declared; stopped before writing past them"
                )
            digest.update(chunk)
            write(chunk)
            done += len(chunk)
        if done != entry.size:
            raise BundleFormatError(
                f"{self.path}: payload/{entry.path} is truncated ({done} of {entry.size} bytes)"
            )
        if digest.hexdigest() != entry.sha256:
            raise BundleContentError(
                f"{self.path}: payload/{entry.path} sha256 {digest.hexdigest()[:16]}... does "
                f"not match the manifest's {entry.sha256[:16]}... (tampered or corrupt)"
            )

    def extract_to(self, dest: Path, progress: BundleProgress | None = None) -> list[Path]:
        """Write every payload file under ``dest`` (created if missing); the files written.

        Needs :meth:`verify` first. On any error the file being written is removed and the
        error raised; files already complete stay (the caller wipes the slot).
        """
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        total = max(1, self.manifest.total_size) if self.verified else 1
        written: list[Path] = []
        done_bytes = 0
        made_dirs: set[Path] = {root}
        for entry, _member, stream in self._payload():
            target = root.joinpath(*entry.path.split("/"))
            self._make_parents(root, target.parent, made_dirs)
            mode = 0o755 if entry.path.startswith("hooks/") else 0o644
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            except FileExistsError as exc:
                raise BundleContentError(
                    f"{target} already exists: extract into an empty folder"
                ) from exc
            except OSError as exc:
                raise self._write_error(exc, target, entry) from exc
            try:
                with os.fdopen(fd, "wb") as out:
                    self._copy(entry, stream, out.write)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                target.unlink(missing_ok=True)
                raise self._write_error(exc, target, entry) from exc
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            written.append(target)
            done_bytes += entry.size
            if progress is not None:
                progress(done_bytes / total, f"extracted {entry.path}")
        for folder in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        return written

    @staticmethod
    def _make_parents(root: Path, folder: Path, made: set[Path]) -> None:
        missing: list[Path] = []
        cursor = folder
        while cursor not in made and cursor != root:
            missing.append(cursor)
            cursor = cursor.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if path.is_symlink() or not path.is_dir():
                    raise BundleContentError(
                        f"{path} exists and is not a folder: extract into an empty folder"
                    ) from None
            except OSError as exc:
                if exc.errno in _SPACE_ERRNOS:
                    raise BundleSpaceError(
                        f"disk full creating {path}: free space on that filesystem"
                    ) from exc
                raise BundleError(f"cannot create {path}: {exc.strerror}") from exc
            made.add(path)

    def _write_error(self, exc: OSError, target: Path, entry: BundleFile) -> BundleError:
        if exc.errno in _SPACE_ERRNOS:
            return BundleSpaceError(
                f"disk full writing {target} ({entry.size} bytes): free space on that "
                "filesystem and install again"
            )
        return BundleError(f"cannot write {target}: {exc.strerror}")

    def check_payload(self, progress: BundleProgress | None = None) -> None:
        """Read the whole payload checking every member, size and sha256; write nothing."""
        total = max(1, self.manifest.total_size) if self.verified else 1
        done = 0
        for entry, _member, stream in self._payload():
            self._copy(entry, stream, lambda _chunk: None)
            done += entry.size
            if progress is not None:
                progress(done / total, f"checked {entry.path}")


def open_bundle(
    path: Path, *, file: BinaryIO | None = None
) -> AbstractContextManager[BundleReader]:
    """Open ``path`` and read its ``manifest.json`` and ``manifest.sig`` (see the module
    docstring); a context manager that closes the file.

    ``file``: read this already open file (at its start; it is closed with the reader) instead
    of opening ``path``, which then only names the bundle in messages. ``bundle install`` run
    by root hands the installer, running as the service's user, the bundle it opened that way
    (an inherited file descriptor): a re-open through ``/dev/fd/N`` checks the file's
    permissions again and fails for a bundle only root may read."""
    return _opened(path, file)


@contextmanager
def _opened(path: Path, file: BinaryIO | None) -> Iterator[BundleReader]:
    reader = BundleReader(path, file)
    try:
        reader._open()
        yield reader
    finally:
        reader.close()


def verify_signature(reader: BundleReader, trusted: TrustedKeys) -> str:
    """Step 2 of reading: the key id whose signature verifies; BundleSignatureError if none."""
    return reader.verify(trusted)


# ---------------------------------------------------------------------------------- writing


def _tar_info(name: str, size: int, mtime: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = mode
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _epoch(created: str) -> int:
    moment = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def _hash_source(item: PayloadSource) -> BundleFile:
    try:
        st = item.source.stat()
        if not item.source.is_file():
            raise BundleContentError(f"{item.source} (for {item.path}) is not a regular file")
        digest = hash_file(item.source, total=st.st_size)
    except OSError as exc:
        raise BundleContentError(
            f"cannot read {item.source} (for {item.path}): {exc.strerror}"
        ) from exc
    return BundleFile(path=item.path, size=st.st_size, sha256=digest.hexdigest())


@contextmanager
def _atomic_output(out: Path) -> Iterator[BinaryIO]:
    part = out.with_name(out.name + ".part")
    try:
        with part.open("wb") as raw:
            yield raw
            raw.flush()
            os.fsync(raw.fileno())
        part.replace(out)
        fsync_dir(out.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    tar.addfile(_tar_info(name, len(data), mtime), io.BytesIO(data))


class _HashingReader(_ReadOnly):
    """Passes reads through while hashing and counting, for copying a member into a tar."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._raw.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data


def write_bundle(
    out: Path,
    *,
    name: str,
    version: str,
    compat: BundleCompat,
    files: Sequence[PayloadSource],
    agent_version: str | None = None,
    key: SigningKey | None = None,
    created: str | None = None,
    progress: BundleProgress | None = None,
    level: int = ZSTD_LEVEL,
) -> BundleManifest:
    """Write the bundle ``out`` (atomically: ``out.part`` then rename); its manifest.

    Each source is hashed first (for the manifest), then streamed into the archive and hashed
    again: a source that changes in between is a BundleContentError, never a bundle whose
    manifest lies. Signed with ``key`` when given, else unsigned (``bundle sign`` later).
    """
    entries = []
    for n, item in enumerate(files):
        try:
            check_payload_path(item.path)
        except ValueError as exc:
            raise BundleContentError(f"{item.source}: {exc}") from exc
        entries.append(_hash_source(item))
        if progress is not None:
            progress(0.5 * (n + 1) / max(1, len(files)), f"hashed {item.path}")
    try:
        manifest = BundleManifest(
            schema=1,
            name=name,
            version=version,
            created=created or utc_timestamp(),
            compat=compat,
            agent_version=agent_version,
            files=entries,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        text = "; ".join(str(exc).splitlines()[1:3]) or str(exc)
        raise BundleFormatError(f"bundle {name} {version}: invalid manifest: {text}") from exc
    data = manifest_bytes(manifest)
    signature = sign_manifest(data, key) if key is not None else None
    sources = {item.path: item.source for item in files}
    _write_archive(out, manifest, data, signature, sources, progress=progress, level=level)
    return manifest


def _write_archive(
    out: Path,
    manifest: BundleManifest,
    data: bytes,
    signature: BundleSignature | None,
    sources: Mapping[str, Path],
    *,
    progress: BundleProgress | None,
    level: int,
) -> None:
    mtime = _epoch(manifest.created)
    total = max(1, manifest.total_size)
    done = 0
    try:
        with _atomic_output(out) as raw:
            compressor = zstandard.ZstdCompressor(level=level)
            with (
                compressor.stream_writer(raw, closefd=False) as zout,
                tarfile.open(fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                _add_bytes(tar, MANIFEST_MEMBER, data, mtime)
                if signature is not None:
                    _add_bytes(tar, SIGNATURE_MEMBER, signature_bytes(signature), mtime)
                for entry in manifest.files:
                    mode = 0o755 if entry.path.startswith("hooks/") else 0o644
                    info = _tar_info(PAYLOAD_PREFIX + entry.path, entry.size, mtime, mode)
                    source = sources[entry.path]
                    with source.open("rb") as f:
                        hashing = _HashingReader(f)
                        tar.addfile(info, hashing)
                    if hashing.digest.hexdigest() != entry.sha256:
                        raise BundleContentError(
                            f"{source} changed while the bundle was written; build again"
                        )
                    done += entry.size
                    if progress is not None:
                        progress(0.5 + 0.5 * done / total, f"packed {entry.path}")
    except OSError as exc:
        if exc.errno in _SPACE_ERRNOS:
            raise BundleSpaceError(f"disk full writing {out}: free space and build again") from exc
        raise BundleError(
            f"cannot write bundle {out}: {exc.strerror or exc} ({exc.filename or out})"
        ) from exc
    except tarfile.TarError as exc:
        raise BundleContentError(f"cannot write bundle {out}: {exc}") from exc


def resign_bundle(
    src: Path,
    out: Path,
    key: SigningKey,
    *,
    progress: BundleProgress | None = None,
    level: int = ZSTD_LEVEL,
) -> BundleSignature:
    """Write ``out``: ``src`` with a new ``manifest.sig`` by ``key`` (``out`` may be ``src``).

    The payload is checked against the manifest while it is copied (members, sizes, sha256),
    so a signature is never put on a bundle whose content does not match its manifest.
    """
    with open_bundle(src) as reader:
        manifest = reader.manifest
        data = reader.manifest_bytes
        signature = sign_manifest(data, key)
        reader.trust_for_signing(key.key_id)
        mtime = _epoch(manifest.created)
        total = max(1, manifest.total_size)
        done = 0
        try:
            with _atomic_output(out) as raw:
                compressor = zstandard.ZstdCompressor(level=level)
                with (
                    compressor.stream_writer(raw, closefd=False) as zout,
                    tarfile.open(fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT) as tar,
                ):
                    _add_bytes(tar, MANIFEST_MEMBER, data, mtime)
                    _add_bytes(tar, SIGNATURE_MEMBER, signature_bytes(signature), mtime)
                    for entry, member, stream in reader._payload():
                        info = _tar_info(member.name, entry.size, mtime, member.mode & 0o777)
                        pipe = _CheckedCopy(reader.path, entry, stream)
                        tar.addfile(info, pipe)
                        pipe.finish()
                        done += entry.size
                        if progress is not None:
                            progress(done / total, f"copied {entry.path}")
        except OSError as exc:
            if exc.errno in _SPACE_ERRNOS:
                raise BundleSpaceError(f"disk full writing {out}: free space") from exc
            raise BundleError(f"cannot write bundle {out}: {exc.strerror or exc}") from exc
    return signature


class _CheckedCopy(_ReadOnly):
    """A member's stream, read by ``tarfile.addfile``, checked like the extracting reader:
    never more than declared, then size and sha256 compared in :meth:`finish`."""

    def __init__(self, path: Path, entry: BundleFile, stream: IO[bytes]) -> None:
        super().__init__()
        self._path = path
        self._entry = entry
        self._stream = stream
        self._digest = hashlib.sha256()
        self._count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size)
        if self._count + len(data) > self._entry.size:
            raise BundleContentError(
                f"{self._path}: payload/{self._entry.path} has more bytes than declared"
            )
        self._digest.update(data)
        self._count += len(data)
        return data

    def finish(self) -> None:
        if self._count != self._entry.size:
            raise BundleFormatError(f"{self._path}: payload/{self._entry.path} is truncated")
        if self._digest.hexdigest() != self._entry.sha256:
            raise BundleContentError(
                f"{self._path}: payload/{self._entry.path} does not match its sha256 "
                "in the manifest (tampered or corrupt); not signing it"
            )
