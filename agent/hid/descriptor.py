"""HID report descriptors of the two gadget functions (docs/hid-protocol.md shows them decoded).

``VENDOR_REPORT_DESCRIPTOR``: a vendor-defined collection (usage page 0xFF00, usage 0x01) with
one 64-byte input report (device to host: the protocol's reports) and one 64-byte output
report (host to device), no report IDs. Operating systems bind their generic HID driver to it
(hidraw on Linux, HidD/hidapi on Windows and macOS) and no keyboard/mouse driver claims it.

``KEYBOARD_REPORT_DESCRIPTOR``: the boot-protocol keyboard of the HID 1.11 specification
(appendix B.1): an 8-byte input report (modifier bits, reserved byte, six key codes) and a
1-byte LED output report — the layout the keyboard wedge writes.

``deploy/usb-gadget/edge-agent-gadget.sh`` writes the same bytes into configfs
(tests/hid/test_descriptor.py keeps the two in step); ``python -m agent.hid.descriptor vendor``
prints them as hex.
"""

from __future__ import annotations

import sys

from agent.hid.protocol import REPORT_SIZE

__all__ = [
    "KEYBOARD_REPORT_DESCRIPTOR",
    "KEYBOARD_REPORT_SIZE",
    "VENDOR_REPORT_DESCRIPTOR",
    "VENDOR_USAGE",
    "VENDOR_USAGE_PAGE",
]

VENDOR_USAGE_PAGE = 0xFF00
VENDOR_USAGE = 0x01
KEYBOARD_REPORT_SIZE = 8

VENDOR_REPORT_DESCRIPTOR = bytes(
    [
        0x06, 0x00, 0xFF,  # Usage Page (Vendor Defined 0xFF00)
        0x09, 0x01,        # Usage (0x01)
        0xA1, 0x01,        # Collection (Application)
        0x15, 0x00,        #   Logical Minimum (0)
        0x26, 0xFF, 0x00,  #   Logical Maximum (255)
        0x75, 0x08,        #   Report Size (8)
        0x95, REPORT_SIZE, #   Report Count (64)
        0x19, 0x01,        #   Usage Minimum (0x01)
        0x29, REPORT_SIZE, #   Usage Maximum (0x40): one usage per byte
        0x81, 0x02,        #   Input (Data, Variable, Absolute): device -> host
        0x95, REPORT_SIZE, #   Report Count (64)
        0x19, 0x01,        #   Usage Minimum (0x01)
        0x29, REPORT_SIZE, #   Usage Maximum (0x40)
        0x91, 0x02,        #   Output (Data, Variable, Absolute): host -> device
        0xC0,              # End Collection
    ]
)  # fmt: skip

KEYBOARD_REPORT_DESCRIPTOR = bytes(
    [
        0x05, 0x01,  # Usage Page (Generic Desktop)
        0x09, 0x06,  # Usage (Keyboard)
        0xA1, 0x01,  # Collection (Application)
        0x05, 0x07,  #   Usage Page (Keyboard/Keypad)
        0x19, 0xE0,  #   Usage Minimum (Left Control)
        0x29, 0xE7,  #   Usage Maximum (Right GUI)
        0x15, 0x00,  #   Logical Minimum (0)
        0x25, 0x01,  #   Logical Maximum (1)
        0x75, 0x01,  #   Report Size (1)
        0x95, 0x08,  #   Report Count (8)
        0x81, 0x02,  #   Input (Data, Variable, Absolute): modifier bits
        0x95, 0x01,  #   Report Count (1)
        0x75, 0x08,  #   Report Size (8)
        0x81, 0x03,  #   Input (Constant): reserved byte
        0x95, 0x05,  #   Report Count (5)
        0x75, 0x01,  #   Report Size (1)
        0x05, 0x08,  #   Usage Page (LEDs)
        0x19, 0x01,  #   Usage Minimum (Num Lock)
        0x29, 0x05,  #   Usage Maximum (Kana)
        0x91, 0x02,  #   Output (Data, Variable, Absolute): LED bits
        0x95, 0x01,  #   Report Count (1)
        0x75, 0x03,  #   Report Size (3)
        0x91, 0x03,  #   Output (Constant): padding
        0x95, 0x06,  #   Report Count (6)
        0x75, 0x08,  #   Report Size (8)
        0x15, 0x00,  #   Logical Minimum (0)
        0x25, 0x65,  #   Logical Maximum (101)
        0x05, 0x07,  #   Usage Page (Keyboard/Keypad)
        0x19, 0x00,  #   Usage Minimum (0)
        0x29, 0x65,  #   Usage Maximum (101)
        0x81, 0x00,  #   Input (Data, Array): six key codes
        0xC0,        # End Collection
    ]
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.hid.descriptor vendor|keyboard``: the descriptor as hex."""
    args = sys.argv[1:] if argv is None else argv
    table = {"vendor": VENDOR_REPORT_DESCRIPTOR, "keyboard": KEYBOARD_REPORT_DESCRIPTOR}
    if len(args) != 1 or args[0] not in table:
        sys.stderr.write("usage: python -m agent.hid.descriptor vendor|keyboard\n")
        return 2
    sys.stdout.write(table[args[0]].hex() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
