"""Keyboard wedge: types a template as boot-keyboard reports, for hosts that only take keystrokes.

A HID keyboard sends key *positions* (usage IDs of the Keyboard/Keypad page, named after the US
layout); the host's layout setting turns them into characters. So the text to type is mapped
through a table of the layout the host uses: ``LAYOUTS["us"]`` and ``LAYOUTS["de"]`` (German
T1: QWERTZ, umlauts, AltGr for ``@ { [ ] } \\ | ~ €``). Dead keys (circumflex, acute and
grave on German) are left out: typing them would compose with the next character.

Each character becomes two 8-byte reports: press ``[modifiers, 0, key, 0, 0, 0, 0, 0]`` then
release (all zero), so repeated characters are seen as separate presses.

Rate limit: a token bucket over characters (``chars_per_s`` refill, ``burst_chars`` capacity).
A message is typed whole or not at all: one that does not fit the budget is dropped and
counted (``rate_limited``), never cut in the middle of a line. A character the layout lacks
drops the message with a one-line error naming it (``unmappable``).

Template fields: ``{topic} {pipeline} {source} {frame_index} {total} {text}`` per message; a
template using any of ``{label} {class_id} {count}`` is typed once per class of the message's
``counts`` (most frequent first), e.g. ``"{label} {count}\\n"`` -> ``"person 3\\nbicycle 1\\n"``.
"""

from __future__ import annotations

import logging
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.commands.ratelimit import TokenBucket
from agent.errors import HidPayloadError
from agent.hid.filters import topic_matches

__all__ = [
    "KEY_REPORT_SIZE",
    "LAYOUTS",
    "MOD_ALTGR",
    "MOD_SHIFT",
    "KeyboardLayout",
    "KeyboardWedge",
    "Stroke",
    "Template",
    "check_template",
    "key_reports",
]

_log = logging.getLogger(__name__)

KEY_REPORT_SIZE = 8
MOD_SHIFT = 0x02  # left shift
MOD_ALTGR = 0x40  # right alt

MESSAGE_FIELDS = ("topic", "pipeline", "source", "frame_index", "total", "text")
CLASS_FIELDS = ("label", "class_id", "count")

KEY_ENTER = 0x28
KEY_TAB = 0x2B
KEY_SPACE = 0x2C


@dataclass(frozen=True)
class Stroke:
    """One key press: modifier bits and a Keyboard/Keypad usage ID."""

    modifiers: int
    keycode: int


def _letters(table: dict[str, Stroke], swap_yz: bool) -> None:
    for i, ch in enumerate(string.ascii_lowercase):
        code = 0x04 + i
        if swap_yz and ch in "yz":
            code = 0x1C if ch == "z" else 0x1D
        table[ch] = Stroke(0, code)
        table[ch.upper()] = Stroke(MOD_SHIFT, code)


def _common(table: dict[str, Stroke]) -> None:
    for i, ch in enumerate("1234567890"):
        table[ch] = Stroke(0, 0x1E + i)
    table["\n"] = Stroke(0, KEY_ENTER)
    table["\t"] = Stroke(0, KEY_TAB)
    table[" "] = Stroke(0, KEY_SPACE)


def _keys(table: dict[str, Stroke], modifiers: int, pairs: Mapping[str, int]) -> None:
    for ch, code in pairs.items():
        table[ch] = Stroke(modifiers, code)


def _us() -> dict[str, Stroke]:
    table: dict[str, Stroke] = {}
    _letters(table, swap_yz=False)
    _common(table)
    _keys(table, MOD_SHIFT, {ch: 0x1E + i for i, ch in enumerate("!@#$%^&*()")})
    plain = {"-": 0x2D, "=": 0x2E, "[": 0x2F, "]": 0x30, "\\": 0x31, ";": 0x33, "'": 0x34}
    plain |= {"`": 0x35, ",": 0x36, ".": 0x37, "/": 0x38}
    shifted = {"_": 0x2D, "+": 0x2E, "{": 0x2F, "}": 0x30, "|": 0x31, ":": 0x33, '"': 0x34}
    shifted |= {"~": 0x35, "<": 0x36, ">": 0x37, "?": 0x38}
    _keys(table, 0, plain)
    _keys(table, MOD_SHIFT, shifted)
    return table


