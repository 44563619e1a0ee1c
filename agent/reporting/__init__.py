"""Reporters: where results and status go (JSON Lines, MQTT, USB HID).

``open_reporting(config)`` builds every configured reporter and returns one ``ResultSink`` that
fans each message out to all of them. A reporter that fails to publish is logged with its
error and the others still get the message; only when every reporter failed does the fan-out
raise ``pipelines.errors.SinkError``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from agent.config import ReportingConfig
from agent.reporting.jsonl import JsonlSink
from pipelines.base import ResultSink
from pipelines.errors import SinkError

__all__ = ["FanoutSink", "JsonlSink", "open_reporting"]

_log = logging.getLogger(__name__)


class FanoutSink:
    """A ``ResultSink`` that hands each message to several sinks."""

    def __init__(self, sinks: Sequence[ResultSink]) -> None:
        self._sinks = list(sinks)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def sinks(self) -> list[ResultSink]:
        return list(self._sinks)

    def reporter_status(self) -> dict[str, Any]:
        """``status()`` of every reporter that has one (e.g. the HID reporter's drop counts),
        keyed by its class name."""
        out: dict[str, Any] = {}
        for sink in self._sinks:
            status = getattr(sink, "status", None)
            if callable(status):
                out[type(sink).__name__] = status()
        return out

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        with self._lock:
            if self._closed:
                raise SinkError("reporting is closed; cannot publish")
        errors = [
            e for e in (_publish_one(s, topic, message) for s in self._sinks) if e is not None
        ]
        if errors and len(errors) == len(self._sinks):
            raise SinkError(f"every reporter failed on {topic!r}: {errors[0]}") from errors[0]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors = [e for e in (_close_one(s) for s in reversed(self._sinks)) if e is not None]
        if errors:
            raise errors[0]


def _publish_one(sink: ResultSink, topic: str, message: Mapping[str, Any]) -> SinkError | None:
    try:
        sink.publish(topic, message)
    except SinkError as exc:
        _log.warning("reporter %s failed on %r: %s", type(sink).__name__, topic, exc)
        return exc
    return None


def _close_one(sink: ResultSink) -> Exception | None:
    try:
        sink.close()
    except Exception as exc:  # noqa: BLE001 - close the others, the caller re-raises the first
        _log.warning("closing reporter %s failed: %s", type(sink).__name__, exc)
        return exc
    return None


def open_reporting(config: ReportingConfig) -> FanoutSink:
    """Every reporter the config enables, behind one fan-out sink."""
    sinks: list[ResultSink] = []
    if config.jsonl is not None and config.jsonl.enabled:
        sinks.append(JsonlSink(config.jsonl.path))
    if config.hid is not None:
        from agent.reporting.hid import HidSink  # noqa: PLC0415 - only when HID is configured

        try:
            sinks.append(HidSink(config.hid))
        except BaseException:
            for sink in sinks:
                _close_one(sink)
            raise
    return FanoutSink(sinks)
