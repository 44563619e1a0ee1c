"""The edge-agent HID report protocol, version 1 (docs/hid-protocol.md is the reference).

Every report is exactly 64 bytes (no report ID), little-endian::

    off size field
     0   1   version      PROTOCOL_VERSION (1)
     1   1   kind         Kind: 1 detections, 2 text, 3 json, 4 announce
     2   2   seq          report sequence number: +1 per report, wraps at 65536
     4   2   msg_id       message number: +1 per message, wraps at 65536
     6   2   frag_index   0-based index of this report within its message
     8   2   frag_count   reports in the message (1 .. MAX_FRAGMENTS)
    10   1   length       payload bytes used in this report (0 .. 50)
    11   1   flags        reserved, 0
    12  50   payload      the message's bytes [frag_index*50 : +length], zero padded
    62   2   crc          CRC-16/CCITT-FALSE of bytes 0..61

A message (at most ``MAX_MESSAGE_BYTES``) is split into ``frag_count`` consecutive reports with
consecutive ``seq``; the receiver (``Reassembler``) detects lost reports (a forward jump of
``seq``), reordered or repeated ones (a backward step) and corrupted ones (CRC), and only hands
out messages whose every fragment arrived in order.

Detections payload (kind 1, always a single report, ``DETECTIONS_PAYLOAD_BYTES`` max)::

     0  u8   stream        topic number, named by an announce message
     1  u8   flags         bit0 more boxes than sent, bit1 more classes than sent,
                           bit2 total saturated at 255
     2  u32  frame_index   mod 2**32
     6  u8   total         detections in the frame (saturates at 255)
     7  u8   n_counts      C, class count entries that follow (0 .. 8)
     8  u8   n_boxes       B, box entries after the counts
     9  C x {u16 class_id, u8 count (saturates at 255)}
        B x {u16 class_id, u8 score*255, u8 x1*255, u8 y1*255, u8 x2*255, u8 y2*255}

Text payload (kind 2): ``u8 topic_length, topic (UTF-8), text (UTF-8)``. JSON payload (kind 3):
compact UTF-8 JSON ``{"topic": ..., **message}``. Announce payload (kind 4): compact JSON
``{"stream": n, "topic": ..., "labels": {"<class_id>": label}}``.
"""

from __future__ import annotations

import binascii
import enum
import json
import math
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import HidFrameError, HidPayloadError

__all__ = [
    "CRC_SIZE",
    "DETECTIONS_PAYLOAD_BYTES",
    "FRAGMENT_PAYLOAD_BYTES",
    "HEADER_SIZE",
    "MAX_BOXES",
    "MAX_COUNTS",
    "MAX_FRAGMENTS",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REPORT_SIZE",
    "BoxSummary",
    "DetectionSummary",
    "Encoder",
    "Frame",
    "Kind",
    "Message",
    "Reassembler",
    "crc16",
    "decode_announce",
    "decode_detections",
    "decode_frame",
    "decode_json",
    "decode_text",
    "encode_announce",
    "encode_detections",
    "encode_frame",
    "encode_json",
    "encode_text",
]

PROTOCOL_VERSION = 1
REPORT_SIZE = 64
HEADER_SIZE = 12
CRC_SIZE = 2
FRAGMENT_PAYLOAD_BYTES = REPORT_SIZE - HEADER_SIZE - CRC_SIZE  # 50
MAX_MESSAGE_BYTES = 65_535
MAX_FRAGMENTS = math.ceil(MAX_MESSAGE_BYTES / FRAGMENT_PAYLOAD_BYTES)  # 1311
DETECTIONS_PAYLOAD_BYTES = FRAGMENT_PAYLOAD_BYTES
MAX_COUNTS = 8
DETECTIONS_HEAD = 9
COUNT_ENTRY = 3
BOX_ENTRY = 7
MAX_BOXES = (DETECTIONS_PAYLOAD_BYTES - DETECTIONS_HEAD) // BOX_ENTRY  # 5
MAX_TOPIC_BYTES = 255

