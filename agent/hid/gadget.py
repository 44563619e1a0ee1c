"""Gadget mode: reports written to a HID function's device node (``/dev/hidgN``).

The node is opened ``O_WRONLY | O_NONBLOCK``. One ``write`` of a whole report is one HID input
report; the kernel's f_hid function holds one report at a time until the host polls it, so a
second write meanwhile fails with ``EAGAIN``. ``write`` then waits in ``poll(POLLOUT)`` until
the report's deadline and gives up (``Outcome.TIMEOUT``): a host that stops polling never
holds the writer longer than that.

Errors and what they mean here:

- ``ESHUTDOWN`` — the function is not enabled: no host enumerated the gadget (cable out, host
  asleep). ``Outcome.NO_HOST`` at once, no waiting.
- ``ENOENT`` at open — the gadget is not set up (``deploy/usb-gadget/edge-agent-gadget.sh``);
  ``EACCES`` — the agent's user may not write it (the udev rule in deploy/). At start these raise
  ``HidDeviceError`` (one line naming the fix) unless ``wait_for_device``; later, the node is
  looked for again every ``reopen_interval_s`` and reports meanwhile are ``NO_HOST``.
- ``ENODEV``/``EPIPE``/``ENXIO``/``EIO`` — the node went away (gadget torn down) or, for a FIFO
  standing in for it, the reader left: the fd is closed and reopened later.

A FIFO or a pty can stand in for the node (tests, ``tools/hid_reader.py --fifo``): they are
byte streams, so a report may be written in parts; a report cut off by its deadline is counted
in ``partial_reports`` (the reader re-synchronises on the CRC).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import HidDeviceError
from agent.hid.writer import Outcome

__all__ = ["GadgetTransport"]

_log = logging.getLogger(__name__)

_GONE = {errno.ENODEV, errno.EPIPE, errno.ENXIO, errno.EIO, errno.EBADF, errno.ENOENT}


class GadgetTransport:
    """``ReportTransport`` writing fixed-size reports to a hidg node (or a FIFO/pty)."""

    def __init__(
        self,
        path: str | Path,
        report_size: int,
        *,
        wait_for_device: bool = False,
        reopen_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.report_size = report_size
        self._reopen_interval = reopen_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._next_open = 0.0
        self.state = "closed"
        self.last_error: str | None = None
        self.counters = {"opens": 0, "no_host": 0, "timeouts": 0, "partial_reports": 0}
        try:
            self._open()
        except HidDeviceError as exc:
            if not wait_for_device or self._permanent(exc):
                raise
            self._note("missing", str(exc))
            _log.warning("%s; reports are dropped until it appears", exc)

    @property
    def target(self) -> str:
        return str(self.path)

    @staticmethod
    def _permanent(exc: HidDeviceError) -> bool:
        return isinstance(exc.__cause__, PermissionError)

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError as exc:
            raise HidDeviceError(
                f"HID device {self.path} does not exist — set up the USB gadget "
                "(deploy/usb-gadget/edge-agent-gadget.sh setup) or fix reporting.hid device"
            ) from exc
        except PermissionError as exc:
            raise HidDeviceError(
                f"HID device {self.path} is not writable by this user — install "
                "deploy/systemd/70-edge-agent.rules (group edge-agent, mode 0660)"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO with no reader yet: like a host not there
                raise HidDeviceError(f"HID device {self.path}: no reader (ENXIO)") from exc
            raise HidDeviceError(f"HID device {self.path} cannot be opened: {exc}") from exc
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            os.close(fd)
            raise
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            os.close(fd)
            raise HidDeviceError(
                f"{self.path} is a regular file, not a HID device node — point reporting.hid "
                "at /dev/hidgN"
            )
        self._fd = fd
        self.counters["opens"] += 1
        self.state = "open"

    def _note(self, state: str, error: str | None) -> None:
        if state != self.state and error is not None:
            _log.info("HID %s: %s (%s)", self.path, state, error)
        self.state = state
        if error is not None:
            self.last_error = error

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as exc:
                _log.debug("closing %s: %s", self.path, exc)
            self._fd = None
        self._next_open = self._clock() + self._reopen_interval

    def _ensure_open(self) -> bool:
        if self._fd is not None:
            return True
        if self._clock() < self._next_open:
            return False
        try:
            self._open()
        except HidDeviceError as exc:
            self._next_open = self._clock() + self._reopen_interval
            self._note("missing", str(exc))
            return False
        return True

    def write(self, report: bytes, deadline: float) -> Outcome:
        if len(report) != self.report_size:
            self.last_error = f"report of {len(report)} bytes, device takes {self.report_size}"
            _log.error("HID %s: %s", self.path, self.last_error)
            return Outcome.ERROR
        with self._lock:
            if not self._ensure_open():
                self.counters["no_host"] += 1
                return Outcome.NO_HOST
            return self._write_locked(report, deadline)

    def _write_locked(self, report: bytes, deadline: float) -> Outcome:
        view = memoryview(report)
        done = 0
        poller = select.poll()
        fd = self._fd
        if fd is None:
            return Outcome.NO_HOST
        poller.register(fd, select.POLLOUT)
        while done < len(report):
            try:
                done += os.write(fd, view[done:])
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                return self._failed(exc, done)
            left = deadline - time.monotonic()
            if left <= 0:
                self.counters["timeouts"] += 1
                if done:
                    self.counters["partial_reports"] += 1
                self._note("stalled", "host is not taking reports (deadline passed)")
                return Outcome.TIMEOUT
            poller.poll(max(1, int(left * 1000)))
        self._note("open", None)
        return Outcome.OK

    def _failed(self, exc: OSError, done: int) -> Outcome:
        if done:
            self.counters["partial_reports"] += 1
        if exc.errno == errno.ESHUTDOWN:
            self.counters["no_host"] += 1
            self._note("no_host", "no USB host has enumerated the gadget (ESHUTDOWN)")
            return Outcome.NO_HOST
        if exc.errno in _GONE:
            self.counters["no_host"] += 1
            self._note(
                "missing", f"{os.strerror(exc.errno or 0)} ({errno.errorcode.get(exc.errno or 0)})"
            )
            self._drop_fd()
            return Outcome.NO_HOST
        self._note("error", f"write failed: {exc}")
        _log.error("HID %s write failed: %s", self.path, exc)
        return Outcome.ERROR

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "device": str(self.path),
                "state": self.state,
                **self.counters,
                "last_error": self.last_error,
            }

    def close(self) -> None:
        with self._lock:
            self._drop_fd()
            self.state = "closed"
