"""Keyboard wedge: exact key sequences per layout, unknown characters, rate limit by counting."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from agent.errors import HidPayloadError
from agent.hid.keyboard import (
    LAYOUTS,
    MOD_ALTGR,
    MOD_SHIFT,
    KeyboardWedge,
    Stroke,
    Template,
    key_reports,
)
from agent.hid_config import HidConfig, HidKeyboardConfig

S, A = MOD_SHIFT, MOD_ALTGR

DETECTIONS = {
    "pipeline": "street",
    "source": "cam0",
    "frame_index": 7,
    "detections": [
        {"class_id": 0, "label": "person", "score": 0.9, "box_norm": [0, 0, 1, 1]},
        {"class_id": 2, "label": "car", "score": 0.8, "box_norm": [0, 0, 1, 1]},
        {"class_id": 0, "label": "person", "score": 0.7, "box_norm": [0, 0, 1, 1]},
    ],
    "counts": {"car": 1, "person": 2},
}


class Recorder:
    """Stands in for the ReportWriter (its queue is tested in test_hid_gadget.py)."""

    def __init__(self, accept: bool = True) -> None:
        self.messages: list[list[bytes]] = []
        self.accept = accept

    def submit(self, reports: Sequence[bytes]) -> bool:
        if self.accept:
            self.messages.append(list(reports))
        return self.accept


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def wedge(
    writer: Recorder, *, layout: str = "us", template: str = "{label} {count}\n",
    rate: float = 1000.0, burst: int = 1000, clock: Clock | None = None,
) -> KeyboardWedge:  # fmt: skip
    return KeyboardWedge(
        layout=layout, template=template, topics=["vision/+/detections"], chars_per_s=rate,
        burst_chars=burst, writer=writer, clock=clock or Clock(),
    )  # fmt: skip


def presses(reports: list[bytes]) -> list[tuple[int, int]]:
    """(modifiers, keycode) of each press; every press must be followed by a release."""
    out = []
    for press, release in zip(reports[::2], reports[1::2], strict=True):
        assert len(press) == 8
        assert press[1] == 0
        assert press[3:] == bytes(5)
        assert release == bytes(8)
        out.append((press[0], press[2]))
    return out


def test_us_template_types_exact_keys() -> None:
    rec = Recorder()
    assert wedge(rec).offer("vision/street/detections", DETECTIONS)
    # "person 2\ncar 1\n": most frequent class first
    p, e, r, s, o, n, c, a = 0x13, 0x08, 0x15, 0x16, 0x12, 0x11, 0x06, 0x04
    assert presses(rec.messages[0]) == [
        (0, p), (0, e), (0, r), (0, s), (0, o), (0, n), (0, 0x2C), (0, 0x1F), (0, 0x28),
        (0, c), (0, a), (0, r), (0, 0x2C), (0, 0x1E), (0, 0x28),
    ]  # fmt: skip


def test_us_shifted_symbols() -> None:
    us = LAYOUTS["us"]
    assert us.strokes('A!@"_~?') == [
        Stroke(S, 0x04), Stroke(S, 0x1E), Stroke(S, 0x1F), Stroke(S, 0x34), Stroke(S, 0x2D),
        Stroke(S, 0x35), Stroke(S, 0x38),
    ]  # fmt: skip


def test_de_layout_types_exact_keys() -> None:
    rec = Recorder()
    w = wedge(rec, layout="de", template="{text}")
    assert w.type_text("Zürich y @ 3€ {ß?} ä|\n")
    z, y = 0x1C, 0x1D  # QWERTZ: z and y swap places
    assert presses(rec.messages[0]) == [
        (S, z), (0, 0x2F), (0, 0x15), (0, 0x0C), (0, 0x06), (0, 0x0B), (0, 0x2C),
        (0, y), (0, 0x2C),
        (A, 0x14), (0, 0x2C),  # @ = AltGr+Q
        (0, 0x20), (A, 0x08), (0, 0x2C),  # 3, € = AltGr+E
        (A, 0x24), (0, 0x2D), (S, 0x2D), (A, 0x27), (0, 0x2C),  # { ß ? }
        (0, 0x34), (A, 0x64), (0, 0x28),  # ä | Enter
    ]  # fmt: skip


def test_same_text_differs_between_layouts() -> None:
    assert LAYOUTS["us"].strokes("z-") == [Stroke(0, 0x1D), Stroke(0, 0x2D)]
    assert LAYOUTS["de"].strokes("z-") == [Stroke(0, 0x1C), Stroke(0, 0x38)]


def test_repeated_characters_are_separate_presses() -> None:
    reports = key_reports(LAYOUTS["us"].strokes("ll"))
    assert reports == [bytes([0, 0, 0x0F, 0, 0, 0, 0, 0]), bytes(8)] * 2


@pytest.mark.parametrize(("layout", "text", "bad"), [("us", "naïve ü", "'ï', 'ü'"),
                                                    ("de", "2^3", "'^'"),
                                                    ("us", "€5", "'€'")])  # fmt: skip
def test_unknown_characters_are_a_counted_drop_with_clear_error(
    layout: str, text: str, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    want = re.escape(f"layout '{layout}' cannot type {bad} — change")
    with pytest.raises(HidPayloadError, match=want):
        LAYOUTS[layout].strokes(text)
    rec = Recorder()
    w = wedge(rec, layout=layout, template="{text}")
    assert not w.type_text(text)
    assert rec.messages == []
    st = w.status()
    assert st["dropped_unmappable"] == 1
    assert bad in st["last_error"]
    assert bad in caplog.text
    assert w.type_text("ok")  # the wedge goes on


def test_rate_limit_by_counting() -> None:
    """10 chars/s, burst 25, 10-char messages. t=0: two typed (5 tokens left), one dropped;
    t=0.5: 5 + 5 refilled = 10, one typed, one dropped; t=100: refill capped at the burst (25),
    two typed, one dropped. Checked by counting tokens against a fake clock, not by timing."""
    clock = Clock()
    rec = Recorder()
    w = wedge(rec, template="{text}", rate=10.0, burst=25, clock=clock)
    line = "abcdefghi\n"
    assert [w.type_text(line) for _ in range(3)] == [True, True, False]
    clock.t = 0.5  # 5 left + 5 refilled = 10
    assert [w.type_text(line) for _ in range(2)] == [True, False]
    clock.t = 100.0  # refill caps at the burst
    assert [w.type_text(line) for _ in range(3)] == [True, True, False]
    st = w.status()
    assert (st["messages_queued"], st["chars_queued"], st["dropped_rate_limited"]) == (5, 50, 3)
    assert len(rec.messages) == 5
    total_time = 100.0
    assert st["chars_queued"] <= 25 + 10 * total_time


def test_message_longer_than_burst_is_dropped() -> None:
    rec = Recorder()
    w = wedge(rec, template="{text}", burst=5)
    assert not w.type_text("too long")
    assert w.status()["dropped_too_long"] == 1


def test_full_writer_queue_is_counted() -> None:
    w = wedge(Recorder(accept=False), template="{text}")
    assert not w.type_text("x")
    assert w.status()["dropped_queue_full"] == 1


def test_topics_and_per_message_template() -> None:
    rec = Recorder()
    w = wedge(rec, template="{pipeline}/{source}#{frame_index}:{total}\n")
    assert not w.offer("llm/x/result", {"text": "hi"})  # not a wedge topic
    assert w.offer("vision/street/detections", DETECTIONS)
    typed = "".join(
        {(s.modifiers, s.keycode): ch for ch, s in LAYOUTS["us"].table.items()}[k]
        for k in presses(rec.messages[0])
    )
    assert typed == "street/cam0#7:3\n"


def test_per_class_template_without_counts_types_nothing() -> None:
    rec = Recorder()
    assert not wedge(rec).offer("vision/a/detections", {"detections": []})
    assert rec.messages == []


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{label.upper}", "field {label.upper} is unknown"),
        ("{nope}", "field {nope} is unknown"),
        ("{label", "expected '}'"),
        ("{count:d}{label:d}", "Unknown format code"),
    ],
)
def test_bad_templates_fail_config_validation(template: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Template(template)
    with pytest.raises(ValidationError, match="keyboard"):
        HidConfig.model_validate({"keyboard": {"template": template}})


def test_config_layouts_are_the_tables() -> None:
    literal = HidKeyboardConfig.model_fields["layout"].annotation
    assert set(literal.__args__) == set(LAYOUTS)  # type: ignore[union-attr]


def test_message_the_template_cannot_render_is_counted() -> None:
    rec = Recorder()
    w = wedge(rec, template="{count:>3}")
    bad = {**DETECTIONS, "counts": {"person": "many"}}  # count must be a number
    assert not w.offer("vision/street/detections", bad)
    assert w.status()["dropped_render"] == 1
    assert w.offer("vision/street/detections", DETECTIONS)  # the next one is typed
