#!/usr/bin/env bash
# Set up the edge-agent USB HID gadget through configfs (libcomposite): the board becomes a USB
# device on its OTG/device port with
#   hid.usb0  vendor-defined HID interface, 64-byte input/output reports  -> /dev/hidg0
#   hid.usb1  boot keyboard (optional, --keyboard), 8-byte reports        -> /dev/hidg1
# The report descriptors are the bytes of agent/hid/descriptor.py (tests/hid keep them equal);
# docs/hid-protocol.md documents both and the report protocol.
#
# Usage (as root):
#   edge-agent-gadget.sh [--keyboard] [--udc NAME] [--vid 0x1d6b] [--pid 0x0104]
#                        [--serial STR] [--product STR] [--name edge-agent]
#   edge-agent-gadget-teardown.sh [--name edge-agent]
#
# Boards (the port must be in device/peripheral mode and a UDC must exist in /sys/class/udc):
#   Raspberry Pi 4 / 5 (USB-C power port), Zero / Zero 2 W (the "USB" data port, not PWR):
#     /boot/firmware/config.txt (/boot/config.txt before Bookworm):  dtoverlay=dwc2,dr_mode=peripheral
#     and load the module: echo dwc2 >> /etc/modules   (then reboot)
#     A Pi 4/5 powered from the same USB-C port needs a host port that supplies enough current.
#   Jetson Orin (AGX: USB-C J40 flashing port; Orin Nano/NX devkit: the USB-C port): JetPack's
#     nv-l4t-usb-device-mode.service already owns the UDC with its own gadget ("l4t"); stop it
#     first: systemctl disable --now nv-l4t-usb-device-mode   (this script refuses a busy UDC).
# Permissions: /dev/hidg* are root:root 0600 from the kernel; deploy/systemd/70-edge-agent.rules
#   gives them to group edge-agent (0660) so the service user can write them.
# Boot: deploy/usb-gadget/edge-agent-gadget.service runs this before edge-agent.service.
#
# Environment overrides (tests, unusual systems): CONFIGFS (default /sys/kernel/config),
# UDC_CLASS (default /sys/class/udc), MODPROBE (default modprobe; "true" skips it).
set -euo pipefail

# agent/hid/descriptor.py VENDOR_REPORT_DESCRIPTOR and KEYBOARD_REPORT_DESCRIPTOR
VENDOR_DESC="06 00 ff 09 01 a1 01 15 00 26 ff 00 75 08 95 40 19 01 29 40 81 02 95 40 19 01 29 40 91 02 c0"
KEYBOARD_DESC="05 01 09 06 a1 01 05 07 19 e0 29 e7 15 00 25 01 75 01 95 08 81 02 95 01 75 08 81 03 95 05 75 01 05 08 19 01 29 05 91 02 95 01 75 03 91 03 95 06 75 08 15 00 25 65 05 07 19 00 29 65 81 00 c0"
VENDOR_REPORT_LENGTH=64
KEYBOARD_REPORT_LENGTH=8

CONFIGFS=${CONFIGFS:-/sys/kernel/config}
UDC_CLASS=${UDC_CLASS:-/sys/class/udc}
MODPROBE=${MODPROBE:-modprobe}

name=edge-agent
udc=""
keyboard=0
vid=0x1d6b          # Linux Foundation
pid=0x0104          # Multifunction Composite Gadget
serial=""
product="edge-agent HID"
manufacturer="edge-agent"

die() { echo "edge-agent-gadget: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --keyboard) keyboard=1 ;;
        --udc) udc=${2:?--udc needs a name}; shift ;;
        --vid) vid=${2:?--vid needs a value}; shift ;;
        --pid) pid=${2:?--pid needs a value}; shift ;;
        --serial) serial=${2:?--serial needs a value}; shift ;;
        --product) product=${2:?--product needs a value}; shift ;;
        --name) name=${2:?--name needs a value}; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

