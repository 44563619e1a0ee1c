"""Secrets (MQTT password, signing keys) read from systemd credentials or from files.

Secrets never sit inline in the config. Under systemd the unit's ``LoadCredential=NAME:PATH``
puts them in ``$CREDENTIALS_DIRECTORY/NAME`` (readable only by the service); elsewhere the
config names a file. ``read_secret`` tries the credential first, then the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from agent.errors import CredentialError

__all__ = ["CREDENTIALS_ENV", "credential_path", "read_secret", "read_secret_bytes"]

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


def read_secret(
    name: str, file: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> str:
    """The secret ``name`` as text, without its trailing newline.

    Looked up in ``$CREDENTIALS_DIRECTORY/<name>`` (systemd ``LoadCredential=``) first, then in
    ``file``. Raises ``CredentialError`` naming both places when neither has it, and when the
    secret is empty or not UTF-8.
    """
    data = read_secret_bytes(name, file, environ=environ)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CredentialError(
            f"secret {name!r} is not UTF-8 text — store it as text (or read it as bytes)"
        ) from exc
    text = text.rstrip("\r\n")
    if not text:
        raise CredentialError(f"secret {name!r} is empty — write the secret into it")
    return text


def read_secret_bytes(
    name: str, file: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> bytes:
    """The secret ``name`` as raw bytes (keys); same lookup order as ``read_secret``."""
    return _read(credential_path(name, file, environ=environ), name)


def credential_path(
    name: str, file: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> Path:
    """Where the secret ``name`` is, for libraries that want a path (a TLS private key):
    ``$CREDENTIALS_DIRECTORY/<name>`` first, then ``file``; ``CredentialError`` if neither."""
    if not name or "/" in name or name in (".", ".."):
        raise CredentialError(f"invalid credential name {name!r} — use a plain file name")
    env = os.environ if environ is None else environ
    tried: list[str] = []
    cred_dir = env.get(CREDENTIALS_ENV)
    if cred_dir:
        candidate = Path(cred_dir) / name
        if candidate.exists():
            return candidate
        tried.append(f"${CREDENTIALS_ENV}/{name} ({candidate})")
    if file is not None:
        if file.exists():
            return file
        tried.append(str(file))
    where = ", ".join(tried) if tried else f"no ${CREDENTIALS_ENV} and no file configured"
    raise CredentialError(
        f"secret {name!r} not found ({where}) — add `LoadCredential={name}:/path` to the unit "
        "or name a readable file in the config"
    )


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialError(
            f"secret {name!r} at {path} cannot be read: {exc.strerror} — make it readable by "
            "the agent's user only (mode 0400)"
        ) from exc
