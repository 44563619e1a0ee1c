"""Report descriptors checked by an independent parser (hid-parser from PyPI), and the configfs
gadget script: it writes exactly these descriptors, and refuses bad set-ups with one line."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import hid_parser
import pytest

from agent.hid.descriptor import (
    KEYBOARD_REPORT_DESCRIPTOR,
    KEYBOARD_REPORT_SIZE,
    VENDOR_REPORT_DESCRIPTOR,
    VENDOR_USAGE_PAGE,
    main,
)
from agent.hid.keyboard import LAYOUTS, key_reports
from agent.hid.protocol import REPORT_SIZE

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "deploy" / "usb-gadget" / "edge-agent-gadget.sh"
TEARDOWN = ROOT / "deploy" / "usb-gadget" / "edge-agent-gadget-teardown.sh"


def parse(desc: bytes) -> hid_parser.ReportDescriptor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compliance warning is a failure here
        return hid_parser.ReportDescriptor(list(desc))


def test_vendor_descriptor_declares_64_byte_input_and_output() -> None:
    rd = parse(VENDOR_REPORT_DESCRIPTOR)
    assert rd.input_report_ids == [None]  # no report IDs: a report is exactly 64 bytes
    assert rd.output_report_ids == [None]
    assert rd.feature_report_ids == []
    assert int(rd.get_input_report_size()) == REPORT_SIZE * 8
    assert int(rd.get_output_report_size()) == REPORT_SIZE * 8
    items = rd.get_input_items()
    assert len(items) == REPORT_SIZE
    assert {int(i.usage) >> 16 for i in items} == {VENDOR_USAGE_PAGE}
    assert all(int(i.size) == 8 and i.data and i.absolute for i in items)


def test_vendor_report_is_64_consecutive_bytes() -> None:
    rd = parse(VENDOR_REPORT_DESCRIPTOR)
    for items in (rd.get_input_items(), rd.get_output_items()):
        assert [int(i.offset) for i in items] == [8 * n for n in range(REPORT_SIZE)]
        assert [int(i.usage) & 0xFFFF for i in items] == list(range(1, REPORT_SIZE + 1))


def bit(report: bytes, offset_bits: int) -> int:
    """HID reports are little-endian bit fields: bit n of byte n // 8 (spec 5.8)."""
    return (report[offset_bits // 8] >> (offset_bits % 8)) & 1


def usage_name(usage: hid_parser.Usage) -> str:
    """The parser's name of a usage: ``Usage(page=..., usage=NAME)`` -> ``NAME``."""
    return str(usage).split("usage=", 1)[1][:-1]


def test_keyboard_descriptor_is_the_boot_keyboard() -> None:
    """Where the parser places each field, the wedge's reports carry the right values."""
    rd = parse(KEYBOARD_REPORT_DESCRIPTOR)
    assert int(rd.get_input_report_size()) == KEYBOARD_REPORT_SIZE * 8
    assert int(rd.get_output_report_size()) == 8  # the LED byte
    items = rd.get_input_items()
    modifiers = {usage_name(i.usage): int(i.offset) for i in items[:8]}
    keys = items[-1]
    assert isinstance(keys, hid_parser.ArrayItem)
    assert (int(keys.offset), int(keys.size), keys.count) == (16, 8, 6)
    usage_ids = {usage_name(u): n for n, u in enumerate(keys.usages)}
    for text, mod, key in [("A", "Keyboard LeftShift", "Keyboard a and A"),
                           ("a", None, "Keyboard a and A"),
                           ("?", "Keyboard LeftShift", "Keyboard / and ?"),
                           ("\n", None, "Keyboard Return (ENTER)")]:  # fmt: skip
        press, release = key_reports(LAYOUTS["us"].strokes(text))
        set_mods = {name for name, off in modifiers.items() if bit(press, off)}
        assert set_mods == ({mod} if mod else set()), text
        assert press[int(keys.offset) // 8] == usage_ids[key], text
        assert release == bytes(KEYBOARD_REPORT_SIZE)
    press, _ = key_reports(LAYOUTS["de"].strokes("@"))  # AltGr+Q on a German host
    assert {name for name, off in modifiers.items() if bit(press, off)} == {"Keyboard RightAlt"}
    assert press[2] == usage_ids["Keyboard q and Q"]


def test_descriptor_cli_prints_hex(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vendor"]) == 0
    assert bytes.fromhex(capsys.readouterr().out.strip()) == VENDOR_REPORT_DESCRIPTOR
    assert main(["mouse"]) == 2


@pytest.fixture
def configfs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A directory tree standing in for configfs + /sys/class/udc (no gadget stack here)."""
    (tmp_path / "cfg" / "usb_gadget").mkdir(parents=True)
    (tmp_path / "udc" / "fe980000.usb").mkdir(parents=True)
    env = {
        **os.environ,
        "CONFIGFS": str(tmp_path / "cfg"),
        "UDC_CLASS": str(tmp_path / "udc"),
        "MODPROBE": "true",
    }
    return env, tmp_path / "cfg" / "usb_gadget"


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_gadget_script_writes_these_descriptors(configfs: tuple[dict[str, str], Path]) -> None:
    env, gadgets = configfs
    proc = run(SETUP, env, "--keyboard", "--serial", "cam17")
    assert proc.returncode == 0, proc.stderr
    g = gadgets / "edge-agent"
    vendor, kb = g / "functions" / "hid.usb0", g / "functions" / "hid.usb1"
    assert (vendor / "report_desc").read_bytes() == VENDOR_REPORT_DESCRIPTOR
    assert (vendor / "report_length").read_text().strip() == str(REPORT_SIZE)
    assert (kb / "report_desc").read_bytes() == KEYBOARD_REPORT_DESCRIPTOR
    assert (kb / "report_length").read_text().strip() == str(KEYBOARD_REPORT_SIZE)
    assert (kb / "protocol").read_text().strip() == "1"
    assert (vendor / "protocol").read_text().strip() == "0"
    assert (g / "configs" / "c.1" / "hid.usb0").resolve() == vendor.resolve()
    assert (g / "configs" / "c.1" / "hid.usb1").is_symlink()
    assert (g / "UDC").read_text().strip() == "fe980000.usb"
    assert (g / "idVendor").read_text().strip() == "0x1d6b"
    assert (g / "strings" / "0x409" / "serialnumber").read_text().strip() == "cam17"


def test_gadget_script_without_keyboard(configfs: tuple[dict[str, str], Path]) -> None:
    env, gadgets = configfs
    assert run(SETUP, env).returncode == 0
    assert not (gadgets / "edge-agent" / "functions" / "hid.usb1").exists()


def test_gadget_script_refusals_are_one_line(
    configfs: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, gadgets = configfs
    (gadgets / "l4t").mkdir()
    (gadgets / "l4t" / "UDC").write_text("fe980000.usb\n")
    proc = run(SETUP, env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        (
            "edge-agent-gadget: UDC fe980000.usb is used by gadget 'l4t' (Jetson: systemctl "
            "disable --now nv-l4t-usb-device-mode; else edge-agent-gadget-teardown.sh --name l4t)"
        )
    ]
    proc = run(SETUP, env, "--udc", "nope.usb")
    assert proc.returncode == 1
    assert "no UDC named nope.usb" in proc.stderr
    (tmp_path / "udc" / "fe980000.usb").rmdir()
    proc = run(SETUP, env)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no USB device controller" in proc.stderr
    assert run(SETUP, env, "--bogus").stderr.startswith("edge-agent-gadget: unknown option")


def test_teardown_scripts_parse_and_handle_absent_gadget(
    configfs: tuple[dict[str, str], Path],
) -> None:
    env, _ = configfs
    for script in (SETUP, TEARDOWN):
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    proc = run(TEARDOWN, env)
    assert proc.returncode == 0
    assert "nothing to do" in proc.stdout