_HEADER = struct.Struct("<BBHHHHBB")
_CRC = struct.Struct("<H")
_DET_HEAD = struct.Struct("<BBIBBB")
_COUNT = struct.Struct("<HB")
_BOX = struct.Struct("<HBBBBB")
_SEQ_MOD = 1 << 16

FLAG_MORE_BOXES = 0x01
FLAG_MORE_CLASSES = 0x02
FLAG_TOTAL_SATURATED = 0x04


class Kind(enum.IntEnum):
    """What a message's payload holds."""

    DETECTIONS = 1
    TEXT = 2
    JSON = 3
    ANNOUNCE = 4


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor).

    Check value: ``crc16(b"123456789") == 0x29B1``.
    """
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True)
class Frame:
    """One decoded 64-byte report."""

    kind: int
    seq: int
    msg_id: int
    frag_index: int
    frag_count: int
    payload: bytes
    version: int = PROTOCOL_VERSION
    flags: int = 0


def encode_frame(frame: Frame) -> bytes:
    """The 64 bytes of ``frame`` (header, zero-padded payload, CRC)."""
    if len(frame.payload) > FRAGMENT_PAYLOAD_BYTES:
        raise HidPayloadError(
            f"report payload of {len(frame.payload)} bytes exceeds {FRAGMENT_PAYLOAD_BYTES} — "
            "split the message with Encoder.encode"
        )
    if not 1 <= frame.frag_count <= MAX_FRAGMENTS or not 0 <= frame.frag_index < frame.frag_count:
        raise HidPayloadError(
            f"fragment {frame.frag_index}/{frame.frag_count} out of range (1..{MAX_FRAGMENTS})"
        )
    head = _HEADER.pack(
        frame.version,
        frame.kind,
        frame.seq % _SEQ_MOD,
        frame.msg_id % _SEQ_MOD,
        frame.frag_index,
        frame.frag_count,
        len(frame.payload),
        frame.flags,
    )
    body = head + frame.payload.ljust(FRAGMENT_PAYLOAD_BYTES, b"\0")
    return body + _CRC.pack(crc16(body))


def decode_frame(report: bytes) -> Frame:
    """Parse and check one report; ``HidFrameError`` names what is wrong with it."""
    if len(report) != REPORT_SIZE:
        raise HidFrameError(f"report of {len(report)} bytes, expected {REPORT_SIZE}")
    body = report[: REPORT_SIZE - CRC_SIZE]
    (crc,) = _CRC.unpack_from(report, REPORT_SIZE - CRC_SIZE)
    if crc16(body) != crc:
        raise HidFrameError(f"CRC mismatch (got {crc:#06x}, computed {crc16(body):#06x})")
    version, kind, seq, msg_id, frag_index, frag_count, length, flags = _HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise HidFrameError(
            f"protocol version {version}, this reader speaks {PROTOCOL_VERSION} — update it"
        )
    if length > FRAGMENT_PAYLOAD_BYTES:
        raise HidFrameError(f"payload length {length} > {FRAGMENT_PAYLOAD_BYTES}")
    if not 1 <= frag_count <= MAX_FRAGMENTS or frag_index >= frag_count:
        raise HidFrameError(f"fragment {frag_index}/{frag_count} out of range")
    return Frame(
        kind=kind,
        seq=seq,
        msg_id=msg_id,
        frag_index=frag_index,
        frag_count=frag_count,
        payload=bytes(body[HEADER_SIZE : HEADER_SIZE + length]),
        version=version,
        flags=flags,
    )


class Encoder:
    """Splits messages into reports, numbering reports (``seq``) and messages (``msg_id``).

    Thread-safe: each ``encode`` call takes the next numbers atomically, so the reports of one
    message always carry consecutive sequence numbers.
    """

    def __init__(self, *, first_seq: int = 0, first_msg_id: int = 0) -> None:
        self._lock = threading.Lock()
        self._seq = first_seq % _SEQ_MOD
        self._msg_id = first_msg_id % _SEQ_MOD

    def encode(self, kind: Kind | int, payload: bytes) -> list[bytes]:
        """The reports carrying ``payload``; ``HidPayloadError`` if it is over the limit."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise HidPayloadError(
                f"payload of {len(payload)} bytes is larger than the HID protocol allows "
                f"({MAX_MESSAGE_BYTES} bytes) — shorten it or lower reporting.hid.max_message_bytes"
            )
        count = max(1, math.ceil(len(payload) / FRAGMENT_PAYLOAD_BYTES))
        with self._lock:
            seq, msg_id = self._seq, self._msg_id
            self._seq = (seq + count) % _SEQ_MOD
            self._msg_id = (msg_id + 1) % _SEQ_MOD
        return [
            encode_frame(
                Frame(
                    kind=int(kind),
                    seq=(seq + i) % _SEQ_MOD,
                    msg_id=msg_id,
                    frag_index=i,
                    frag_count=count,
                    payload=payload[i * FRAGMENT_PAYLOAD_BYTES : (i + 1) * FRAGMENT_PAYLOAD_BYTES],
                )
            )
            for i in range(count)
        ]


