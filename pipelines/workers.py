"""Worker-thread bootstrap shared by the pipelines.

Every pipeline thread starts the same way: it is registered with the agent's heartbeats (so a
hung one goes stale), pins itself to its stage's CPUs, runs its body and, however the body ends,
stops promising beats. An exception escaping the body fails the pipeline (through the pipeline's
own ``on_failure``), never the agent: :meth:`WorkerThreads.start` holds the one thread top level
that catches everything. ``stop()`` joins what was started and unregisters it the same way too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from engines.affinity import format_cpulist, pin_current_thread
from pipelines.base import Heartbeats

__all__ = ["WorkerThreads", "pinner"]

_log = logging.getLogger(__name__)


def pinner(cpus: frozenset[int], worker: str) -> Callable[[], None]:
    """A callable that pins the thread calling it to ``cpus`` and logs that; with an empty set
    it does nothing (the process's CPU set applies). Run it first thing on the worker's thread."""

    def pin() -> None:
        if cpus:
            pin_current_thread(cpus)
            _log.debug("%s pinned to CPUs %s", worker, format_cpulist(cpus))

    return pin


class WorkerThreads:
    """The worker threads of one pipeline: started one way (:meth:`start`), ended one way
    (:meth:`finish`).

    A failing thread hands ``"{role}: {ExceptionType}: {message}"`` to ``on_failure`` (the
    pipeline's own ``_fail``, which decides what failing means for it).
    """

    def __init__(
        self, pipeline: str, heartbeats: Heartbeats, on_failure: Callable[[str], None]
    ) -> None:
        self._pipeline = pipeline
        self._heartbeats = heartbeats
        self._on_failure = on_failure
        self._threads: list[threading.Thread] = []
        self._workers: list[str] = []

    def register(self, worker: str, interval_s: float, *, critical: bool = True) -> None:
        """Register ``worker`` with the heartbeats (a beat promised every ``interval_s``) and
        keep it for :meth:`finish`; :meth:`start` does this itself. For a worker whose thread
        something else starts (a capture source's)."""
        self._heartbeats.register(worker, interval_s, critical=critical)
        self._workers.append(worker)

    def start(
        self,
        role: str,
        body: Callable[[str], None],
        *,
        cpus: frozenset[int],
        interval_s: float,
        critical: bool = True,
    ) -> threading.Thread:
        """Register the worker ``{pipeline}/{role}`` and start its daemon thread; return it.

        On the thread: pin to ``cpus`` (see :func:`pinner`), then run ``body(worker_name)``. An
        exception from either is logged and handed to ``on_failure``. Whatever happens, the worker
        is unregistered when its thread ends: a worker that ended stops promising beats; only a
        hung one goes stale.
        """
        worker = f"{self._pipeline}/{role}"
        self.register(worker, interval_s, critical=critical)
        pin = pinner(cpus, worker)

        def run() -> None:
            try:
                pin()
                body(worker)
            except Exception as exc:  # noqa: BLE001 - thread top level: fail the pipeline, not the agent
                _log.exception("pipeline %s: the %s thread failed", self._pipeline, role)
                self._on_failure(f"{role}: {type(exc).__name__}: {exc}")
            finally:
                self._heartbeats.unregister(worker)

        thread = threading.Thread(target=run, name=worker, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def finish(self, deadline: float) -> bool:
        """Join the started threads until ``deadline`` (``time.monotonic()``), then unregister
        every worker (they stop on purpose); True if every thread ended in time."""
        joined = True
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            joined &= not thread.is_alive()
        for worker in self._workers:
            self._heartbeats.unregister(worker)
        return joined
