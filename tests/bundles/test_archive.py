"""The bundle file and its verifying reader: real keys, real zstd tar files, real disk writes.

Every negative case of issue #8 at the reader level: tampered manifest, tampered payload, wrong
key, no signature, truncated file, ``../`` and absolute member paths, symbolic and hard links,
device nodes, duplicates, unlisted and missing members, a payload larger than declared, a full
disk (a real, small tmpfs). Each is rejected with a clear reason, and each test checks that
nothing was written outside the staging folder (``sandbox/slot/files``) — for failures before
the signature is checked, that nothing was written at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bundle_support import (
    BundleKeys,
    RawMember,
    make_bundle,
    read_members,
    resigned,
    tampered_manifest,
    tampered_payload,
    tree_snapshot,
    truncated,
    with_device_member,
    with_duplicate_member,
    with_extra_member,
    with_link_member,
    with_member_renamed,
    with_oversized_member,
    without_signature,
    write_members,
)

from agent.bundles.archive import (
    PRE_VERIFY_LIMIT,
    open_bundle,
    resign_bundle,
    verify_signature,
)
from agent.bundles.manifest import manifest_bytes
from agent.bundles.signing import load_trusted_keys
from agent.commands.signing import TrustedKeys
from agent.errors import (
    BundleContentError,
    BundleError,
    BundleFormatError,
    BundleSignatureError,
    BundleSpaceError,
)

FILES: dict[str, bytes] = {
    "wheels/demo-1.0-py3-none-any.whl": os.urandom(3000),
    "models/yolo.onnx": os.urandom(200_000),
    "models/manifests/yolo.toml": b'name = "yolo"\n',
    "plans/trt10.3-sm87-tegra234/yolo.plan": os.urandom(5000),
    "config/agent.toml": b"[agent]\n",
    "hooks/pre-install": b"#!/bin/sh\nexit 0\n",
}


@pytest.fixture
def good(tmp_path: Path, bundle_keys: BundleKeys) -> Path:
    return make_bundle(tmp_path / "good.bundle", FILES, version="1.4.0", key=bundle_keys.key)


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """``sandbox/slot/files`` is where extraction may write; ``sandbox/outside/`` holds a file
    an escaping member would hit."""
    box = tmp_path / "sandbox"
    (box / "slot").mkdir(parents=True)
    (box / "outside").mkdir()
    (box / "outside" / "victim").write_bytes(b"keep me")
    return box


def install(bundle: Path, trusted: TrustedKeys, dest: Path) -> list[Path]:
    """What the installer does with a bundle: open, verify, parse, extract."""
    with open_bundle(bundle) as reader:
        verify_signature(reader, trusted)
        assert reader.manifest.files  # parsed and valid
        return reader.extract_to(dest)


def assert_nothing_outside(box: Path, before: dict[str, tuple[str, int]]) -> None:
    after = tree_snapshot(box)
    outside_before = {k: v for k, v in before.items() if not k.startswith("slot")}
    outside_after = {k: v for k, v in after.items() if not k.startswith("slot")}
    assert outside_after == outside_before
    assert (box / "outside" / "victim").read_bytes() == b"keep me"
    stray = [k for k in after if k.startswith("slot/") and not k.startswith("slot/files")]
    assert stray == []


def test_round_trip_extracts_every_file_checked(
    good: Path, bundle_keys: BundleKeys, sandbox: Path
) -> None:
    dest = sandbox / "slot" / "files"
    progress: list[tuple[float, str]] = []
    with open_bundle(good) as reader:
        assert reader.signature is not None
        assert reader.signature.key_id == "release"
        assert verify_signature(reader, bundle_keys.trusted) == "release"
        manifest = reader.manifest
        written = reader.extract_to(dest, lambda f, m: progress.append((f, m)))
    assert manifest.name == "test-bundle"
    assert manifest.version == "1.4.0"
    assert [f.path for f in manifest.files] == list(FILES)
    assert [p.relative_to(dest).as_posix() for p in written] == list(FILES)
    for rel, data in FILES.items():
        assert (dest / rel).read_bytes() == data
    assert os.access(dest / "hooks/pre-install", os.X_OK)
    assert not os.access(dest / "models/yolo.onnx", os.X_OK)
    assert progress[-1][0] == pytest.approx(1.0)
    assert [m for _, m in progress] == [f"extracted {rel}" for rel in FILES]


def test_member_order_and_exact_manifest_bytes(good: Path, bundle_keys: BundleKeys) -> None:
    members = read_members(good)
    assert [m.name for m in members] == [
        "manifest.json",
        "manifest.sig",
        *(f"payload/{rel}" for rel in FILES),
    ]
    with open_bundle(good) as reader:
        assert members[0].data == reader.manifest_bytes == manifest_bytes(reader.manifest)
    sig = json.loads(members[1].data)
    assert sig["algorithm"] == "ed25519"
    assert sig["key_id"] == "release"


def test_payload_cannot_be_read_before_the_signature_is_verified(good: Path, sandbox: Path) -> None:
    before = tree_snapshot(sandbox)
    with open_bundle(good) as reader, pytest.raises(BundleSignatureError, match="before the sig"):
        reader.extract_to(sandbox / "slot" / "files")
    assert tree_snapshot(sandbox) == {**before, "slot/files": ("dir", 0)}
    assert list((sandbox / "slot" / "files").iterdir()) == []


# Cases rejected before any payload byte is read: (builder, error class, message fragment).
def _tampered_manifest(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    return tampered_manifest(src, dst)


def _wrong_key(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    return make_bundle(dst, FILES, version="1.4.0", key=other.key)


def _unsigned(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    return without_signature(src, dst)


def _unsigned_by_writer(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    return make_bundle(dst, FILES, version="1.4.0", key=None)


def _not_zstd(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    dst.write_bytes(b"PK\x03\x04 this is a zip, not a bundle")
    return dst


def _manifest_not_first(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    return with_extra_member(src, dst, "README", b"hello", at=0)


def _manifest_symlink(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    members = read_members(src)
    members[0] = RawMember("manifest.json", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    return write_members(dst, members)


def _giant_manifest(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    # 5 MiB of spaces: compresses to almost nothing (a small "bomb") and is over the 4 MiB cap.
    return write_members(dst, [RawMember("manifest.json", b" " * (5 << 20))])


def _giant_pax_header(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    members = read_members(src)
    members[0].extra = {"comment": "x" * (PRE_VERIFY_LIMIT + 1000)}
    return write_members(dst, members)


def _hostile_signed_manifest(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
    def change(data: dict[str, object]) -> None:
        files = data["files"]
        assert isinstance(files, list)
        files[0]["path"] = "../../etc/cron.d/evil"

    return resigned(src, dst, keys.key, change)


BEFORE_PAYLOAD: dict[str, tuple[Callable[..., Path], type[BundleError], str]] = {
    "tampered manifest": (_tampered_manifest, BundleSignatureError, "does not match manifest"),
    "wrong key": (_wrong_key, BundleSignatureError, "does not match manifest"),
    "no signature member": (_unsigned, BundleSignatureError, "unsigned"),
    "written unsigned": (_unsigned_by_writer, BundleSignatureError, "unsigned"),
    "not zstd": (_not_zstd, BundleFormatError, "not zstd"),
    "manifest not first": (_manifest_not_first, BundleFormatError, "expected manifest.json"),
    "manifest is a symlink": (_manifest_symlink, BundleContentError, "symbolic link"),
    "manifest over 4 MiB": (_giant_manifest, BundleFormatError, "byte limit"),
    "giant header before signature": (_giant_pax_header, BundleFormatError, "exceed"),
    "signed manifest with ../ path": (_hostile_signed_manifest, BundleFormatError, "traversal"),
}


@pytest.mark.parametrize("case", list(BEFORE_PAYLOAD))
def test_rejected_before_any_write(
    case: str,
    good: Path,
    sandbox: Path,
    bundle_keys: BundleKeys,
    other_keys: BundleKeys,
) -> None:
    build, error, fragment = BEFORE_PAYLOAD[case]
    bad = build(good, good.parent / "bad.bundle", bundle_keys, other_keys)
    before = tree_snapshot(sandbox)
    with pytest.raises(error, match=fragment) as info:
        install(bad, bundle_keys.trusted, sandbox / "slot" / "files")
    assert "\n" not in str(info.value)
    assert tree_snapshot(sandbox) == before  # not even the staging folder was created


def test_unknown_key_id_names_the_trusted_keys(
    good: Path, tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    trusted = tmp_path / "only-other"
    trusted.mkdir()
    (trusted / "fleet.pub").write_bytes(bundle_keys.public_path.read_bytes())
    with open_bundle(good) as reader, pytest.raises(BundleSignatureError) as info:
        verify_signature(reader, TrustedKeys(trusted))
    assert "'release', which is not trusted" in str(info.value)
    assert "fleet" in str(info.value)


def test_no_trusted_keys_is_an_error_not_an_open_door(tmp_path: Path) -> None:
    with pytest.raises(BundleSignatureError, match="does not exist"):
        load_trusted_keys(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleSignatureError, match="no trusted bundle keys"):
        load_trusted_keys(tmp_path / "empty")


# Cases whose signature verifies but whose payload is wrong: (builder, error, fragment, the
# payload file that must not exist afterwards).
def _payload_case(fn: Callable[[Path, Path], Path]) -> Callable[..., Path]:
    def build(src: Path, dst: Path, keys: BundleKeys, other: BundleKeys) -> Path:
        return fn(src, dst)

    return build


def _giant_header_after_signature(src: Path, dst: Path) -> Path:
    # a re-packed signed bundle: the signature covers the manifest, not the tar headers, so a
    # 64 MiB PAX record (a few KiB compressed) must not be read into memory
    members = read_members(src)
    members[3].extra = {"comment": "x" * (64 << 20)}
    return write_members(dst, members)


AFTER_SIGNATURE: dict[str, tuple[Callable[..., Path], type[BundleError], str, str]] = {
    "giant header after the signature": (
        _payload_case(_giant_header_after_signature),
        BundleFormatError,
        "re-packed",
        "models/yolo.onnx",
    ),
    "tampered payload": (
        _payload_case(lambda s, d: tampered_payload(s, d, "models/yolo.onnx")),
        BundleContentError,
        "does not match the manifest",
        "models/yolo.onnx",
    ),
    "dot-dot member": (
        _payload_case(
            lambda s, d: with_member_renamed(
                s, d, "payload/models/yolo.onnx", "payload/../../outside/victim"
            )
        ),
        BundleContentError,
        "path traversal",
        "models/yolo.onnx",
    ),
    "absolute member": (
        _payload_case(
            lambda s, d: with_member_renamed(s, d, "payload/models/yolo.onnx", "/tmp/evil.onnx")
        ),
        BundleContentError,
        "absolute",
        "models/yolo.onnx",
    ),
    "symlink member": (
        _payload_case(
            lambda s, d: with_link_member(
                s, d, "models/yolo.onnx", hard=False, target="../../outside/victim"
            )
        ),
        BundleContentError,
        "symbolic link",
        "models/yolo.onnx",
    ),
    "hard link member": (
        _payload_case(
            lambda s, d: with_link_member(
                s, d, "models/yolo.onnx", hard=True, target="payload/wheels/x.whl"
            )
        ),
        BundleContentError,
        "hard link",
        "models/yolo.onnx",
    ),
    "device member": (
        _payload_case(lambda s, d: with_device_member(s, d, "models/yolo.onnx")),
        BundleContentError,
        "device node",
        "models/yolo.onnx",
    ),
    "fifo member": (
        _payload_case(lambda s, d: with_device_member(s, d, "config/agent.toml", tarfile.FIFOTYPE)),
        BundleContentError,
        "FIFO",
        "config/agent.toml",
    ),
    "payload larger than declared": (
        _payload_case(lambda s, d: with_oversized_member(s, d, "models/yolo.onnx", b"\0" * 4096)),
        BundleContentError,
        "declares 200000",
        "models/yolo.onnx",
    ),
    "unlisted member": (
        _payload_case(lambda s, d: with_extra_member(s, d, "payload/models/extra.onnx")),
        BundleContentError,
        "not listed in the manifest",
        "models/extra.onnx",
    ),
    "unlisted member in the middle": (
        _payload_case(lambda s, d: with_extra_member(s, d, "payload/models/zz.onnx", at=3)),
        BundleContentError,
        "not listed in the manifest",
        "models/zz.onnx",
    ),
    "duplicate member": (
        _payload_case(lambda s, d: with_duplicate_member(s, d, "config/agent.toml")),
        BundleContentError,
        "appears twice",
        "hooks/pre-install",
    ),
    "missing member": (
        _payload_case(
            lambda s, d: write_members(
                d, [m for m in read_members(s) if m.name != "payload/hooks/pre-install"]
            )
        ),
        BundleContentError,
        "payload/hooks/pre-install is missing",
        "hooks/pre-install",
    ),
}


@pytest.mark.parametrize("case", list(AFTER_SIGNATURE))
def test_bad_payload_rejected_inside_the_staging_folder(
    case: str,
    good: Path,
    sandbox: Path,
    bundle_keys: BundleKeys,
    other_keys: BundleKeys,
) -> None:
    build, error, fragment, absent = AFTER_SIGNATURE[case]
    bad = build(good, good.parent / "bad.bundle", bundle_keys, other_keys)
    before = tree_snapshot(sandbox)
    dest = sandbox / "slot" / "files"
    with pytest.raises(error, match=fragment) as info:
        install(bad, bundle_keys.trusted, dest)
    assert "\n" not in str(info.value)
    assert not (dest / absent).exists()
    assert not Path("/tmp/evil.onnx").exists()
    assert_nothing_outside(sandbox, before)
    # whatever was written is a byte-exact, checked payload file
    for path in dest.rglob("*"):
        if path.is_file():
            rel = path.relative_to(dest).as_posix()
            assert path.read_bytes() == FILES[rel]
            assert not path.is_symlink()


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file_is_rejected(
    keep: float, good: Path, tmp_path: Path, sandbox: Path, bundle_keys: BundleKeys
) -> None:
    bad = truncated(good, tmp_path / "cut.bundle", keep)
    before = tree_snapshot(sandbox)
    dest = sandbox / "slot" / "files"
    with pytest.raises((BundleFormatError, BundleContentError)) as info:
        install(bad, bundle_keys.trusted, dest)
    text = str(info.value)
    assert "truncated" in text or "missing" in text or "corrupt" in text
    assert_nothing_outside(sandbox, before)
    for path in dest.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == FILES[path.relative_to(dest).as_posix()]


def test_existing_file_in_staging_is_not_overwritten(
    good: Path, bundle_keys: BundleKeys, sandbox: Path
) -> None:
    dest = sandbox / "slot" / "files"
    (dest / "models").mkdir(parents=True)
    (dest / "models" / "yolo.onnx").write_bytes(b"old")
    with pytest.raises(BundleContentError, match="already exists"):
        install(good, bundle_keys.trusted, dest)
    assert (dest / "models" / "yolo.onnx").read_bytes() == b"old"


def test_symlinked_folder_in_staging_is_not_followed(
    good: Path, bundle_keys: BundleKeys, sandbox: Path
) -> None:
    dest = sandbox / "slot" / "files"
    dest.mkdir(parents=True)
    (dest / "models").symlink_to(sandbox / "outside")
    before = tree_snapshot(sandbox / "outside")
    with pytest.raises(BundleContentError, match="not a folder"):
        install(good, bundle_keys.trusted, dest)
    assert tree_snapshot(sandbox / "outside") == before


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 128 KiB tmpfs (root only); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_is_bundle_space_error(
    good: Path, bundle_keys: BundleKeys, small_tmpfs: Path
) -> None:
    dest = small_tmpfs / "slot" / "files"
    with pytest.raises(BundleSpaceError, match="disk full") as info:
        install(good, bundle_keys.trusted, dest)
    assert info.value.reason == "bundle_no_space"
    # the file that did not fit is removed; the ones before it are complete and correct
    assert not (dest / "models" / "yolo.onnx").exists()
    assert (dest / "wheels/demo-1.0-py3-none-any.whl").read_bytes() == FILES[
        "wheels/demo-1.0-py3-none-any.whl"
    ]


def test_check_payload_reads_everything_and_writes_nothing(
    good: Path, tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    before = tree_snapshot(tmp_path)
    with open_bundle(good) as reader:
        reader.verify(bundle_keys.trusted)
        reader.check_payload()
    bad = tampered_payload(good, tmp_path / "bad.bundle", "plans/trt10.3-sm87-tegra234/yolo.plan")
    with open_bundle(bad) as reader:
        reader.verify(bundle_keys.trusted)
        with pytest.raises(BundleContentError, match=r"yolo\.plan sha256"):
            reader.check_payload()
    assert set(tree_snapshot(tmp_path)) == set(before) | {"bad.bundle"}


def test_resign_signs_an_unsigned_bundle(
    tmp_path: Path, bundle_keys: BundleKeys, sandbox: Path
) -> None:
    unsigned = make_bundle(tmp_path / "u.bundle", FILES, version="2.0.0", key=None)
    signed = tmp_path / "s.bundle"
    signature = resign_bundle(unsigned, signed, bundle_keys.key)
    assert signature.key_id == "release"
    install(signed, bundle_keys.trusted, sandbox / "slot" / "files")
    # in place, replacing a signature by another key's
    resign_bundle(signed, signed, bundle_keys.key)
    with open_bundle(signed) as reader:
        assert reader.verify(bundle_keys.trusted) == "release"


def test_resign_refuses_a_payload_that_does_not_match(
    good: Path, tmp_path: Path, bundle_keys: BundleKeys
) -> None:
    bad = tampered_payload(good, tmp_path / "bad.bundle", "models/yolo.onnx")
    out = tmp_path / "out.bundle"
    with pytest.raises(BundleContentError, match="does not match"):
        resign_bundle(bad, out, bundle_keys.key)
    assert not out.exists()
    assert not out.with_name("out.bundle.part").exists()


def test_one_pass_per_open(good: Path, bundle_keys: BundleKeys, tmp_path: Path) -> None:
    with open_bundle(good) as reader:
        reader.verify(bundle_keys.trusted)
        reader.check_payload()
        with pytest.raises(BundleFormatError, match="one pass"):
            reader.extract_to(tmp_path / "again")
