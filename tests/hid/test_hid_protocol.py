"""The report protocol: framing round trips (property-based), corruption, loss, reordering."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import HidFrameError, HidPayloadError
from agent.hid.protocol import (
    FRAGMENT_PAYLOAD_BYTES,
    MAX_BOXES,
    MAX_COUNTS,
    MAX_FRAGMENTS,
    MAX_MESSAGE_BYTES,
    REPORT_SIZE,
    Encoder,
    Frame,
    Kind,
    Reassembler,
    crc16,
    decode_announce,
    decode_detections,
    decode_frame,
    decode_json,
    decode_text,
    encode_announce,
    encode_detections,
    encode_frame,
    encode_json,
    encode_text,
)

payloads = st.binary(min_size=0, max_size=2000)
kinds = st.sampled_from(list(Kind))


def test_crc16_is_ccitt_false() -> None:
    assert crc16(b"123456789") == 0x29B1  # the catalogue check value of CRC-16/CCITT-FALSE


def test_frame_layout_is_the_documented_one() -> None:
    report = encode_frame(Frame(kind=2, seq=0x1234, msg_id=7, frag_index=1, frag_count=3,
                                payload=b"abc"))  # fmt: skip
    assert len(report) == REPORT_SIZE
    assert report[0] == 1  # version
    assert report[1] == 2  # kind
    assert struct.unpack_from("<HHHH", report, 2) == (0x1234, 7, 1, 3)
    assert report[10] == 3  # payload length
    assert report[11] == 0  # flags
    assert report[12:15] == b"abc"
    assert report[15:62] == bytes(47)  # zero padding
    assert struct.unpack_from("<H", report, 62)[0] == crc16(report[:62])


@given(kind=kinds, payload=payloads, seq=st.integers(0, 65535), msg=st.integers(0, 65535))
def test_round_trip(kind: Kind, payload: bytes, seq: int, msg: int) -> None:
    reports = Encoder(first_seq=seq, first_msg_id=msg).encode(kind, payload)
    assert all(len(r) == REPORT_SIZE for r in reports)
    assert len(reports) == max(1, -(-len(payload) // FRAGMENT_PAYLOAD_BYTES))
    frames = [decode_frame(r) for r in reports]
    assert [f.seq for f in frames] == [(seq + i) % 65536 for i in range(len(reports))]
    assert {f.msg_id for f in frames} == {msg}
    reasm = Reassembler()
    got = reasm.feed_all(reports)
    assert len(got) == 1
    assert got[0].kind == kind
    assert got[0].payload == payload
    assert got[0].msg_id == msg
    assert reasm.stats.as_dict() == {"reports": len(reports), "messages": 1, "lost": 0,
                                     "reordered": 0, "corrupt": 0, "incomplete": 0}  # fmt: skip


@given(
    messages=st.lists(st.tuples(kinds, payloads), min_size=1, max_size=8),
    seq=st.integers(0, 65535),
)
def test_stream_of_messages_round_trips_across_seq_wrap(
    messages: list[tuple[Kind, bytes]], seq: int
) -> None:
    enc = Encoder(first_seq=seq)
    stream = [r for kind, p in messages for r in enc.encode(kind, p)]
    got = Reassembler().feed_all(stream)
    assert [(m.kind, m.payload) for m in got] == messages


@given(
    payload=st.binary(min_size=1, max_size=400),
    index=st.integers(0, REPORT_SIZE - 1),
    bit=st.integers(0, 7),
)
def test_any_single_bit_flip_is_detected(payload: bytes, index: int, bit: int) -> None:
    reports = Encoder().encode(Kind.JSON, payload)
    victim = bytearray(reports[0])
    victim[index] ^= 1 << bit
    with pytest.raises(HidFrameError):
        decode_frame(bytes(victim))
    reasm = Reassembler()
    got = reasm.feed_all([bytes(victim), *reports[1:]])
    assert got == []
    assert reasm.stats.corrupt == 1
    if len(reports) > 1:
        assert reasm.stats.incomplete == 1
        assert reasm.stats.lost == 0  # the corrupt report was seen (and counted) as corrupt


@settings(max_examples=200)
@given(
    messages=st.lists(st.binary(min_size=0, max_size=300), min_size=3, max_size=10),
    data=st.data(),
)
def test_lost_reports_are_counted_and_never_spliced(
    messages: list[bytes], data: st.DataObject
) -> None:
    enc = Encoder()
    per_message = [enc.encode(Kind.TEXT, p) for p in messages]
    stream = [r for m in per_message for r in m]
    # the first and last reports always arrive, so every gap is between two seen reports
    drop = data.draw(st.sets(st.integers(1, len(stream) - 2), min_size=1, max_size=len(stream) - 2))
    kept = [r for i, r in enumerate(stream) if i not in drop]
    reasm = Reassembler()
    got = reasm.feed_all(kept)
    assert reasm.stats.lost == len(drop)
    # exactly the messages none of whose reports were lost come out, intact and in order
    first = 0
    intact = []
    for m, reps in zip(messages, per_message, strict=True):
        if not any(i in drop for i in range(first, first + len(reps))):
            intact.append(m)
        first += len(reps)
    assert [m.payload for m in got] == intact
    assert reasm.stats.messages + reasm.stats.incomplete <= len(messages)


@given(messages=st.lists(st.binary(min_size=1, max_size=200), min_size=2, max_size=6),
       data=st.data())  # fmt: skip
def test_reordered_reports_are_detected(messages: list[bytes], data: st.DataObject) -> None:
    enc = Encoder()
    stream = [r for p in messages for r in enc.encode(Kind.JSON, p)]
    i = data.draw(st.integers(0, len(stream) - 2))
    swapped = [*stream[:i], stream[i + 1], stream[i], *stream[i + 2 :]]
    reasm = Reassembler()
    got = reasm.feed_all(swapped)
    assert reasm.stats.reordered == 1  # the late one is dropped ...
    # ... after the jump over it was counted as a gap (unless it jumped the very first report:
    # then the reader simply started one report in)
    assert reasm.stats.lost == (1 if i > 0 else 0)
    assert len(got) < len(messages)


def test_repeated_report_is_dropped() -> None:
    reports = Encoder().encode(Kind.TEXT, b"x" * 120)
    reasm = Reassembler()
    got = reasm.feed_all([reports[0], reports[0], reports[1], reports[2]])
    assert reasm.stats.reordered == 1
    assert [m.payload for m in got] == [b"x" * 120]


def test_payload_larger_than_protocol_allows() -> None:
    enc = Encoder()
    assert len(enc.encode(Kind.TEXT, bytes(MAX_MESSAGE_BYTES))) == MAX_FRAGMENTS
    with pytest.raises(HidPayloadError, match=r"larger than the HID protocol allows \(65535"):
        enc.encode(Kind.TEXT, bytes(MAX_MESSAGE_BYTES + 1))
    with pytest.raises(HidPayloadError, match="exceeds 50"):
        encode_frame(Frame(kind=1, seq=0, msg_id=0, frag_index=0, frag_count=1, payload=bytes(51)))


def resign(body: bytes) -> bytes:
    """``body`` (62 bytes) with a valid CRC: the check after the CRC must catch the problem."""
    return body + struct.pack("<H", crc16(body))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[:63], "63 bytes"),
        (lambda r: resign(b"\x02" + r[1:62]), "version 2"),
        (lambda r: resign(r[:10] + b"\x33" + r[11:62]), "length 51"),
        (lambda r: resign(r[:6] + struct.pack("<HH", 3, 3) + r[10:62]), "fragment 3/3"),
    ],
)
def test_bad_reports_have_one_line_errors(mutate: object, message: str) -> None:
    report = Encoder().encode(Kind.TEXT, b"hi")[0]
    with pytest.raises(HidFrameError, match=message):
        decode_frame(mutate(report))  # type: ignore[operator]


boxes = st.tuples(*[st.floats(0, 1)] * 4)
detection = st.fixed_dictionaries(
    {"class_id": st.integers(0, 0xFFFF), "score": st.floats(0, 1), "box_norm": boxes}
)


@given(
    dets=st.lists(detection, max_size=300),
    stream=st.integers(0, 255),
    frame=st.integers(0, 2**40),
)
def test_detection_summary_round_trip(
    dets: list[dict[str, object]], stream: int, frame: int
) -> None:
    payload = encode_detections(stream=stream, frame_index=frame, detections=dets)
    assert len(payload) <= FRAGMENT_PAYLOAD_BYTES  # always one report
    s = decode_detections(payload)
    assert (s.stream, s.frame_index) == (stream, frame % 2**32)
    assert s.total == min(len(dets), 255)
    assert s.total_saturated == (len(dets) > 255)
    per_class: dict[int, int] = {}
    for d in dets:
        per_class[d["class_id"]] = per_class.get(d["class_id"], 0) + 1  # type: ignore[index]
    want = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_COUNTS]
    assert list(s.counts) == [(c, min(n, 255)) for c, n in want]
    assert s.more_classes == (len(per_class) > MAX_COUNTS)
    assert len(s.boxes) <= MAX_BOXES
    assert s.more_boxes == (len(s.boxes) < len(dets))
    for got, sent in zip(s.boxes, dets, strict=False):
        assert got.class_id == sent["class_id"]
        assert abs(got.score - sent["score"]) <= 0.5 / 255 + 1e-9  # type: ignore[operator]
        for a, b in zip(got.box, sent["box_norm"], strict=True):  # type: ignore[call-overload]
            assert abs(a - b) <= 0.5 / 255 + 1e-9


def test_detection_summary_fits_five_boxes_with_one_class() -> None:
    dets = [{"class_id": 0, "score": 0.5, "box_norm": (0, 0, 1, 1)}] * 7
    s = decode_detections(encode_detections(stream=0, frame_index=1, detections=dets))
    assert (len(s.counts), len(s.boxes), s.more_boxes) == (1, 5, True)


def test_detection_out_of_range_is_an_error() -> None:
    with pytest.raises(HidPayloadError, match="16 bits"):
        encode_detections(
            stream=0,
            frame_index=0,
            detections=[{"class_id": 70000, "score": 1, "box_norm": (0,) * 4}],
        )
    with pytest.raises(HidPayloadError, match="stream number 256"):
        encode_detections(stream=256, frame_index=0, detections=[])


@given(topic=st.text(max_size=60).filter(lambda t: len(t.encode()) <= 255), text=st.text())
def test_text_round_trip(topic: str, text: str) -> None:
    assert decode_text(encode_text(topic, text)) == (topic, text)


@given(
    message=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k != "topic"),
        st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.none()),
        max_size=8,
    )
)
def test_json_round_trip(message: dict[str, object]) -> None:
    assert decode_json(encode_json("a/b", message)) == {"topic": "a/b", **message}


def test_announce_round_trip_and_bad_payloads() -> None:
    payload = encode_announce(3, "vision/x/detections", {2: "car", 0: "person"})
    assert decode_announce(payload) == (3, "vision/x/detections", {0: "person", 2: "car"})
    with pytest.raises(HidFrameError, match="not UTF-8 JSON"):
        decode_json(b"\xff")
    with pytest.raises(HidFrameError, match="not an object"):
        decode_json(b"[1]")
    with pytest.raises(HidPayloadError, match="not JSON-serialisable"):
        encode_json("t", {"x": float("nan")})
    with pytest.raises(HidFrameError, match="too short"):
        decode_detections(b"\x00")
