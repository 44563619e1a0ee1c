"""Worker liveness and the systemd watchdog.

``Watchdog`` implements ``pipelines.base.Heartbeats``: worker threads ``register`` with the
interval they promise to beat within, then ``beat`` every loop iteration. When systemd asks for
watchdog pings (``WATCHDOG_USEC``, and ``WATCHDOG_PID`` naming this process if set), a pinger
thread sends ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` — but only while every *critical* worker
has beaten within its interval. A frozen worker therefore stops the pings, and systemd restarts
the service after ``WatchdogSec``. The pinger logs which worker went stale (once per episode).

The pinger blocks on the agent's stop event with a timeout; it never spins.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.notify import Notifier

__all__ = ["Watchdog", "WorkerState", "watchdog_interval_s"]

_log = logging.getLogger(__name__)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """systemd's watchdog timeout in seconds for this process, or None when not requested.

    ``WATCHDOG_USEC`` must be a positive integer; ``WATCHDOG_PID``, when set, must be our pid
    (otherwise the request is for another process, e.g. our parent).
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        _log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        _log.warning("ignoring WATCHDOG_USEC=%r: not positive", raw)
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        _log.debug("WATCHDOG_PID=%s is not this process (%d): no pings", pid, os.getpid())
        return None
    return usec / 1_000_000


@dataclass
class WorkerState:
    interval_s: float
    critical: bool
    last_beat: float
    beats: int = 0


class Watchdog:
    """Heartbeat registry plus the systemd watchdog pinger (thread-safe)."""

    def __init__(
        self,
        notifier: Notifier,
        timeout_s: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``timeout_s``: systemd's watchdog timeout (``watchdog_interval_s()``); None: no pings,
        liveness is still tracked for status."""
        self._notifier = notifier
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerState] = {}
        self._thread: threading.Thread | None = None
        self._stale_logged: frozenset[str] = frozenset()
        self.pings_sent = 0

    # -- Heartbeats protocol
    def register(self, worker: str, interval_s: float, *, critical: bool = True) -> None:
        if interval_s <= 0:
            raise ValueError(f"worker {worker!r}: heartbeat interval must be > 0")
        with self._lock:
            self._workers[worker] = WorkerState(interval_s, critical, self._clock())

    def beat(self, worker: str) -> None:
        with self._lock:
            state = self._workers.get(worker)
            if state is None:
                return  # unregistered (stopped on purpose): nothing to track
            state.last_beat = self._clock()
            state.beats += 1

    def unregister(self, worker: str) -> None:
        with self._lock:
            self._workers.pop(worker, None)

    # -- queries
    def stale_workers(self) -> list[str]:
        """Critical workers whose last beat is older than their interval, sorted."""
        now = self._clock()
        with self._lock:
            return sorted(
                name
                for name, s in self._workers.items()
                if s.critical and now - s.last_beat > s.interval_s
            )

    def status(self) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            workers = {
                name: {
                    "critical": s.critical,
                    "interval_s": s.interval_s,
                    "age_s": round(now - s.last_beat, 3),
                    "beats": s.beats,
                }
                for name, s in sorted(self._workers.items())
            }
        return {
            "systemd_timeout_s": self._timeout_s,
            "pings_sent": self.pings_sent,
            "workers": workers,
        }

    # -- pinger
    @property
    def pinging(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, stop_event: threading.Event) -> None:
        """Start the pinger thread if systemd asked for pings; it ends when ``stop_event`` is
        set."""
        if self._timeout_s is None or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, args=(stop_event, self._timeout_s / 2), name="watchdog", daemon=True
        )
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the pinger to end (after the stop event); True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def ping_if_healthy(self) -> bool:
        """One pinger round: send ``WATCHDOG=1`` if no critical worker is stale."""
        stale = self.stale_workers()
        if stale:
            if frozenset(stale) != self._stale_logged:
                _log.warning(
                    "watchdog: worker(s) %s missed their heartbeat; withholding WATCHDOG=1 "
                    "so systemd restarts the agent if they stay stuck",
                    ", ".join(stale),
                )
            self._stale_logged = frozenset(stale)
            return False
        if self._stale_logged:
            _log.info("watchdog: all workers beating again; resuming pings")
            self._stale_logged = frozenset()
        if self._notifier.watchdog():
            self.pings_sent += 1
        return True

    def _run(self, stop_event: threading.Event, period_s: float) -> None:
        _log.debug("watchdog pinger: every %.3f s", period_s)
        self.ping_if_healthy()
        while not stop_event.wait(period_s):
            self.ping_if_healthy()
