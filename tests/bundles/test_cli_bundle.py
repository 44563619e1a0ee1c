"""`edge-agent bundle build|sign|inspect|keys` as a user runs them: the real CLI in a subprocess
(exit codes, stdout / stderr, no traceback), on real keys and bundles."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_support import tampered_payload

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *map(str, args)],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], reason: str, text: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("edge-agent: error")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"edge-agent: error [{reason}]: ")
    assert text in errors[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "model.bin").write_bytes(os.urandom(50_000))
    (tmp_path / "agent.toml").write_bytes((ROOT / "deploy/agent.example.toml").read_bytes())
    (tmp_path / "bundle.toml").write_text(
        'name = "demo"\nversion = "1.2.0"\nconfig = "agent.toml"\n'
        '[target]\nboards = ["x86_64", "generic-arm64"]\nmachine = "x86_64"\n'
        '[files]\n"models/model.bin" = "model.bin"\n'
    )
    return tmp_path


def test_keys_generate_and_list(workdir: Path) -> None:
    proc = cli("bundle", "keys", "generate", "release", "--out", "keys", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "keys/release.key" in proc.stdout
    assert stat.S_IMODE((workdir / "keys/release.key").stat().st_mode) == 0o600
    listed = cli("bundle", "keys", "list", "--dir", "keys", "--json", cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)["keys"]
    assert [(k["key_id"], k["kind"]) for k in keys] == [
        ("release", "private"),
        ("release", "public"),
    ]
    assert keys[0]["fingerprint"] == keys[1]["fingerprint"]
    assert keys[0]["fingerprint"].startswith("sha256:")
    text = cli("bundle", "keys", "list", "--dir", "keys", cwd=workdir)
    assert text.returncode == 0
    assert text.stdout.count(keys[0]["fingerprint"]) == 2
    again = cli("bundle", "keys", "generate", "release", "--out", "keys", cwd=workdir)
    assert_one_line_error(again, "bundle_signature_invalid", "already exists")
    missing = cli("bundle", "keys", "list", "--dir", "nowhere", cwd=workdir)
    assert_one_line_error(missing, "bundle_signature_invalid", "does not exist")


def test_build_sign_inspect(workdir: Path) -> None:
    assert (
        cli("bundle", "keys", "generate", "release", "--out", "keys", cwd=workdir).returncode == 0
    )
    trusted = workdir / "trusted"
    trusted.mkdir()
    (trusted / "release.pub").write_bytes((workdir / "keys/release.pub").read_bytes())

    built = cli("bundle", "build", "bundle.toml", cwd=workdir)
    assert built.returncode == 0, built.stderr
    bundle = workdir / "demo-1.2.0.bundle"
    assert built.stdout.strip() == str(bundle)
    assert "bundle build: wrote" in built.stderr
    assert "unsigned" in built.stderr

    unsigned = cli("bundle", "inspect", bundle, "--keys-dir", trusted, cwd=workdir)
    assert unsigned.returncode == 1
    assert "UNSIGNED" in unsigned.stdout
    assert "demo 1.2.0" in unsigned.stdout
    assert "config/agent.toml" in unsigned.stdout

    signed = cli(
        "bundle", "sign", bundle, "--key", "keys/release.key", "-o", "s.bundle", cwd=workdir
    )
    assert signed.returncode == 0, signed.stderr
    report = cli(
        "bundle",
        "inspect",
        "s.bundle",
        "--json",
        "--keys-dir",
        trusted,
        "--check-payload",
        cwd=workdir,
    )
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["signature"]["status"] == "verified"
    assert data["signature"]["key_id"] == "release"
    assert data["payload"]["status"] == "ok"
    assert data["manifest"]["version"] == "1.2.0"
    assert [f["path"] for f in data["manifest"]["files"]] == [
        "config/agent.toml",
        "models/model.bin",
    ]
    assert data["device"]["compatible"] is True  # x86_64 host, x86_64 bundle

    # build signed straight away into a folder
    (workdir / "dist").mkdir()
    direct = cli(
        "bundle", "build", "bundle.toml", "--key", "keys/release.key", "-o", "dist", cwd=workdir
    )
    assert direct.returncode == 0, direct.stderr
    text = cli("bundle", "inspect", "dist/demo-1.2.0.bundle", "--keys-dir", trusted, cwd=workdir)
    assert text.returncode == 0
    assert "verified with key 'release'" in text.stdout

    # a tampered payload: signature still verifies, the payload check fails
    bad = tampered_payload(workdir / "s.bundle", workdir / "bad.bundle", "models/model.bin")
    checked = cli(
        "bundle", "inspect", bad, "--json", "--keys-dir", trusted, "--check-payload", cwd=workdir
    )
    assert checked.returncode == 1
    payload = json.loads(checked.stdout)["payload"]
    assert payload["status"] == "failed"
    assert "[bundle_content_invalid]" in payload["detail"]
    refused = cli("bundle", "sign", bad, "--key", "keys/release.key", cwd=workdir)
    assert_one_line_error(refused, "bundle_content_invalid", "not signing it")


def test_inspect_reports_other_device(workdir: Path) -> None:
    spec = workdir / "bundle.toml"
    spec.write_text(spec.read_text().replace('["x86_64", "generic-arm64"]', '["rpi5"]'))
    spec.write_text(spec.read_text().replace('machine = "x86_64"', 'machine = "aarch64"'))
    assert cli("bundle", "build", "bundle.toml", cwd=workdir).returncode == 0
    proc = cli("bundle", "inspect", "demo-1.2.0.bundle", "--json", "--keys-dir", ".", cwd=workdir)
    data = json.loads(proc.stdout)
    assert data["device"]["compatible"] is False
    assert "is for rpi5" in data["device"]["reason"]
    assert data["signature"]["status"] == "unsigned"


@pytest.mark.parametrize(
    ("args", "reason", "text"),
    [
        (("bundle", "inspect", "nope.bundle"), "bundle_malformed", "cannot open bundle"),
        (("bundle", "inspect", "bundle.toml"), "bundle_malformed", "not zstd"),
        (("bundle", "build", "missing.toml"), "bundle_invalid", "cannot read bundle spec"),
        (("bundle", "build", "agent.toml"), "bundle_invalid", "is invalid"),
        (
            ("bundle", "sign", "x.bundle", "--key", "agent.toml"),
            "bundle_signature_invalid",
            "not an unencrypted PEM private key",
        ),
        (
            ("bundle", "keys", "generate", "../x", "--out", "k"),
            "bundle_signature_invalid",
            "not allowed",
        ),
    ],
)
def test_bad_input_is_one_line(
    workdir: Path, args: tuple[str, ...], reason: str, text: str
) -> None:
    assert_one_line_error(cli(*args, cwd=workdir), reason, text)


def test_usage_errors_exit_2(workdir: Path) -> None:
    for args in (("bundle",), ("bundle", "keys"), ("bundle", "sign", "x.bundle")):
        proc = cli(*args, cwd=workdir)
        assert proc.returncode == 2, args
        assert "Traceback" not in proc.stderr
        assert "usage:" in proc.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_bundle_command_has_an_example() -> None:
    bundle = _subparsers(build_parser())["bundle"]
    seen = []
    pending = [("bundle", bundle)]
    while pending:
        name, parser = pending.pop()
        seen.append(name)
        assert parser.epilog is not None, name
        assert "Example:" in parser.epilog, name
        pending += [(f"{name} {k}", p) for k, p in _subparsers(parser).items()]
    assert {
        "bundle build",
        "bundle sign",
        "bundle inspect",
        "bundle keys",
        "bundle keys generate",
        "bundle keys list",
    } <= set(seen)
