"""Read edge-agent HID reports on the host side and print the decoded results.

Reads 64-byte reports (docs/hid-protocol.md) from a hidraw node — or from a FIFO/pty standing
in for one — checks each report's CRC and sequence number, reassembles multi-report messages
and prints one line per message: human-readable, or one JSON object per line with ``--json``.
Lost, reordered and corrupt reports are reported on stderr and in the closing statistics.
With ``--keyboard LAYOUT`` it reads the keyboard function's 8-byte reports instead and prints
the text they type.

Examples::

    python tools/hid_reader.py --list                     # hidraw nodes of edge-agent gadgets
    python tools/hid_reader.py /dev/hidraw3               # decoded results, until Ctrl-C
    python tools/hid_reader.py /dev/hidraw3 --json --count 10
    python tools/hid_reader.py /dev/hidraw4 --keyboard de # what the keyboard wedge types
    mkfifo /tmp/hidg0 && python tools/hid_reader.py /tmp/hidg0 --json   # agent writes the FIFO

On Linux the host's user needs read access to the hidraw node (a udev rule such as
deploy/usb-gadget/72-edge-agent-hidraw.rules, or run as root).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.errors import HidFrameError  # noqa: E402
from agent.hid.keyboard import KEY_REPORT_SIZE, LAYOUTS  # noqa: E402
from agent.hid.protocol import (  # noqa: E402
    REPORT_SIZE,
    Kind,
    Message,
    Reassembler,
    decode_announce,
    decode_detections,
    decode_frame,
    decode_json,
    decode_text,
)

GADGET_VID_PID = ("1D6B", "0104")
SYSFS_HIDRAW = Path("/sys/class/hidraw")


class Resync:
    """Cuts a byte stream into 64-byte reports, sliding byte by byte past a bad CRC.

    hidraw hands over whole reports, so this only matters for FIFOs/ptys (a report cut off
    by its deadline) and corrupt data: the first bad chunk is passed on (the reassembler
    counts it as corrupt), then the window slides until a report checks out again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._resyncing = False
        self.skipped_bytes = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buf += data
        while len(self._buf) >= REPORT_SIZE:
            chunk = bytes(self._buf[:REPORT_SIZE])
            try:
                decode_frame(chunk)
            except HidFrameError:
                if not self._resyncing:
                    self._resyncing = True
                    yield chunk
                del self._buf[:1]
                self.skipped_bytes += 1
                continue
            self._resyncing = False
            del self._buf[:REPORT_SIZE]
            yield chunk


class Decoder:
    """Reassembled messages -> printable records (labels learnt from announce messages)."""

    def __init__(self) -> None:
        self.streams: dict[int, tuple[str, dict[int, str]]] = {}

    def record(self, msg: Message) -> dict[str, Any]:
        kind = Kind(msg.kind) if msg.kind in Kind._value2member_map_ else None
        if kind is Kind.ANNOUNCE:
            stream, topic, labels = decode_announce(msg.payload)
            self.streams[stream] = (topic, labels)
            return {"kind": "announce", "stream": stream, "topic": topic, "labels": labels}
        if kind is Kind.DETECTIONS:
            s = decode_detections(msg.payload)
            topic, labels = self.streams.get(s.stream, (None, {}))
            return {
                "kind": "detections",
                "seq": msg.first_seq,
                "stream": s.stream,
                "topic": topic,
                "frame_index": s.frame_index,
                "total": s.total,
                "counts": {labels.get(c, str(c)): n for c, n in s.counts},
                "boxes": [
                    {
                        "class_id": b.class_id,
                        "label": labels.get(b.class_id, str(b.class_id)),
                        "score": round(b.score, 3),
                        "box_norm": [round(v, 3) for v in b.box],
                    }
                    for b in s.boxes
                ],
                "more_boxes": s.more_boxes,
                "more_classes": s.more_classes,
            }
        if kind is Kind.TEXT:
            topic, text = decode_text(msg.payload)
            return {"kind": "text", "seq": msg.first_seq, "topic": topic, "text": text}
        if kind is Kind.JSON:
            obj = decode_json(msg.payload)
            return {"kind": "json", "seq": msg.first_seq, "topic": obj.pop("topic", None),
                    "message": obj}  # fmt: skip
        return {"kind": f"unknown({msg.kind})", "seq": msg.first_seq, "bytes": len(msg.payload)}


def human(rec: Mapping[str, Any]) -> str:
    kind = rec["kind"]
    if kind == "detections":
        counts = ", ".join(f"{k} {v}" for k, v in rec["counts"].items()) or "nothing"
        more = "+" if rec["more_classes"] else ""
        boxes = "; ".join(
            f"{b['label']} {b['score']:.2f} [{' '.join(f'{v:.2f}' for v in b['box_norm'])}]"
            for b in rec["boxes"]
        )
        return (
            f"[{rec['seq']}] {rec['topic'] or 'stream ' + str(rec['stream'])} frame "
            f"{rec['frame_index']}: {rec['total']} ({counts}{more})"
            + (f" | {boxes}" if boxes else "")
        )
    if kind == "announce":
        labels = ", ".join(f"{k}={v}" for k, v in sorted(rec["labels"].items()))
        return f"stream {rec['stream']} = {rec['topic']} (labels: {labels or 'none yet'})"
    if kind == "text":
        return f"[{rec['seq']}] {rec['topic']}: {rec['text']}"
    if kind == "json":
        return f"[{rec['seq']}] {rec['topic']}: {json.dumps(rec['message'], ensure_ascii=False)}"
    return f"[{rec.get('seq')}] {kind}"