def _de() -> dict[str, Stroke]:
    table: dict[str, Stroke] = {}
    _letters(table, swap_yz=True)
    _common(table)
    _keys(table, MOD_SHIFT, {ch: 0x1E + i for i, ch in enumerate('!"§$%&/()=')})
    plain = {"ß": 0x2D, "ü": 0x2F, "+": 0x30, "#": 0x32, "ö": 0x33, "ä": 0x34}
    plain |= {",": 0x36, ".": 0x37, "-": 0x38, "<": 0x64}
    shifted = {"?": 0x2D, "Ü": 0x2F, "*": 0x30, "'": 0x32, "Ö": 0x33, "Ä": 0x34, "°": 0x35}
    shifted |= {";": 0x36, ":": 0x37, "_": 0x38, ">": 0x64}
    altgr = {"²": 0x1F, "³": 0x20, "{": 0x24, "[": 0x25, "]": 0x26, "}": 0x27, "\\": 0x2D}
    altgr |= {"@": 0x14, "€": 0x08, "µ": 0x10, "~": 0x30, "|": 0x64}
    _keys(table, 0, plain)
    _keys(table, MOD_SHIFT, shifted)
    _keys(table, MOD_ALTGR, altgr)
    return table


class KeyboardLayout:
    """Character -> key stroke table of one host keyboard layout."""

    def __init__(self, name: str, table: Mapping[str, Stroke]) -> None:
        self.name = name
        self.table = dict(table)

    def strokes(self, text: str) -> list[Stroke]:
        """The strokes typing ``text``; ``HidPayloadError`` lists characters the layout lacks."""
        missing = sorted({ch for ch in text if ch not in self.table})
        if missing:
            shown = ", ".join(repr(ch) for ch in missing)
            raise HidPayloadError(
                f"keyboard layout {self.name!r} cannot type {shown} — change the template or "
                "reporting.hid.keyboard.layout"
            )
        return [self.table[ch] for ch in text]


LAYOUTS: Mapping[str, KeyboardLayout] = {
    "us": KeyboardLayout("us", _us()),
    "de": KeyboardLayout("de", _de()),
}


def key_reports(strokes: Sequence[Stroke]) -> list[bytes]:
    """Press and release reports (8 bytes each) for ``strokes``."""
    release = bytes(KEY_REPORT_SIZE)
    out: list[bytes] = []
    for s in strokes:
        out.append(bytes([s.modifiers, 0, s.keycode, 0, 0, 0, 0, 0]))
        out.append(release)
    return out


