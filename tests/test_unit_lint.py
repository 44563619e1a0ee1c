"""Lint deploy/systemd/edge-agent.service with the host's own systemd tools.

``systemd-analyze verify`` exits 0 even on unknown keys (it only warns), so any output at all
fails the test. It runs with ``--root`` on a scratch tree holding the host's unit files, the unit
under test and an executable stub at the ExecStart path, so the ExecStart check really runs.
``systemd-analyze security --offline=yes`` scores the file; the score must stay within
MAX_EXPOSURE (measured 1.7 with systemd 252, see the README section "Running under systemd").
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "edge-agent.service"
SYSUSERS = ROOT / "deploy" / "systemd" / "edge-agent.sysusers"
EXEC_START = "/opt/edge-agent/venv/bin/edge-agent"
MAX_EXPOSURE = 1.7
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not found: install the `systemd` package (./bootstrap does)")
    return tool


def _lint_root(tmp_path: Path, unit_text: str, *, stub_exec: bool = True) -> Path:
    """A scratch root: the host's unit files, the unit under test and (optionally) the stub."""
    root = tmp_path / "root"
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").is_file()), None)
    if host_units is None:
        pytest.fail("no systemd unit directory with sysinit.target on this host")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / UNIT.name).write_text(unit_text)
    if stub_exec:
        stub = root / EXEC_START.lstrip("/")
        stub.parent.mkdir(parents=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def _verify(root: Path) -> str:
    """Everything `systemd-analyze verify` says about the unit (empty means clean)."""
    proc = subprocess.run(
        [_systemd_analyze(), "verify", "--no-pager", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and not out:
        out = f"systemd-analyze verify exited {proc.returncode}"
    return out


def _exposure(root: Path) -> float:
    proc = subprocess.run(
        [
            _systemd_analyze(),
            "security",
            "--no-pager",
            "--offline=yes",
            f"--root={root}",
            UNIT.name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    if match is None:
        pytest.fail(f"no exposure score in systemd-analyze security output:\n{proc.stdout}")
    return float(match.group(1))


def _unit_settings() -> dict[str, list[str]]:
    """``Section.Key`` -> every value assigned to it (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    out = _verify(_lint_root(tmp_path, UNIT.read_text()))
    assert out == "", f"systemd-analyze verify complained:\n{out}"


def test_verify_reports_an_unknown_key(tmp_path: Path) -> None:
    """The lint above can fail: a misspelt key is reported (systemd still exits 0)."""
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    out = _verify(_lint_root(tmp_path, broken))
    assert "Unknown key 'NoNewPrivilege'" in out


def test_verify_checks_the_exec_start_binary(tmp_path: Path) -> None:
    """Without the stub the ExecStart path is missing and verify says so: the check is real."""
    out = _verify(_lint_root(tmp_path, UNIT.read_text(), stub_exec=False))
    assert EXEC_START in out
    assert "not executable" in out


def test_security_exposure_stays_within_threshold(tmp_path: Path) -> None:
    score = _exposure(_lint_root(tmp_path, UNIT.read_text()))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, (
        f"exposure {score} > {MAX_EXPOSURE}: a hardening setting was lost or weakened"
    )


def test_security_score_rises_without_hardening(tmp_path: Path) -> None:
    """The score reacts to the unit: dropping ProtectSystem/NoNewPrivileges makes it worse."""
    weaker = (
        UNIT.read_text()
        .replace("ProtectSystem=strict\n", "")
        .replace("NoNewPrivileges=yes\n", "")
        .replace("CapabilityBoundingSet=\n", "")
    )
    assert _exposure(_lint_root(tmp_path, weaker)) > MAX_EXPOSURE


def test_unit_declares_the_required_service_contract() -> None:
    s = _unit_settings()
    assert s["Service.Type"] == ["notify"]
    assert s["Service.NotifyAccess"] == ["main"]
    assert s["Service.ExecStart"] == [f"{EXEC_START} run --config /etc/edge-agent/agent.toml"]
    assert s["Service.Restart"] == ["on-failure"]
    assert s["Service.WatchdogSec"][0]
    assert s["Unit.StartLimitBurst"][0].isdigit()
    assert s["Unit.StartLimitIntervalSec"][0]
    assert s["Service.StateDirectory"] == ["edge-agent"]
    assert "CPUAffinity" in {k.split(".", 1)[1] for k in s}
    assert {v.split(":", 1)[0] for v in s["Service.LoadCredential"]} >= {"mqtt-password"}
    assert s["Service.ProtectSystem"] == ["strict"]
    assert s["Service.NoNewPrivileges"] == ["yes"]
    assert s["Service.DevicePolicy"] == ["closed"]
    assert "Service.PrivateDevices" not in s, "PrivateDevices= would hide the cameras and GPU"
    allowed = {v.split()[0] for v in s["Service.DeviceAllow"]}
    assert allowed >= {"char-video4linux", "char-nvhost*", "/dev/nvmap", "char-hidg"}
    assert "video" in " ".join(s["Service.SupplementaryGroups"]).split()
    assert set(s["Service.RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }


def test_sysusers_entry_creates_the_unit_user(tmp_path: Path) -> None:
    """systemd-sysusers applies the entry to an empty root: the unit's User= and Group= exist."""
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.fail("systemd-sysusers not found: install the `systemd` package")
    settings = _unit_settings()
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(
        [tool, f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = users[settings["Service.User"][0]]
    assert settings["Service.Group"][0] in groups
    assert user[6].endswith("nologin"), "no login shell"
    assert int(user[2]) < 1000, "a system user"
