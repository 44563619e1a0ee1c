"""Helpers for the bundle tests: real keys, real bundles, and hostile archives made on purpose.

- :func:`make_key` writes a real Ed25519 key pair (``<id>.key`` + ``<id>.pub``) the way
  ``edge-agent bundle keys generate`` does; :class:`BundleKeys` (the ``bundle_keys`` fixture in
  conftest.py) holds one key and a trusted-keys folder with its ``.pub``.
- :func:`make_bundle` builds a real bundle from ``{payload path: bytes}`` with the production
  writer (``agent.bundles.archive.write_bundle``).
- :func:`read_members` / :func:`write_members` take a bundle apart and put raw members back
  together (zstd + PAX tar, any member type, any name, any header size), so the helpers below
  can make each kind of malicious or broken bundle: :func:`tampered_manifest`,
  :func:`tampered_payload`, :func:`without_signature`, :func:`with_extra_member`,
  :func:`with_member_renamed` (``../`` and absolute paths), :func:`with_link_member` (symlink,
  hard link), :func:`with_device_member`, :func:`with_oversized_member`, :func:`truncated`,
  :func:`with_duplicate_member`, :func:`resigned` (sign an arbitrary manifest).
- :func:`tree_snapshot` records every path under a folder, to assert nothing was written
  outside the staging / slot folder.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zstandard

from agent.bundles.archive import PayloadSource, write_bundle
from agent.bundles.manifest import BundleCompat
from agent.bundles.signing import (
    SigningKey,
    generate_key,
    load_private_key,
    sign_manifest,
    signature_bytes,
)
from agent.commands.signing import TrustedKeys

__all__ = [
    "DEFAULT_COMPAT",
    "BundleKeys",
    "RawMember",
    "make_bundle",
    "make_key",
    "read_members",
    "resigned",
    "tampered_manifest",
    "tampered_payload",
    "tree_snapshot",
    "truncated",
    "with_device_member",
    "with_duplicate_member",
    "with_extra_member",
    "with_link_member",
    "with_member_renamed",
    "with_oversized_member",
    "without_signature",
    "write_members",
]

DEFAULT_COMPAT: dict[str, Any] = {
    "boards": ["x86_64", "generic-arm64", "rpi5", "rpi4", "jetson-orin"],
    "machine": "x86_64",
    "python": None,
}


@dataclass(frozen=True)
class BundleKeys:
    """A signing key, its files, and a trusted-keys folder holding its public half."""

    key: SigningKey
    key_path: Path
    public_path: Path
    trusted_dir: Path

    @property
    def trusted(self) -> TrustedKeys:
        return TrustedKeys(self.trusted_dir)


def make_key(folder: Path, key_id: str = "release") -> tuple[SigningKey, Path, Path]:
    """A real key pair in ``folder``: (key, .key path, .pub path)."""
    private, public = generate_key(key_id, folder)
    return load_private_key(private), private, public


def make_bundle(
    path: Path,
    files: Mapping[str, bytes],
    *,
    version: str = "1.0.0",
    key: SigningKey | None,
    compat: Mapping[str, Any] | BundleCompat | None = None,
    name: str = "test-bundle",
    agent_version: str | None = None,
    created: str | None = None,
) -> Path:
    """A real bundle at ``path`` holding ``files`` (payload path -> content), in that order;
    signed by ``key`` (None: unsigned). The sources are written to ``<path>.src/``."""
    src = path.with_name(path.name + ".src")
    sources = []
    for rel, data in files.items():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sources.append(PayloadSource(rel, target))
    if compat is None:
        compat_model = BundleCompat.model_validate(DEFAULT_COMPAT)
    elif isinstance(compat, BundleCompat):
        compat_model = compat
    else:
        compat_model = BundleCompat.model_validate(dict(compat))
    write_bundle(
        path,
        name=name,
        version=version,
        compat=compat_model,
        files=sources,
        agent_version=agent_version,
        key=key,
        created=created,
    )
    return path


# ----------------------------------------------------------------------------- raw members


@dataclass
class RawMember:
    """One tar member as written: ``size`` overrides the header size (None: len(data))."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    size: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def read_members(bundle: Path) -> list[RawMember]:
    """Every member of ``bundle`` in order (no checks at all)."""
    raw = zstandard.ZstdDecompressor().stream_reader(bundle.open("rb"), read_across_frames=True)
    members: list[RawMember] = []
    with raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            f = tar.extractfile(info) if info.isreg() else None
            members.append(
                RawMember(
                    name=info.name,
                    data=f.read() if f is not None else b"",
                    type=info.type,
                    linkname=info.linkname,
                    mode=info.mode,
                )
            )
    return members