class Template:
    """A checked ``str.format`` template over message (and per-class) fields."""

    def __init__(self, template: str) -> None:
        names: set[str] = set()
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"keyboard template {template!r}: {exc}") from exc
        for _, field, _, _ in parsed:
            if field is None:
                continue
            if field not in MESSAGE_FIELDS + CLASS_FIELDS:
                allowed = " ".join("{" + f + "}" for f in MESSAGE_FIELDS + CLASS_FIELDS)
                raise ValueError(f"keyboard template field {{{field}}} is unknown — use {allowed}")
            names.add(field)
        self.template = template
        self.per_class = bool(names & set(CLASS_FIELDS))
        try:
            self._format(_SAMPLE)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"keyboard template {template!r}: {exc}") from exc

    def _format(self, values: Mapping[str, Any]) -> str:
        return self.template.format_map(values)

    def render(self, topic: str, message: Mapping[str, Any]) -> str:
        detections = message.get("detections")
        base: dict[str, Any] = {
            "topic": topic,
            "pipeline": message.get("pipeline", ""),
            "source": message.get("source", ""),
            "frame_index": message.get("frame_index", 0),
            "total": len(detections) if isinstance(detections, list) else 0,
            "text": message.get("text", ""),
        }
        if not self.per_class:
            return self._format(base)
        counts = message.get("counts")
        if not isinstance(counts, Mapping):
            return ""
        ids: dict[str, int] = {}
        for det in detections if isinstance(detections, list) else []:
            if isinstance(det, Mapping):
                ids.setdefault(str(det.get("label")), int(det.get("class_id", 0)))
        ordered = sorted(counts.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
        return "".join(
            self._format(
                {**base, "label": label, "count": int(n), "class_id": ids.get(str(label), -1)}
            )
            for label, n in ordered
        )


_SAMPLE: Mapping[str, Any] = {
    "topic": "vision/p/detections",
    "pipeline": "p",
    "source": "s",
    "frame_index": 1,
    "total": 1,
    "text": "t",
    "label": "person",
    "class_id": 0,
    "count": 1,
}


def check_template(template: str) -> None:
    """``ValueError`` (one line) if ``template`` is not a usable wedge template."""
    Template(template)


class ReportSubmitter(Protocol):
    def submit(self, reports: Sequence[bytes]) -> bool: ...


class KeyboardWedge:
    """Renders messages on the configured topics and types them through ``writer``."""

    def __init__(
        self,
        *,
        layout: str,
        template: str,
        topics: Sequence[str],
        chars_per_s: float,
        burst_chars: int,
        writer: ReportSubmitter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if layout not in LAYOUTS:
            raise HidPayloadError(f"unknown keyboard layout {layout!r}: use {sorted(LAYOUTS)}")
        self.layout = LAYOUTS[layout]
        self.template = Template(template)
        self.topics = list(topics)
        self._writer = writer
        self._bucket = TokenBucket(chars_per_s, burst_chars, clock=clock)
        self._lock = threading.Lock()
        self.counters = {
            "messages_queued": 0,
            "chars_queued": 0,
            "dropped_unmappable": 0,
            "dropped_render": 0,
            "dropped_rate_limited": 0,
            "dropped_too_long": 0,
            "dropped_queue_full": 0,
        }
        self.last_error: str | None = None

    def wants(self, topic: str) -> bool:
        return any(topic_matches(p, topic) for p in self.topics)

    def offer(self, topic: str, message: Mapping[str, Any]) -> bool:
        """Type ``message`` if its topic is one of ours; True if it was queued for typing."""
        if not self.wants(topic):
            return False
        try:
            text = self.template.render(topic, message)
        except (ValueError, TypeError, KeyError) as exc:
            self._drop("dropped_render", f"template cannot render {topic!r}: {exc}")
            return False
        return self.type_text(text) if text else False

    def type_text(self, text: str) -> bool:
        """Queue ``text`` as keystrokes; False (counted, logged) when it is dropped."""
        try:
            reports = key_reports(self.layout.strokes(text))
        except HidPayloadError as exc:
            self._drop("dropped_unmappable", str(exc))
            return False
        n = len(text)
        if n > self._bucket.burst:
            self._drop(
                "dropped_too_long",
                f"{n} characters exceed reporting.hid.keyboard.burst_chars ({self._bucket.burst})",
            )
            return False
        if not self._bucket.take(n):
            with self._lock:
                self.counters["dropped_rate_limited"] += 1
            return False
        if not self._writer.submit(reports):
            with self._lock:
                self.counters["dropped_queue_full"] += 1
            return False
        with self._lock:
            self.counters["messages_queued"] += 1
            self.counters["chars_queued"] += n
        return True

    def _drop(self, counter: str, error: str) -> None:
        with self._lock:
            self.counters[counter] += 1
            self.last_error = error
        _log.warning("keyboard wedge dropped a message: %s", error)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"layout": self.layout.name, **self.counters, "last_error": self.last_error}