def keyboard_text(reports: bytes, layout: str) -> str:
    """The characters that boot-keyboard ``reports`` type under ``layout``."""
    inverse = {(s.modifiers, s.keycode): ch for ch, s in LAYOUTS[layout].table.items()}
    out: list[str] = []
    for i in range(0, len(reports) - KEY_REPORT_SIZE + 1, KEY_REPORT_SIZE):
        mods, _, *keys = reports[i : i + KEY_REPORT_SIZE]
        out.extend(inverse.get((mods, k), f"<{mods:#04x}:{k:#04x}>") for k in keys if k)
    return "".join(out)


def list_hidraw(sysfs: Path = SYSFS_HIDRAW) -> list[tuple[str, str]]:
    """``(/dev/hidrawN, HID_NAME)`` of hidraw nodes whose device is the edge-agent gadget."""
    found = []
    for node in sorted(sysfs.glob("hidraw*")):
        try:
            uevent = (node / "device" / "uevent").read_text()
        except OSError:
            continue
        fields = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
        parts = fields.get("HID_ID", "").split(":")
        if len(parts) == 3 and (parts[1][-4:].upper(), parts[2][-4:].upper()) == GADGET_VID_PID:
            found.append((f"/dev/{node.name}", fields.get("HID_NAME", "")))
    return found


def _emit(rec: Mapping[str, Any], as_json: bool, out: TextIO) -> None:
    out.write((json.dumps(rec, ensure_ascii=False) if as_json else human(rec)) + "\n")
    out.flush()


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        fd = os.open(args.device, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        err.write(f"hid_reader: cannot open {args.device}: {exc.strerror} — check the path "
                  "(--list) and read permission\n")  # fmt: skip
        return 2
    stop = {"now": False}

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    reasm, resync, decoder = Reassembler(), Resync(), Decoder()
    messages = 0
    kb_buf = b""
    lost_seen = 0
    idle_ms = int(args.idle_timeout * 1000) if args.idle_timeout else None
    try:
        while not stop["now"] and (args.count is None or messages < args.count):
            ready, _, _ = select.select([fd], [], [], (idle_ms / 1000) if idle_ms else 0.5)
            if not ready:
                if idle_ms:
                    break
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                err.write(f"hid_reader: read failed: {exc.strerror} (device unplugged?)\n")
                return 1
            if not data:
                break  # EOF: the writer closed the FIFO
            if args.keyboard:
                kb_buf += data
                whole = len(kb_buf) - len(kb_buf) % KEY_REPORT_SIZE
                text = keyboard_text(kb_buf[:whole], args.keyboard)
                kb_buf = kb_buf[whole:]
                if text:
                    out.write(text)
                    out.flush()
                continue
            for report in resync.feed(data):
                if args.count is not None and messages >= args.count:
                    break
                msg = reasm.feed(report)
                if reasm.stats.lost > lost_seen:
                    err.write(f"hid_reader: {reasm.last_error}\n")
                    lost_seen = reasm.stats.lost
                if msg is None:
                    continue
                try:
                    rec = decoder.record(msg)
                except HidFrameError as exc:
                    err.write(f"hid_reader: undecodable message {msg.msg_id}: {exc}\n")
                    continue
                if rec["kind"] != "announce" or args.announce:
                    _emit(rec, args.json, out)
                    messages += 1
    finally:
        os.close(fd)
    if not args.keyboard:
        stats = {**reasm.stats.as_dict(), "skipped_bytes": resync.skipped_bytes}
        err.write("hid_reader: " + json.dumps({"stats": stats}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="examples:\n  hid_reader.py --list\n  hid_reader.py /dev/hidraw3 --json\n"
        "  hid_reader.py /dev/hidraw4 --keyboard us\n  hid_reader.py /tmp/hidg0.fifo --count 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("device", nargs="?", help="hidraw node, FIFO or pty to read reports from")
    parser.add_argument("--list", action="store_true", help="list edge-agent hidraw nodes")
    parser.add_argument("--json", action="store_true", help="one JSON object per message")
    parser.add_argument("--announce", action="store_true", help="print announce messages too")
    parser.add_argument("--count", type=int, help="stop after this many messages")
    parser.add_argument(
        "--idle-timeout", type=float, help="stop after this many seconds without data"
    )
    parser.add_argument(
        "--keyboard", choices=sorted(LAYOUTS), help="read 8-byte keyboard reports, print text"
    )
    args = parser.parse_args(argv)
    if args.list:
        nodes = list_hidraw()
        for path, name in nodes:
            print(f"{path}\t{name}")
        if not nodes:
            print("no edge-agent HID gadget found (is the board plugged in and set up?)",
                  file=sys.stderr)  # fmt: skip
        return 0 if nodes else 1
    if not args.device:
        parser.error("name a device (e.g. /dev/hidraw3) or use --list")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
