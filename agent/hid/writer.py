"""The report writer: a bounded queue between publishers and one thread that owns a transport.

``submit(reports)`` never blocks: it queues a message (its reports, in order) or, when the
queue has no room for all of them, drops the message whole and counts it. The writer thread
hands each report to the transport with a deadline (``report_timeout_s``); a report the host
does not take in time is dropped together with the rest of its message, so a host that stops
polling costs the pipelines nothing and the reader sees a sequence gap, never a spliced
message. Messages that waited longer than ``max_age_s`` are dropped as stale when their turn
comes (a host that comes back gets fresh results, not a backlog).

Transports (``ReportTransport``): ``agent.hid.gadget.GadgetTransport`` (``/dev/hidgN``) and
``agent.hid.host.UsbHostTransport`` (pyusb). Their ``write`` never raises for device trouble:
it returns an ``Outcome``.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Outcome", "ReportTransport", "ReportWriter"]

_log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class Outcome(enum.Enum):
    """What became of one report."""

    OK = "ok"
    TIMEOUT = "timeout"  # the host did not take it before its deadline (stopped polling)
    NO_HOST = "no_host"  # not enumerated / unplugged / device node missing: dropped at once
    ERROR = "error"  # anything else (logged by the transport)


class ReportTransport(Protocol):
    """Where reports go: one call per report, bounded by ``deadline`` (``time.monotonic``)."""

    @property
    def target(self) -> str:
        """Human-readable destination, e.g. ``/dev/hidg0`` or ``usb 1d6b:0104 intf 0``."""
        ...

    def write(self, report: bytes, deadline: float) -> Outcome: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class _Queued:
    reports: Sequence[bytes]
    enqueued: float


_DROP_REASONS = ("queue_full", "stale", "timeout", "no_host", "error", "closed")


class ReportWriter:
    """Bounded, non-blocking report queue drained by one thread into a ``ReportTransport``."""

    def __init__(
        self,
        transport: ReportTransport,
        *,
        name: str,
        max_queued_reports: int = 512,
        report_timeout_s: float = 0.05,
        max_age_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queued_reports < 1 or report_timeout_s <= 0 or max_age_s <= 0:
            raise ValueError("report writer needs a queue >= 1 report and positive timeouts")
        self.transport = transport
        self.name = name
        self._max_reports = max_queued_reports
        self._timeout = report_timeout_s
        self._max_age = max_age_s
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._queued_reports = 0
        self._busy = False
        self._stop = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._counts: dict[str, int] = {
            "messages_submitted": 0,
            "messages_written": 0,
            "reports_written": 0,
            "messages_dropped": 0,
            "reports_dropped": 0,
        }
        self._drops = dict.fromkeys(_DROP_REASONS, 0)

    # -- publisher side ----------------------------------------------------------------------

    def submit(self, reports: Sequence[bytes]) -> bool:
        """Queue one message's reports; False (counted) if the queue has no room or closed."""
        if not reports:
            return True
        with self._cond:
            self._counts["messages_submitted"] += 1
            if self._closed:
                self._drop_locked("closed", len(reports))
                return False
            if self._queued_reports + len(reports) > self._max_reports:
                self._drop_locked("queue_full", len(reports))
                return False
            self._queue.append(_Queued(tuple(reports), self._clock()))
            self._queued_reports += len(reports)
            self._cond.notify_all()
            return True

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"hid-{self.name}", daemon=True)
            self._thread.start()

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every queued message was written or dropped."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float = 1.0) -> bool:
        """Send what is queued within ``timeout_s``, drop (count) the rest, stop, close the
        transport. True if the thread ended in time."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._stop = True
            while self._queue:
                self._drop_locked("closed", len(self._queue.popleft().reports))
            self._queued_reports = 0
            self._cond.notify_all()
            thread = self._thread
        ended = True
        if thread is not None:
            thread.join(max(timeout_s, self._timeout * 2))
            ended = not thread.is_alive()
            if not ended:
                _log.warning("HID writer %s did not stop in time", self.name)
        try:
            self.transport.close()
        except Exception:
            _log.exception("closing HID transport %s failed", self.transport.target)
            raise
        return ended

    def status(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = {
                "target": self.transport.target,
                "queued_reports": self._queued_reports,
                "queued_messages": len(self._queue),
                **self._counts,
                "dropped": dict(self._drops),
            }
        out["transport"] = self.transport.status()
        return out

    # -- writer thread -----------------------------------------------------------------------

    def _drop_locked(self, reason: str, reports: int) -> None:
        self._drops[reason] += 1
        self._counts["messages_dropped"] += 1
        self._counts["reports_dropped"] += reports

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait(_IDLE_WAIT_S)
                if self._stop:
                    return
                item = self._queue.popleft()
                self._queued_reports -= len(item.reports)
                self._busy = True
            try:
                self._send(item)
            except Exception:  # noqa: BLE001 - a transport bug must not kill the writer; logged
                _log.exception("HID writer %s: sending a message failed", self.name)
                with self._cond:
                    self._drop_locked("error", len(item.reports))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, item: _Queued) -> None:
        if self._clock() - item.enqueued > self._max_age:
            with self._cond:
                self._drop_locked("stale", len(item.reports))
            return
        for i, report in enumerate(item.reports):
            outcome = self.transport.write(report, time.monotonic() + self._timeout)
            if outcome is not Outcome.OK:
                with self._cond:
                    self._counts["reports_written"] += i
                    self._drop_locked(outcome.value, len(item.reports) - i)
                return
        with self._cond:
            self._counts["reports_written"] += len(item.reports)
            self._counts["messages_written"] += 1
