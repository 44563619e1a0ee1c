"""Secrets from systemd credentials ($CREDENTIALS_DIRECTORY) or files, with real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.credentials import read_secret, read_secret_bytes
from agent.errors import CredentialError, reason_code


def test_credentials_directory_wins_over_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    fallback = tmp_path / "password.txt"
    fallback.write_text("from-file\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_secret("mqtt-password", fallback, environ=env) == "from-systemd"


def test_file_used_when_credential_absent(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    fallback = tmp_path / "password.txt"
    fallback.write_text("s3cret\r\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_secret("mqtt-password", fallback, environ=env) == "s3cret"
    assert read_secret("mqtt-password", fallback, environ={}) == "s3cret"


def test_bytes_are_returned_unchanged(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    key.write_bytes(b"\x00\x01\xffkey\n")
    assert read_secret_bytes("signing.key", key, environ={}) == b"\x00\x01\xffkey\n"


def test_missing_everywhere_names_both_places(tmp_path: Path) -> None:
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    with pytest.raises(CredentialError) as info:
        read_secret("mqtt-password", tmp_path / "nope.txt", environ=env)
    message = str(info.value)
    assert "$CREDENTIALS_DIRECTORY/mqtt-password" in message
    assert "nope.txt" in message
    assert "LoadCredential=mqtt-password" in message
    assert reason_code(info.value) == "credential_missing"


def test_missing_without_any_source(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="no \\$CREDENTIALS_DIRECTORY and no file"):
        read_secret("token", None, environ={})


def test_empty_and_non_utf8_secrets_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(CredentialError, match="is empty"):
        read_secret("x", empty, environ={})
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(CredentialError, match="not UTF-8"):
        read_secret("x", binary, environ={})


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".."])
def test_bad_names_rejected(name: str, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="invalid credential name"):
        read_secret(name, None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_unreadable_credential_is_clear(tmp_path: Path) -> None:
    # a directory where the file should be: unreadable for root and users alike
    (tmp_path / "key").mkdir()
    with pytest.raises(CredentialError, match="cannot be read"):
        read_secret("key", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_reads_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t0k")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert os.environ["CREDENTIALS_DIRECTORY"] == str(tmp_path)
    assert read_secret("token") == "t0k"
