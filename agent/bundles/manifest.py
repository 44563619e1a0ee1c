"""``manifest.json`` of a firmware bundle: the schema, payload path rules and the exact bytes.

The manifest names the bundle (name, PEP 440 version, creation time), says which devices it is
for (:class:`BundleCompat`) and lists every payload file with its size and sha256, in the order
the members follow in the archive. The signature (``manifest.sig``) covers the exact bytes of
the ``manifest.json`` member; :func:`manifest_bytes` is the one way the writer produces them.

Payload paths are relative POSIX paths under one of the allowed places (see
:func:`check_payload_path`): ``wheels/*.whl``, ``models/**``, ``plans/<plan_key>/**``,
``config/agent.toml``, ``hooks/pre-install`` and ``hooks/post-install``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Literal

from packaging.version import InvalidVersion, Version
from pydantic import Field, ValidationError, field_validator, model_validator

from agent.errors import BundleFormatError
from engines.configbase import StrictModel

__all__ = [
    "BOARDS",
    "CONFIG_PATH",
    "HOOK_PATHS",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "SCHEMA_VERSION",
    "Board",
    "BundleCompat",
    "BundleFile",
    "BundleManifest",
    "check_payload_path",
    "manifest_bytes",
    "parse_manifest",
    "utc_timestamp",
]

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 4 << 20
"""The largest ``manifest.json`` a reader accepts (read into memory before the signature)."""
MAX_FILES = 100_000
MAX_PATH_CHARS = 1024
MAX_SEGMENT_CHARS = 255

Board = Literal["jetson-orin", "rpi5", "rpi4", "generic-arm64", "x86_64"]
BOARDS: tuple[str, ...] = ("jetson-orin", "rpi5", "rpi4", "generic-arm64", "x86_64")
CONFIG_PATH = "config/agent.toml"
HOOK_PATHS = ("hooks/pre-install", "hooks/post-install")

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"
_CREATED = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"
_MAJOR_MINOR = r"^\d+\.\d+$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_payload_path(path: str) -> str:
    """``path`` if it is an allowed payload path, else ``ValueError`` saying why (one line).

    Relative POSIX, no ``.``/``..``/empty segment, no backslash or control character, under
    ``wheels/`` (one ``*.whl``), ``models/``, ``plans/<plan_key>/``, or exactly
    ``config/agent.toml``, ``hooks/pre-install`` or ``hooks/post-install``.
    """
    if not path:
        raise ValueError("empty payload path")
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"payload path longer than {MAX_PATH_CHARS} characters")
    if _CONTROL.search(path):
        raise ValueError(f"payload path {path!r} contains a NUL or control character")
    if "\\" in path:
        raise ValueError(f"payload path {path!r} contains a backslash; use '/'")
    if path.startswith("/"):
        raise ValueError(f"payload path {path!r} is absolute; paths are relative to the slot")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(
                f"payload path {path!r} has an empty, '.' or '..' segment (path traversal)"
            )
        if len(part) > MAX_SEGMENT_CHARS:
            raise ValueError(f"payload path {path!r} has a segment over {MAX_SEGMENT_CHARS} chars")
    top = parts[0]
    if top == "wheels" and len(parts) == 2 and parts[1].endswith(".whl"):
        return path
    if top == "models" and len(parts) >= 2:
        return path
    if top == "plans" and len(parts) >= 3:
        return path
    if path == CONFIG_PATH or path in HOOK_PATHS:
        return path
    raise ValueError(
        f"payload path {path!r} is not an allowed place: wheels/*.whl, models/**, "
        f"plans/<plan_key>/**, {CONFIG_PATH}, {' or '.join(HOOK_PATHS)}"
    )


def _check_version_text(value: str, what: str) -> str:
    try:
        Version(value)
    except InvalidVersion:
        raise ValueError(f"{what} {value!r} is not a PEP 440 version (e.g. 1.4.0)") from None
    return value


def utc_timestamp(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as the manifest's ``created`` text, ``2026-11-21T10:00:00Z``."""
    when = datetime.now(timezone.utc) if moment is None else moment.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class BundleCompat(StrictModel):
    """Which devices a bundle installs on."""

    boards: list[Board] = Field(
        min_length=1,
        description="Board families the bundle is for (jetson-orin, rpi5, rpi4, "
        "generic-arm64, x86_64).",
    )
    machine: str = Field(
        min_length=1,
        max_length=32,
        pattern=r"^[A-Za-z0-9_]+$",
        description="platform.machine() the wheels are built for (aarch64, x86_64).",
    )
    python: str | None = Field(
        default=None,
        pattern=_MAJOR_MINOR,
        description="Python major.minor the wheels are built for; null when the bundle has "
        "no binary wheels.",
    )
    l4t: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="L4T release the plans need: a specifier (>=36.3) or a prefix (36.3); "
        "null when no plans.",
    )
    tensorrt: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="TensorRT version the plans need: a specifier or a prefix (10.3); null "
        "when no plans.",
    )
    min_agent_version: str | None = Field(
        default=None,
        description="The installing agent must be at least this version; null: any.",
    )

    @field_validator("boards")
    @classmethod
    def _unique_boards(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("boards lists a board twice")
        return value

    @field_validator("min_agent_version")
    @classmethod
    def _min_agent(cls, value: str | None) -> str | None:
        return None if value is None else _check_version_text(value, "min_agent_version")


class BundleFile(StrictModel):
    """One payload file: where it goes in the slot, its size and its sha256."""

    path: str = Field(description="Relative POSIX path inside the slot's files/ folder.")
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern=_SHA256, description="Lowercase hex sha256 of the content.")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_payload_path(value)