def write_members(path: Path, members: list[RawMember]) -> Path:
    """A zstd-compressed PAX tar of ``members`` exactly as given (hostile ones included)."""
    with path.open("wb") as out:
        zout = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        with zout, tarfile.open(fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for m in members:
                info = tarfile.TarInfo(m.name)
                info.type = m.type
                info.linkname = m.linkname
                info.mode = m.mode
                info.mtime = 1_700_000_000
                info.pax_headers = dict(m.extra)
                if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    size = len(m.data) if m.size is None else m.size
                    data = m.data[:size] + b"\0" * max(0, size - len(m.data))
                    info.size = size
                    tar.addfile(info, io.BytesIO(data))
                else:
                    info.size = 0
                    tar.addfile(info)
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[list[RawMember]], list[RawMember]]) -> Path:
    return write_members(dst, edit(read_members(src)))


def _index(members: list[RawMember], name: str) -> int:
    for n, m in enumerate(members):
        if m.name == name:
            return n
    raise KeyError(f"no member {name!r} in {[m.name for m in members]}")


def tampered_manifest(
    src: Path, dst: Path, change: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """``src`` with manifest.json changed after signing (default: the version bumped); the old
    manifest.sig stays."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, "manifest.json")
        data = json.loads(members[n].data)
        if change is None:
            data["version"] = "99.0.0"
        else:
            change(data)
        members[n] = replace(members[n], data=json.dumps(data, indent=2).encode() + b"\n")
        return members

    return _rewrite(src, dst, edit)


def tampered_payload(src: Path, dst: Path, path: str, data: bytes | None = None) -> Path:
    """``src`` with ``payload/<path>`` replaced by ``data`` (default: first byte flipped,
    same size), manifest and signature untouched."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, f"payload/{path}")
        old = members[n].data
        new = data if data is not None else bytes([old[0] ^ 0xFF]) + old[1:]
        members[n] = replace(members[n], data=new)
        return members

    return _rewrite(src, dst, edit)


def without_signature(src: Path, dst: Path) -> Path:
    """``src`` with its manifest.sig member removed."""
    return _rewrite(src, dst, lambda ms: [m for m in ms if m.name != "manifest.sig"])


def resigned(
    src: Path, dst: Path, key: SigningKey, change: Callable[[dict[str, Any]], None]
) -> Path:
    """``src`` with its manifest changed by ``change`` and validly signed again by ``key`` (a
    hostile but correctly signed manifest, or one whose payload no longer matches)."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, "manifest.json")
        data = json.loads(members[n].data)
        change(data)
        text = json.dumps(data, indent=2).encode() + b"\n"
        members[n] = replace(members[n], data=text)
        sig = signature_bytes(sign_manifest(text, key))
        members = [m for m in members if m.name != "manifest.sig"]
        members.insert(n + 1, RawMember("manifest.sig", sig))
        return members

    return _rewrite(src, dst, edit)


def with_extra_member(
    src: Path, dst: Path, name: str, data: bytes = b"extra", *, at: int | None = None
) -> Path:
    """``src`` plus a regular member ``name`` (not in the manifest), at index ``at`` (end)."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        members.insert(len(members) if at is None else at, RawMember(name, data))
        return members

    return _rewrite(src, dst, edit)


def with_member_renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """``src`` with member ``old`` renamed ``new`` (``payload/../../evil``, ``/etc/x`` ...)."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, old)
        members[n] = replace(members[n], name=new)
        return members

    return _rewrite(src, dst, edit)


def with_link_member(src: Path, dst: Path, path: str, *, hard: bool, target: str) -> Path:
    """``src`` with ``payload/<path>`` replaced by a symbolic (or hard) link to ``target``."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, f"payload/{path}")
        members[n] = RawMember(
            name=members[n].name,
            type=tarfile.LNKTYPE if hard else tarfile.SYMTYPE,
            linkname=target,
            mode=0o777,
        )
        return members

    return _rewrite(src, dst, edit)


def with_device_member(src: Path, dst: Path, path: str, kind: bytes = tarfile.CHRTYPE) -> Path:
    """``src`` with ``payload/<path>`` replaced by a device node / FIFO member (``kind``)."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, f"payload/{path}")
        members[n] = RawMember(name=members[n].name, type=kind, mode=0o600)
        return members

    return _rewrite(src, dst, edit)


def with_oversized_member(src: Path, dst: Path, path: str, extra: bytes) -> Path:
    """``src`` with ``extra`` appended to ``payload/<path>`` (header size grows with it)."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, f"payload/{path}")
        members[n] = replace(members[n], data=members[n].data + extra)
        return members

    return _rewrite(src, dst, edit)


def with_duplicate_member(src: Path, dst: Path, path: str) -> Path:
    """``src`` with ``payload/<path>`` appearing a second time right after itself."""

    def edit(members: list[RawMember]) -> list[RawMember]:
        n = _index(members, f"payload/{path}")
        members.insert(n + 1, replace(members[n]))
        return members

    return _rewrite(src, dst, edit)


def truncated(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """The first ``keep`` fraction of ``src``'s bytes (a download that stopped part-way)."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (kind, size)}`` of everything under ``root`` (links not followed)."""
    found: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            kind = "link" if full.is_symlink() else "dir" if full.is_dir() else "file"
            found[str(full.relative_to(root))] = (kind, st.st_size if kind == "file" else 0)
    return found
