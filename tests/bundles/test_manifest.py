"""manifest.json schema and payload path rules; manifest.sig; key files."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from bundle_support import BundleKeys, make_key

from agent.bundles.manifest import (
    BundleManifest,
    check_payload_path,
    manifest_bytes,
    parse_manifest,
)
from agent.bundles.signing import (
    generate_key,
    list_keys,
    load_private_key,
    parse_signature,
    sign_manifest,
    signature_bytes,
    verify_manifest,
)
from agent.errors import BundleFormatError, BundleSignatureError

SHA = "ab" * 32


def manifest_dict(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema": 1,
        "name": "street-counter",
        "version": "1.4.0",
        "created": "2026-11-21T10:00:00Z",
        "compat": {
            "boards": ["rpi5", "generic-arm64"],
            "machine": "aarch64",
            "python": "3.11",
            "l4t": None,
            "tensorrt": None,
            "min_agent_version": "0.1.0",
        },
        "agent_version": "0.1.0",
        "files": [
            {"path": "wheels/edge_agent-0.1.0-py3-none-any.whl", "size": 123, "sha256": SHA},
            {"path": "models/yolox_nano_416.onnx", "size": 9, "sha256": SHA},
            {"path": "config/agent.toml", "size": 1, "sha256": SHA},
        ],
    }
    data.update(changes)
    return data


def test_contract_example_parses_and_round_trips() -> None:
    raw = json.dumps(manifest_dict()).encode()
    manifest = parse_manifest(raw)
    assert manifest.schema_version == 1
    assert manifest.compat.boards == ["rpi5", "generic-arm64"]
    assert [f.path for f in manifest.wheels] == ["wheels/edge_agent-0.1.0-py3-none-any.whl"]
    assert manifest.total_size == 133
    assert manifest.file("config/agent.toml") is not None
    assert manifest.file("hooks/pre-install") is None
    data = manifest_bytes(manifest)
    assert json.loads(data) == manifest_dict()
    assert parse_manifest(data) == manifest
    assert manifest_bytes(parse_manifest(data)) == data  # stable: re-serialising changes nothing


@pytest.mark.parametrize(
    "path",
    [
        "wheels/numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl",
        "models/a.onnx",
        "models/manifests/a.toml",
        "models/deep/er/x.bin",
        "plans/trt10.3-sm87-tegra234/a.plan",
        "config/agent.toml",
        "hooks/pre-install",
        "hooks/post-install",
    ],
)
def test_allowed_payload_paths(path: str) -> None:
    assert check_payload_path(path) == path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "empty"),
        ("../etc/passwd", "traversal"),
        ("models/../../etc/passwd", "traversal"),
        ("models/./a", "traversal"),
        ("models//a", "traversal"),
        ("/etc/passwd", "absolute"),
        ("models\\a.onnx", "backslash"),
        ("models/a\x00b", "NUL"),
        ("models/a\nb", "control"),
        ("wheels/sub/x.whl", "not an allowed place"),
        ("wheels/x.tar.gz", "not an allowed place"),
        ("plans/a.plan", "not an allowed place"),
        ("config/other.toml", "not an allowed place"),
        ("hooks/evil", "not an allowed place"),
        ("etc/shadow", "not an allowed place"),
        ("models", "not an allowed place"),
        ("models/" + "x" * 300, "segment"),
    ],
)
def test_rejected_payload_paths(path: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_payload_path(path)
    data = manifest_dict(files=[{"path": path, "size": 1, "sha256": SHA}])
    with pytest.raises(BundleFormatError, match=r"files\.0\.path"):
        parse_manifest(json.dumps(data).encode())


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"schema": 2}, "schema 2; this agent reads schema 1"),
        ({"version": "one"}, "PEP 440"),
        ({"name": "../x"}, "name"),
        ({"created": "yesterday"}, "created"),
        ({"extra": 1}, "extra"),
        ({"compat": {"boards": ["pc"], "machine": "x86_64"}}, r"compat\.boards"),
        ({"compat": {"boards": [], "machine": "x86_64"}}, r"compat\.boards"),
        ({"compat": {"boards": ["rpi5", "rpi5"], "machine": "aarch64"}}, "twice"),
        ({"compat": {"boards": ["rpi5"], "machine": "aarch64", "python": "3"}}, "python"),
        (
            {"compat": {"boards": ["rpi5"], "machine": "aarch64", "min_agent_version": "x"}},
            "min_agent_version",
        ),
        (
            {"files": [{"path": "models/a", "size": -1, "sha256": SHA}]},
            r"files\.0\.size",
        ),
        (
            {"files": [{"path": "models/a", "size": 1, "sha256": "XYZ"}]},
            r"files\.0\.sha256",
        ),
        (
            {
                "files": [
                    {"path": "models/a", "size": 1, "sha256": SHA},
                    {"path": "models/a", "size": 1, "sha256": SHA},
                ]
            },
            "listed twice",
        ),
        (
            {
                "files": [
                    {"path": "models/a", "size": 1, "sha256": SHA},
                    {"path": "models/a/b", "size": 1, "sha256": SHA},
                ]
            },
            "also the folder",
        ),
    ],
)
def test_invalid_manifest_is_one_line(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BundleFormatError, match=fragment) as info:
        parse_manifest(json.dumps(manifest_dict(**changes)).encode())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[1]", "not an object"),
        (b" " * (5 << 20), "byte limit"),
    ],
)
def test_unreadable_manifest(data: bytes, fragment: str) -> None:
    with pytest.raises(BundleFormatError, match=fragment):
        parse_manifest(data)


def test_key_generation_files_and_modes(tmp_path: Path) -> None:
    private, public = generate_key("release", tmp_path)
    assert private.name == "release.key"
    assert public.name == "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    key = load_private_key(private)
    assert key.key_id == "release"
    assert list_keys(tmp_path) == [("release", "private", private), ("release", "public", public)]
    with pytest.raises(BundleSignatureError, match="already exists"):
        generate_key("release", tmp_path)
    with pytest.raises(BundleSignatureError, match="not allowed"):
        generate_key("../evil", tmp_path)
    with pytest.raises(BundleSignatureError, match="not an unencrypted PEM private key"):
        load_private_key(public)
    with pytest.raises(BundleSignatureError, match="cannot read signing key"):
        load_private_key(tmp_path / "nope.key")


def test_signature_covers_exact_bytes(bundle_keys: BundleKeys, tmp_path: Path) -> None:
    data = manifest_bytes(BundleManifest.model_validate(manifest_dict()))
    signature = sign_manifest(data, bundle_keys.key)
    parsed = parse_signature(signature_bytes(signature))
    assert parsed == signature
    assert verify_manifest(data, parsed, bundle_keys.trusted) == "release"
    # one changed byte (even whitespace) no longer verifies
    with pytest.raises(BundleSignatureError, match="does not match"):
        verify_manifest(data.replace(b"\n", b" \n", 1), parsed, bundle_keys.trusted)
    other, _, _ = make_key(tmp_path / "other", "release")
    forged = sign_manifest(data, other)
    with pytest.raises(BundleSignatureError, match="does not match"):
        verify_manifest(data, forged, bundle_keys.trusted)
    with pytest.raises(BundleSignatureError, match="unsigned"):
        verify_manifest(data, None, bundle_keys.trusted)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b'{"algorithm": "rsa", "key_id": "k", "signature": "AA=="}', "algorithm"),
        (b'{"algorithm": "ed25519", "key_id": "../k", "signature": "AA=="}', "key_id"),
        (b"not json", "invalid"),
    ],
)
def test_bad_signature_member(text: bytes, fragment: str) -> None:
    with pytest.raises(BundleFormatError, match=fragment):
        parse_signature(text)


def test_signature_not_base64_or_wrong_length(bundle_keys: BundleKeys) -> None:
    data = b"{}"
    for value, fragment in (("!!!", "not base64"), ("AAAA", "3 bytes, not 64")):
        sig = parse_signature(
            json.dumps({"algorithm": "ed25519", "key_id": "release", "signature": value}).encode()
        )
        with pytest.raises(BundleSignatureError, match=fragment):
            verify_manifest(data, sig, bundle_keys.trusted)
