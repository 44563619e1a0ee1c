"""Ed25519 signatures on commands and the trusted-keys directory.

What is signed: the canonical JSON of the envelope as received, without ``signature``, plus
``"command"`` (the command name from the topic) and ``"device_id"`` (the target device)::

    json.dumps({**envelope_without_signature, "command": ..., "device_id": ...},
               sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

so a signed command cannot be redirected to another command or another device. ``signature``
is the base64 (standard alphabet) of the 64-byte Ed25519 signature.

Trusted keys: every ``*.pub`` (base64 of the raw 32-byte public key) and ``*.pem``
(SubjectPublicKeyInfo) file in the directory; the key id is the file name without suffix. An
envelope naming ``key_id`` is checked against that key only; without it every key is tried.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import TrustedKeyError

__all__ = [
    "SignatureError",
    "TrustedKeys",
    "canonical_bytes",
    "public_key_text",
    "sign_envelope",
]

_log = logging.getLogger(__name__)


class SignatureError(Exception):
    """A command's signature is missing or does not verify; ``reason`` is the reply code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def canonical_bytes(envelope: Mapping[str, Any], command: str, device_id: str) -> bytes:
    """The exact bytes a command signature covers (see the module docstring)."""
    body = {k: v for k, v in envelope.items() if k != "signature"}
    body["command"] = command
    body["device_id"] = device_id
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sign_envelope(
    envelope: Mapping[str, Any],
    command: str,
    device_id: str,
    key: Ed25519PrivateKey,
    key_id: str | None = None,
) -> dict[str, Any]:
    """A copy of ``envelope`` with ``key_id`` (if given) and ``signature`` set."""
    out = {k: v for k, v in envelope.items() if k != "signature"}
    if key_id is not None:
        out["key_id"] = key_id
    sig = key.sign(canonical_bytes(out, command, device_id))
    out["signature"] = base64.b64encode(sig).decode("ascii")
    return out


def public_key_text(key: Ed25519PublicKey) -> str:
    """The ``*.pub`` file format: base64 of the raw 32-byte key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii") + "\n"


class TrustedKeys:
    """Public keys allowed to sign critical commands."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.reload()

    def reload(self) -> None:
        keys: dict[str, Ed25519PublicKey] = {}
        if self.directory is None or not self.directory.is_dir():
            _log.warning(
                "trusted-keys directory %s missing: every signed (critical) command will be "
                "rejected",
                self.directory,
            )
            self._keys = keys
            return
        for path in sorted(self.directory.iterdir()):
            if path.suffix in (".pub", ".pem") and path.is_file():
                keys[path.stem] = _load_key(path)
        self._keys = keys
        _log.info("trusted keys in %s: %s", self.directory, ", ".join(sorted(keys)) or "(none)")

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        """The trusted key called ``key_id`` (its file name without suffix), or None."""
        return self._keys.get(key_id)

    def verify(self, envelope: Mapping[str, Any], command: str, device_id: str) -> str:
        """The id of the key whose signature verifies, else ``SignatureError``."""
        sig_text = envelope.get("signature")
        if sig_text is None:
            raise SignatureError(
                "signature_required",
                f"{command} is a critical command: sign it with a trusted Ed25519 key",
            )
        try:
            signature = base64.b64decode(str(sig_text), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError("signature_malformed", "signature is not base64") from exc
        if len(signature) != 64:
            raise SignatureError(
                "signature_malformed", f"signature is {len(signature)} bytes, not 64"
            )
        key_id = envelope.get("key_id")
        if key_id is not None:
            key = self._keys.get(str(key_id))
            if key is None:
                raise SignatureError("key_unknown", f"key_id {key_id!r} is not a trusted key")
            candidates = {str(key_id): key}
        else:
            candidates = self._keys
        try:
            message = canonical_bytes(envelope, command, device_id)
        except (TypeError, ValueError) as exc:
            raise SignatureError("signature_invalid", f"envelope not signable: {exc}") from exc
        for kid, key in candidates.items():
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            return kid
        raise SignatureError("signature_invalid", "signature does not verify with a trusted key")


def _load_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustedKeyError(f"trusted key {path} cannot be read: {exc.strerror}") from exc
    try:
        if path.suffix == ".pem":
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise TrustedKeyError(
            f"trusted key {path} is not an Ed25519 public key ({exc}) — .pub holds base64 of "
            "the raw 32-byte key, .pem a SubjectPublicKeyInfo PEM"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise TrustedKeyError(f"trusted key {path} is a {type(key).__name__}, not Ed25519")
    return key
