#!/usr/bin/env bash
# Remove the edge-agent USB HID gadget made by edge-agent-gadget.sh (as root).
#   edge-agent-gadget-teardown.sh [--name edge-agent]
# configfs needs the reverse order of creation: unbind the UDC, unlink the functions from the
# configuration, then remove the string, configuration, function and gadget directories (their
# attribute files go with them). Stop edge-agent first or its writes fail with ENODEV until the
# gadget is set up again (it then reopens /dev/hidgN by itself).
set -euo pipefail

CONFIGFS=${CONFIGFS:-/sys/kernel/config}
name=edge-agent
while [ $# -gt 0 ]; do
    case "$1" in
        --name) name=${2:?--name needs a value}; shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "edge-agent-gadget-teardown: unknown option $1" >&2; exit 1 ;;
    esac
    shift
done

G="$CONFIGFS/usb_gadget/$name"
if [ ! -d "$G" ]; then
    echo "edge-agent-gadget-teardown: no gadget $name (nothing to do)"
    exit 0
fi

if [ -s "$G/UDC" ]; then echo "" > "$G/UDC"; fi
for link in "$G"/configs/*/*; do
    if [ -L "$link" ]; then rm "$link"; fi
done
for d in "$G"/configs/*/strings/*; do [ -d "$d" ] && rmdir "$d"; done
for d in "$G"/configs/*; do [ -d "$d" ] && rmdir "$d"; done
for d in "$G"/functions/*; do [ -d "$d" ] && rmdir "$d"; done
for d in "$G"/strings/*; do [ -d "$d" ] && rmdir "$d"; done
rmdir "$G"
echo "edge-agent-gadget-teardown: removed $name"