class BundleManifest(StrictModel):
    """``manifest.json``, schema 1 (see docs/bundles.md)."""

    schema_version: Literal[1] = Field(
        alias="schema", description="Manifest schema version; this reader knows 1."
    )
    name: str = Field(pattern=_NAME, description="Bundle name (letters, digits, . _ -).")
    version: str = Field(description="PEP 440 version of the bundle; installs only go up.")
    created: str = Field(pattern=_CREATED, description="Creation time, UTC, ISO 8601 with Z.")
    compat: BundleCompat = Field(description="Devices the bundle installs on.")
    agent_version: str | None = Field(
        default=None, description="Version of the edge_agent wheel inside; null: none."
    )
    files: list[BundleFile] = Field(
        max_length=MAX_FILES, description="Every payload file, in archive order."
    )

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return _check_version_text(value, "version")

    @field_validator("agent_version")
    @classmethod
    def _agent_version(cls, value: str | None) -> str | None:
        return None if value is None else _check_version_text(value, "agent_version")

    @model_validator(mode="after")
    def _unique_paths(self) -> BundleManifest:
        seen: set[str] = set()
        for entry in self.files:
            if entry.path in seen:
                raise ValueError(f"payload path {entry.path!r} is listed twice")
            seen.add(entry.path)
        for entry in self.files:
            parts = entry.path.split("/")
            for n in range(1, len(parts)):
                parent = "/".join(parts[:n])
                if parent in seen:
                    raise ValueError(
                        f"payload path {parent!r} is a file and also the folder of {entry.path!r}"
                    )
        return self

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def wheels(self) -> list[BundleFile]:
        """The ``wheels/*.whl`` entries (installed offline into the slot's venv)."""
        return [entry for entry in self.files if entry.path.startswith("wheels/")]

    def file(self, path: str) -> BundleFile | None:
        """The entry for payload ``path``, or None."""
        for entry in self.files:
            if entry.path == path:
                return entry
        return None


def manifest_bytes(manifest: BundleManifest) -> bytes:
    """The exact ``manifest.json`` member bytes the writer stores and the signature covers."""
    data = manifest.model_dump(mode="json", by_alias=True)
    return (json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def parse_manifest(data: bytes, *, source: str = "manifest.json") -> BundleManifest:
    """Validate ``manifest.json`` bytes; BundleFormatError (one line) when they are not one."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleFormatError(
            f"{source} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} byte limit"
        )
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleFormatError(f"{source} is not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise BundleFormatError(
            f"{source} is not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(raw, dict):
        raise BundleFormatError(f"{source} is a JSON {type(raw).__name__}, not an object")
    schema = raw.get("schema")
    if schema != SCHEMA_VERSION:
        raise BundleFormatError(
            f"{source} has schema {schema!r}; this agent reads schema {SCHEMA_VERSION} "
            "(update the agent first, or rebuild the bundle with this agent's tooling)"
        )
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise BundleFormatError(f"{source} is invalid: {problems}{more}") from exc