[[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name must be letters, digits, _ . -"
if [ -z "$serial" ]; then
    serial=$({ cut -c1-16 < /etc/machine-id; } 2>/dev/null || true)
    serial=${serial:-0000000000000001}
fi

"$MODPROBE" libcomposite || die "cannot load libcomposite (kernel built without USB gadget configfs?)"
[ -d "$CONFIGFS/usb_gadget" ] || die "$CONFIGFS/usb_gadget missing: mount configfs (mount -t configfs none $CONFIGFS)"

G="$CONFIGFS/usb_gadget/$name"
[ -e "$G" ] && die "gadget $name already exists: run edge-agent-gadget-teardown.sh --name $name first"

# The UDC: the one named, else the only/first one present.
if [ -z "$udc" ]; then
    for u in "$UDC_CLASS"/*; do
        [ -e "$u" ] || continue
        udc=$(basename "$u")
        break
    done
fi
if [ -z "$udc" ]; then
    model=$({ tr -d '\0' < /proc/device-tree/model; } 2>/dev/null || true)
    case "$model" in
        *Raspberry*) hint="enable dtoverlay=dwc2,dr_mode=peripheral in config.txt, add dwc2 to /etc/modules, reboot" ;;
        *Jetson*|*NVIDIA*) hint="the USB-C device port needs JetPack's tegra-xudc driver (modprobe tegra-xudc)" ;;
        *) hint="load the board's device-controller driver (dwc2, dwc3, tegra-xudc, ...)" ;;
    esac
    die "no USB device controller in $UDC_CLASS ($model): $hint"
fi
[ -e "$UDC_CLASS/$udc" ] || die "no UDC named $udc in $UDC_CLASS (present: $(ls "$UDC_CLASS" | tr '\n' ' '))"
for other in "$CONFIGFS"/usb_gadget/*/UDC; do
    [ -f "$other" ] || continue
    if [ "$(cat "$other")" = "$udc" ]; then
        owner=$(basename "$(dirname "$other")")
        die "UDC $udc is used by gadget '$owner' (Jetson: systemctl disable --now nv-l4t-usb-device-mode; else edge-agent-gadget-teardown.sh --name $owner)"
    fi
done

write_desc() {  # hex bytes -> one binary write (configfs takes an attribute in a single write)
    local out="" b
    for b in $1; do out+="\\x$b"; done
    printf "$out" > "$2"
}

mkdir "$G"
trap 'echo "edge-agent-gadget: setup failed; undo with edge-agent-gadget-teardown.sh --name $name" >&2' ERR
echo "$vid" > "$G/idVendor"
echo "$pid" > "$G/idProduct"
echo 0x0100 > "$G/bcdDevice"
echo 0x0200 > "$G/bcdUSB"
mkdir -p "$G/strings/0x409"
echo "$serial" > "$G/strings/0x409/serialnumber"
echo "$manufacturer" > "$G/strings/0x409/manufacturer"
echo "$product" > "$G/strings/0x409/product"

mkdir -p "$G/configs/c.1/strings/0x409"
echo "edge-agent HID" > "$G/configs/c.1/strings/0x409/configuration"
echo 250 > "$G/configs/c.1/MaxPower"
echo 0x80 > "$G/configs/c.1/bmAttributes"

F="$G/functions/hid.usb0"  # vendor interface: the report protocol
mkdir -p "$F"
echo 0 > "$F/protocol"
echo 0 > "$F/subclass"
echo "$VENDOR_REPORT_LENGTH" > "$F/report_length"
write_desc "$VENDOR_DESC" "$F/report_desc"
ln -s "$F" "$G/configs/c.1/"

if [ "$keyboard" = 1 ]; then
    K="$G/functions/hid.usb1"  # boot keyboard: the keyboard wedge
    mkdir -p "$K"
    echo 1 > "$K/protocol"   # keyboard
    echo 1 > "$K/subclass"   # boot interface
    echo "$KEYBOARD_REPORT_LENGTH" > "$K/report_length"
    write_desc "$KEYBOARD_DESC" "$K/report_desc"
    ln -s "$K" "$G/configs/c.1/"
fi

echo "$udc" > "$G/UDC"
trap - ERR

node_of() {  # functions/<f>/dev holds MAJOR:MINOR; /dev/hidg<MINOR> is its node
    local dev
    dev=$(cat "$1/dev" 2>/dev/null || true)
    if [ -n "$dev" ]; then echo "/dev/hidg${dev#*:}"; else echo "/dev/hidg?"; fi
}
echo "edge-agent-gadget: $name bound to $udc ($vid:$pid serial $serial)"
echo "  vendor HID (64-byte reports): $(node_of "$F")"
if [ "$keyboard" = 1 ]; then echo "  keyboard (boot protocol):     $(node_of "$K")"; fi
