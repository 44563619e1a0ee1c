"""Ed25519 keys and the detached signature (``manifest.sig``) of a firmware bundle.

``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "key_id": "release", "signature":
"<base64 of the 64-byte signature over the exact manifest.json member bytes>"}``.

Keys: a private key is a PEM PKCS8 file ``<key_id>.key`` (mode 0600); its public half is
``<key_id>.pub`` (base64 of the raw 32-byte key), the format of the trusted-keys directory
(``bundles.trusted_keys_dir``) read by :class:`agent.commands.signing.TrustedKeys`, which this
module reuses: the key id is the file name without suffix.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, ValidationError

from agent.commands.signing import TrustedKeys, public_key_text
from agent.errors import BundleFormatError, BundleSignatureError, TrustedKeyError
from engines.configbase import StrictModel
from engines.fetch import fsync_dir

__all__ = [
    "KEY_ID_PATTERN",
    "MAX_SIGNATURE_BYTES",
    "BundleSignature",
    "SigningKey",
    "generate_key",
    "list_keys",
    "load_private_key",
    "load_trusted_keys",
    "parse_signature",
    "sign_manifest",
    "signature_bytes",
    "verify_manifest",
]

KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_SIGNATURE_BYTES = 64 << 10
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class BundleSignature(StrictModel):
    """The content of ``manifest.sig``."""

    algorithm: Literal["ed25519"] = Field(description="Signature algorithm; only ed25519.")
    key_id: str = Field(
        pattern=KEY_ID_PATTERN, description="Name of the signing key (its file name)."
    )
    signature: str = Field(
        min_length=1, max_length=200, description="Base64 of the 64-byte Ed25519 signature."
    )


@dataclass(frozen=True)
class SigningKey:
    """A private key and its id (the ``<key_id>.key`` file name without suffix)."""

    key_id: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


def _check_key_id(key_id: str) -> str:
    if not re.match(KEY_ID_PATTERN, key_id):
        raise BundleSignatureError(
            f"key name {key_id!r} is not allowed: letters, digits, '.', '_' and '-', "
            "at most 64, starting with a letter or digit"
        )
    return key_id


def generate_key(key_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Write a new key pair ``<out_dir>/<key_id>.key`` (PEM PKCS8, 0600) and ``.pub``.

    Never overwrites: an existing file of either name is a BundleSignatureError.
    """
    _check_key_id(key_id)
    private_path = out_dir / f"{key_id}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{key_id}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise BundleSignatureError(
                f"{path} already exists: choose another key name or remove the old key first"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleSignatureError(f"cannot create key folder {out_dir}: {exc.strerror}") from exc
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(public_key_text(key.public_key()))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(out_dir)
    except OSError as exc:
        raise BundleSignatureError(
            f"cannot write key {exc.filename or private_path}: {exc.strerror}"
        ) from exc
    return private_path, public_path


def load_private_key(path: Path) -> SigningKey:
    """Read a ``<key_id>.key`` PEM (PKCS8, unencrypted Ed25519); the key id is the file stem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleSignatureError(
            f"cannot read signing key {path}: {exc.strerror} "
            "(create one with `edge-agent bundle keys generate NAME --out DIR`)"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleSignatureError(
            f"signing key {path} is not an unencrypted PEM private key; "
            "give the .key file that `bundle keys generate` wrote, not the .pub"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleSignatureError(f"signing key {path} is a {type(key).__name__}, not Ed25519")
    return SigningKey(key_id=_check_key_id(path.stem), private_key=key)


def sign_manifest(manifest_data: bytes, key: SigningKey) -> BundleSignature:
    """The signature over the exact ``manifest.json`` bytes."""
    raw = key.private_key.sign(manifest_data)
    return BundleSignature(
        algorithm="ed25519",
        key_id=key.key_id,
        signature=base64.b64encode(raw).decode("ascii"),
    )


def signature_bytes(signature: BundleSignature) -> bytes:
    """The ``manifest.sig`` member bytes."""
    return (json.dumps(signature.model_dump(mode="json"), indent=2) + "\n").encode("utf-8")


def parse_signature(data: bytes, *, source: str = "manifest.sig") -> BundleSignature:
    """Validate ``manifest.sig`` bytes; BundleFormatError (one line) when they are not one."""
    if len(data) > MAX_SIGNATURE_BYTES:
        raise BundleFormatError(f"{source} is {len(data)} bytes; a signature is under 1 KiB")
    try:
        return BundleSignature.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()[:3]
        )
        raise BundleFormatError(f"{source} is invalid: {problems}") from exc


def load_trusted_keys(directory: Path) -> TrustedKeys:
    """The trusted keys in ``directory``; BundleSignatureError when there are none to trust."""
    if not directory.is_dir():
        raise BundleSignatureError(
            f"trusted bundle keys folder {directory} does not exist: create it and copy the "
            "release key's .pub there (bundles.trusted_keys_dir)"
        )
    try:
        trusted = TrustedKeys(directory)
    except TrustedKeyError as exc:
        raise BundleSignatureError(str(exc)) from exc
    if not trusted.key_ids:
        raise BundleSignatureError(
            f"no trusted bundle keys in {directory} (*.pub or *.pem): copy the release "
            "key's .pub there (bundles.trusted_keys_dir)"
        )
    return trusted


def verify_manifest(
    manifest_data: bytes, signature: BundleSignature | None, trusted: TrustedKeys
) -> str:
    """The id of the trusted key whose signature over ``manifest_data`` verifies.

    BundleSignatureError (one line) when the bundle is unsigned, its key is not trusted, or
    the signature does not match the manifest.
    """
    if signature is None:
        raise BundleSignatureError(
            "bundle is unsigned (no manifest.sig): sign it with `edge-agent bundle sign "
            "BUNDLE --key KEY`"
        )
    key = trusted.public_key(signature.key_id)
    if key is None:
        where = trusted.directory
        raise BundleSignatureError(
            f"bundle is signed with key {signature.key_id!r}, which is not trusted "
            f"(trusted in {where}: {', '.join(trusted.key_ids) or 'none'})"
        )
    try:
        raw = base64.b64decode(signature.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleSignatureError("manifest.sig: signature is not base64") from exc
    if len(raw) != 64:
        raise BundleSignatureError(f"manifest.sig: signature is {len(raw)} bytes, not 64")
    try:
        key.verify(raw, manifest_data)
    except InvalidSignature as exc:
        raise BundleSignatureError(
            f"signature does not match manifest.json with key {signature.key_id!r}: the "
            "manifest was changed after signing, or it was signed with another key"
        ) from exc
    return signature.key_id


def list_keys(directory: Path) -> list[tuple[str, str, Path]]:
    """``(key_id, kind, path)`` of every key file in ``directory``: kind is ``private``
    (``*.key``) or ``public`` (``*.pub`` / ``*.pem``), sorted by key id then kind."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise BundleSignatureError(f"cannot list key folder {directory}: {exc.strerror}") from exc
    found: list[tuple[str, str, Path]] = []
    for path in entries:
        if not path.is_file():
            continue
        if path.suffix == PRIVATE_SUFFIX:
            found.append((path.stem, "private", path))
        elif path.suffix in (PUBLIC_SUFFIX, ".pem"):
            found.append((path.stem, "public", path))
    return sorted(found, key=lambda item: (item[0], item[1]))
