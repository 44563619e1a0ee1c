"""HID reporter: the ``ResultSink`` that turns results into 64-byte HID reports.

What goes out (docs/hid-protocol.md has the byte layouts):

- a message on a ``detection_topics`` topic carrying ``detections`` (the vision result of
  ``pipelines.vision.results``) -> one DETECTIONS report: class counts, the first boxes
  (quantised to 1/255 of the frame), the total; the topic is a one-byte stream number, named
  (with the class labels seen so far) by an ANNOUNCE message sent before the first summary,
  whenever a new class appears and every ``announce_interval_s``;
- a message on a ``text_topics`` topic (LLM results by default) -> its ``text_field`` as TEXT,
  split across as many reports as it needs;
- a message on a ``json_topics`` topic -> the whole message as compact JSON, split likewise;
- every other topic is ignored (counted in ``ignored``).

``publish`` never blocks and never raises for HID trouble: it encodes, queues the reports for
the writer thread (``agent.hid.writer.ReportWriter``) and returns. A payload over
``max_message_bytes``, a message that cannot be encoded, a full queue, a host that does not
poll, a missing device: each is a counted drop (``status()``), logged, and the pipeline goes
on. The optional keyboard wedge (``agent.hid.keyboard``) types the same messages on its own
gadget function.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import HidPayloadError
from agent.hid.filters import topic_matches
from agent.hid.gadget import GadgetTransport
from agent.hid.keyboard import KEY_REPORT_SIZE, KeyboardWedge
from agent.hid.protocol import (
    REPORT_SIZE,
    Encoder,
    Kind,
    encode_announce,
    encode_detections,
    encode_json,
    encode_text,
)
from agent.hid.writer import ReportTransport, ReportWriter
from agent.hid_config import HidConfig
from pipelines.errors import SinkError

__all__ = ["HidSink", "open_transport"]

_log = logging.getLogger(__name__)

MAX_STREAMS = 256


@dataclass
class _Stream:
    number: int
    labels: dict[int, str] = field(default_factory=dict)
    announced_at: float | None = None
    dirty: bool = True


def open_transport(config: HidConfig, *, usb_backend: Any = None) -> ReportTransport:
    """The vendor-interface transport the config names (``HidDeviceError`` if unusable)."""
    if config.mode == "host":
        from agent.hid.host import UsbHostTransport  # noqa: PLC0415 - pyusb only in host mode

        host = config.host
        if host is None:
            raise HidPayloadError("reporting.hid.mode = 'host' needs [reporting.hid.host]")
        return UsbHostTransport(
            host.vendor_id,
            host.product_id,
            interface=host.interface,
            serial=host.serial,
            transfer=host.transfer,
            report_id=host.report_id,
            detach_kernel_driver=host.detach_kernel_driver,
            reconnect_interval_s=host.reconnect_interval_s,
            wait_for_device=host.wait_for_device,
            backend=usb_backend,
        )
    return GadgetTransport(
        config.gadget.device, REPORT_SIZE, wait_for_device=config.gadget.wait_for_device
    )


class HidSink:
    """``pipelines.base.ResultSink`` reporting over USB HID (gadget or host mode)."""

    def __init__(
        self,
        config: HidConfig,
        *,
        transport: ReportTransport | None = None,
        keyboard_transport: ReportTransport | None = None,
        usb_backend: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._encoder = Encoder()
        self._streams: dict[str, _Stream] = {}
        self.counters = {
            "published": 0,
            "ignored": 0,
            "dropped_oversize": 0,
            "dropped_invalid": 0,
        }
        self.last_error: str | None = None
        vendor = (
            transport if transport is not None else open_transport(config, usb_backend=usb_backend)
        )
        self._writer = ReportWriter(
            vendor,
            name="vendor",
            max_queued_reports=config.queue_reports,
            report_timeout_s=config.report_timeout_ms / 1000,
            max_age_s=config.max_age_ms / 1000,
        )
        self._kb_writer: ReportWriter | None = None
        self._wedge: KeyboardWedge | None = None
        try:
            kb = config.keyboard
            if kb is not None:
                kb_transport = keyboard_transport or GadgetTransport(
                    kb.device, KEY_REPORT_SIZE, wait_for_device=kb.wait_for_device
                )
                self._kb_writer = ReportWriter(
                    kb_transport,
                    name="keyboard",
                    max_queued_reports=max(config.queue_reports, 4 * kb.burst_chars),
                    report_timeout_s=config.report_timeout_ms / 1000,
                    max_age_s=config.max_age_ms / 1000,
                )
                self._wedge = KeyboardWedge(
                    layout=kb.layout,
                    template=kb.template,
                    topics=kb.topics,
                    chars_per_s=kb.chars_per_s,
                    burst_chars=kb.burst_chars,
                    writer=self._kb_writer,
                    clock=clock,
                )
        except BaseException:
            vendor.close()
            raise
        self._writer.start()
        if self._kb_writer is not None:
            self._kb_writer.start()

    # -- ResultSink --------------------------------------------------------------------------

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        with self._lock:
            if self._closed:
                raise SinkError("HID reporter is closed; cannot publish")
            self.counters["published"] += 1
            try:
                self._route(topic, message)
            except HidPayloadError as exc:
                self.counters["dropped_invalid"] += 1
                self.last_error = f"{topic}: {exc}"
                _log.warning("HID reporter dropped a message on %r: %s", topic, exc)
        if self._wedge is not None:
            self._wedge.offer(topic, message)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[BaseException] = []
        for writer in (self._writer, self._kb_writer):
            if writer is None:
                continue
            try:
                writer.close(timeout_s=1.0)
            except Exception as exc:  # noqa: BLE001 - close the other, re-raise the first below
                _log.warning("closing HID writer %s failed: %s", writer.name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued report was written or dropped (tests, shutdown)."""
        ok = self._writer.flush(timeout_s)
        if self._kb_writer is not None:
            ok = self._kb_writer.flush(timeout_s) and ok
        return ok

    def status(self) -> dict[str, Any]:
        """Counters of this reporter and its writers, drops by reason included."""
        vendor = self._writer.status()
        with self._lock:
            out: dict[str, Any] = {
                "mode": self.config.mode,
                **self.counters,
                "streams": {t: s.number for t, s in self._streams.items()},
                "last_error": self.last_error,
                "vendor": vendor,
            }
        dropped = vendor["messages_dropped"] + sum(
            v for k, v in self.counters.items() if k.startswith("dropped_")
        )
        if self._kb_writer is not None and self._wedge is not None:
            kb = {**self._wedge.status(), "writer": self._kb_writer.status()}
            out["keyboard"] = kb
            dropped += kb["writer"]["messages_dropped"] + sum(
                v for k, v in kb.items() if k.startswith("dropped_") and isinstance(v, int)
            )
        out["dropped_total"] = dropped
        return out

    # -- routing -----------------------------------------------------------------------------

    def _route(self, topic: str, message: Mapping[str, Any]) -> None:
        cfg = self.config
        if any(topic_matches(p, topic) for p in cfg.detection_topics):
            detections = message.get("detections")
            if not isinstance(detections, list):
                raise HidPayloadError("a detections topic without a `detections` list")
            self._send_detections(topic, message, detections)
            return
        if any(topic_matches(p, topic) for p in cfg.text_topics):
            text = message.get(cfg.text_field)
            if not isinstance(text, str):
                raise HidPayloadError(f"no text in field {cfg.text_field!r}")
            self._send(Kind.TEXT, encode_text(topic, text), topic)
            return
        if any(topic_matches(p, topic) for p in cfg.json_topics):
            self._send(Kind.JSON, encode_json(topic, message), topic)
            return
        self.counters["ignored"] += 1

    def _send(self, kind: Kind, payload: bytes, topic: str) -> None:
        limit = self.config.max_message_bytes
        if len(payload) > limit:
            self.counters["dropped_oversize"] += 1
            self.last_error = (
                f"{topic}: payload of {len(payload)} bytes over reporting.hid.max_message_bytes "
                f"({limit})"
            )
            _log.warning("HID reporter dropped a message: %s", self.last_error)
            return
        self._writer.submit(self._encoder.encode(kind, payload))

    def _send_detections(
        self, topic: str, message: Mapping[str, Any], detections: list[Any]
    ) -> None:
        stream = self._streams.get(topic)
        if stream is None:
            if len(self._streams) >= MAX_STREAMS:
                raise HidPayloadError(f"more than {MAX_STREAMS} detection topics")
            stream = self._streams[topic] = _Stream(len(self._streams))
        try:
            for det in detections:
                cid = int(det["class_id"])
                label = str(det.get("label", cid))
                if stream.labels.get(cid) != label:
                    stream.labels[cid] = label
                    stream.dirty = True
            payload = encode_detections(
                stream=stream.number,
                frame_index=int(message.get("frame_index", 0)),
                detections=detections,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HidPayloadError(f"malformed detection record: {exc!r}") from exc
        now = self._clock()
        due = stream.announced_at is None or now - stream.announced_at >= (
            self.config.announce_interval_s
        )
        if stream.dirty or due:
            self._send(Kind.ANNOUNCE, encode_announce(stream.number, topic, stream.labels), topic)
            stream.announced_at = now
            stream.dirty = False
        self._writer.submit(self._encoder.encode(Kind.DETECTIONS, payload))