@dataclass(frozen=True)
class Message:
    """A reassembled message."""

    kind: int
    msg_id: int
    first_seq: int
    payload: bytes


@dataclass
class ReassemblyStats:
    """What a ``Reassembler`` saw go wrong (all counters only grow)."""

    reports: int = 0
    messages: int = 0
    lost: int = 0
    reordered: int = 0
    corrupt: int = 0
    incomplete: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "reports": self.reports,
            "messages": self.messages,
            "lost": self.lost,
            "reordered": self.reordered,
            "corrupt": self.corrupt,
            "incomplete": self.incomplete,
        }


@dataclass
class _Partial:
    kind: int
    msg_id: int
    first_seq: int
    frag_count: int
    parts: list[bytes] = field(default_factory=list)


class Reassembler:
    """Turns a stream of reports back into messages, counting what went wrong.

    - ``lost``: reports missing before one that arrived (forward ``seq`` jump, mod 65536);
    - ``reordered``: reports whose ``seq`` is behind the last one (late or repeated), dropped;
    - ``corrupt``: reports that failed ``decode_frame`` (CRC, version, length), dropped;
    - ``incomplete``: messages abandoned because one of their fragments went missing.

    A forward jump of half the sequence space or more counts as a step back (reordered), the
    usual serial-number arithmetic.
    """

    def __init__(self) -> None:
        self.stats = ReassemblyStats()
        self._last_seq: int | None = None
        self._partial: _Partial | None = None
        self._orphan: tuple[int, int] | None = None  # (msg_id, frag_count) counted incomplete
        self.last_error: str | None = None

    def feed(self, report: bytes) -> Message | None:
        """Take one report; return the message it completes, if any."""
        self.stats.reports += 1
        try:
            frame = decode_frame(report)
        except HidFrameError as exc:
            self.stats.corrupt += 1
            self.last_error = str(exc)
            return None
        if self._last_seq is not None:
            step = (frame.seq - self._last_seq) % _SEQ_MOD
            if step == 0 or step >= _SEQ_MOD // 2:
                self.stats.reordered += 1
                self.last_error = f"report seq {frame.seq} after {self._last_seq}: out of order"
                return None
            if step > 1:
                self.stats.lost += step - 1
                self.last_error = f"{step - 1} report(s) lost before seq {frame.seq}"
        self._last_seq = frame.seq
        return self._add(frame)

    def feed_all(self, reports: Iterable[bytes]) -> list[Message]:
        return [m for m in (self.feed(r) for r in reports) if m is not None]

    def _add(self, frame: Frame) -> Message | None:
        partial = self._partial
        if partial is not None and not (
            frame.frag_index == len(partial.parts)
            and frame.msg_id == partial.msg_id
            and frame.frag_count == partial.frag_count
            and (frame.seq - partial.first_seq) % _SEQ_MOD == frame.frag_index
        ):
            self.stats.incomplete += 1
            self._orphan = (partial.msg_id, partial.frag_count)
            self._partial = partial = None
        if partial is None:
            if frame.frag_index != 0:
                # A tail whose head went missing: count its message once.
                if self._orphan != (frame.msg_id, frame.frag_count):
                    self.stats.incomplete += 1
                    self._orphan = (frame.msg_id, frame.frag_count)
                return None
            partial = _Partial(frame.kind, frame.msg_id, frame.seq, frame.frag_count)
            self._partial = partial
        partial.parts.append(frame.payload)
        if len(partial.parts) < partial.frag_count:
            return None
        self._partial = None
        self.stats.messages += 1
        return Message(partial.kind, partial.msg_id, partial.first_seq, b"".join(partial.parts))


# -- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxSummary:
    """One detection as carried in a detections report (quantised to 1/255)."""

    class_id: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class DetectionSummary:
    """A frame's detections as carried in one report."""

    stream: int
    frame_index: int
    total: int
    counts: tuple[tuple[int, int], ...]
    boxes: tuple[BoxSummary, ...]
    more_boxes: bool = False
    more_classes: bool = False
    total_saturated: bool = False


def _q8(value: float) -> int:
    if not math.isfinite(value):
        return 0
    return min(255, max(0, round(value * 255)))


def encode_detections(
    *,
    stream: int,
    frame_index: int,
    detections: Sequence[Mapping[str, Any]],
) -> bytes:
    """The single-report detections payload of one frame.

    ``detections`` are records as in ``pipelines.vision.results`` (``class_id``, ``score``,
    ``box_norm``), best first. Counts per class are computed from them (most frequent first,
    ties by class id); up to ``MAX_COUNTS`` classes are sent, then as many of the first boxes
    as fit in the rest of the report.
    """
    if not 0 <= stream <= 255:
        raise HidPayloadError(f"stream number {stream} out of range 0..255")
    per_class: dict[int, int] = {}
    for det in detections:
        cid = int(det["class_id"])
        if not 0 <= cid <= 0xFFFF:
            raise HidPayloadError(f"class_id {cid} does not fit the protocol's 16 bits")
        per_class[cid] = per_class.get(cid, 0) + 1
    ordered = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    counts = ordered[:MAX_COUNTS]
    room = DETECTIONS_PAYLOAD_BYTES - DETECTIONS_HEAD - COUNT_ENTRY * len(counts)
    n_boxes = min(len(detections), room // BOX_ENTRY)
    total = len(detections)
    flags = 0
    if n_boxes < len(detections):
        flags |= FLAG_MORE_BOXES
    if len(counts) < len(ordered):
        flags |= FLAG_MORE_CLASSES
    if total > 255:
        flags |= FLAG_TOTAL_SATURATED
    out = bytearray(
        _DET_HEAD.pack(
            stream, flags, frame_index % (1 << 32), min(total, 255), len(counts), n_boxes
        )
    )
    for cid, n in counts:
        out += _COUNT.pack(cid, min(n, 255))
    for det in detections[:n_boxes]:
        x1, y1, x2, y2 = (float(v) for v in det["box_norm"])
        out += _BOX.pack(
            int(det["class_id"]),
            _q8(float(det["score"])),
            _q8(x1),
            _q8(y1),
            _q8(x2),
            _q8(y2),
        )
    return bytes(out)


def decode_detections(payload: bytes) -> DetectionSummary:
    """Inverse of ``encode_detections`` (scores and boxes come back quantised)."""
    if len(payload) < DETECTIONS_HEAD:
        raise HidFrameError(f"detections payload of {len(payload)} bytes is too short")
    stream, flags, frame_index, total, n_counts, n_boxes = _DET_HEAD.unpack_from(payload)
    need = DETECTIONS_HEAD + COUNT_ENTRY * n_counts + BOX_ENTRY * n_boxes
    if len(payload) != need:
        raise HidFrameError(
            f"detections payload of {len(payload)} bytes, its header announces {need}"
        )
    offset = DETECTIONS_HEAD
    counts = []
    for _ in range(n_counts):
        counts.append(_COUNT.unpack_from(payload, offset))
        offset += COUNT_ENTRY
    boxes = []
    for _ in range(n_boxes):
        cid, score, x1, y1, x2, y2 = _BOX.unpack_from(payload, offset)
        offset += BOX_ENTRY
        boxes.append(BoxSummary(cid, score / 255, (x1 / 255, y1 / 255, x2 / 255, y2 / 255)))
    return DetectionSummary(
        stream=stream,
        frame_index=frame_index,
        total=total,
        counts=tuple((int(c), int(n)) for c, n in counts),
        boxes=tuple(boxes),
        more_boxes=bool(flags & FLAG_MORE_BOXES),
        more_classes=bool(flags & FLAG_MORE_CLASSES),
        total_saturated=bool(flags & FLAG_TOTAL_SATURATED),
    )


def _topic_bytes(topic: str) -> bytes:
    raw = topic.encode("utf-8")
    if len(raw) > MAX_TOPIC_BYTES:
        raise HidPayloadError(f"topic of {len(raw)} bytes exceeds {MAX_TOPIC_BYTES}")
    return raw


def encode_text(topic: str, text: str) -> bytes:
    """Text payload: ``u8 topic_length, topic, text`` (UTF-8)."""
    raw = _topic_bytes(topic)
    return bytes([len(raw)]) + raw + text.encode("utf-8")


def decode_text(payload: bytes) -> tuple[str, str]:
    """``(topic, text)`` of a text payload."""
    if not payload:
        raise HidFrameError("empty text payload")
    n = payload[0]
    if len(payload) < 1 + n:
        raise HidFrameError(f"text payload shorter than its topic length {n}")
    try:
        return payload[1 : 1 + n].decode("utf-8"), payload[1 + n :].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HidFrameError(f"text payload is not UTF-8: {exc}") from exc


def _dumps(obj: Mapping[str, Any]) -> bytes:
    # The same compact JSON as agent.reporting.jsonutil.compact_json, written out here:
    # importing agent.reporting from this module closes an import cycle
    # (agent.reporting -> agent.config -> agent.hid_config -> agent.hid.protocol).
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError) as exc:
        raise HidPayloadError(f"message is not JSON-serialisable: {exc}") from exc


def _loads(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HidFrameError(f"{what} payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise HidFrameError(f"{what} payload is a JSON {type(obj).__name__}, not an object")
    return obj


def encode_json(topic: str, message: Mapping[str, Any]) -> bytes:
    """JSON payload: ``{"topic": topic, **message}``, compact UTF-8."""
    return _dumps({"topic": topic, **message})


def decode_json(payload: bytes) -> dict[str, Any]:
    return _loads(payload, "JSON")


def encode_announce(stream: int, topic: str, labels: Mapping[int, str]) -> bytes:
    """Announce payload: which topic a stream number stands for, and its class labels."""
    return _dumps(
        {"stream": stream, "topic": topic, "labels": {str(k): v for k, v in sorted(labels.items())}}
    )


def decode_announce(payload: bytes) -> tuple[int, str, dict[int, str]]:
    obj = _loads(payload, "announce")
    try:
        labels = {int(k): str(v) for k, v in dict(obj.get("labels", {})).items()}
        return int(obj["stream"]), str(obj["topic"]), labels
    except (KeyError, TypeError, ValueError) as exc:
        raise HidFrameError(f"announce payload lacks stream/topic/labels: {exc}") from exc
