"""``ResultTee``: a ``ResultSink`` in front of the agent's sink that also feeds listeners.

The agent builds one per run and hands it to every pipeline both as its sink and as its
``PipelineContext.results`` feed, so a pipeline (the LLM narrator) can watch what the others
publish without importing the agent. Listeners are called on the publishing thread before the
message goes on; a listener that raises is logged and skipped, never the publish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pipelines.base import ResultListener, ResultSink

__all__ = ["ResultTee"]

_log = logging.getLogger(__name__)


class ResultTee:
    """``ResultSink`` + ``ResultFeed`` (see the module docstring)."""

    def __init__(self, sink: ResultSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._listeners: tuple[ResultListener, ...] = ()
        self.listener_errors = 0

    def subscribe(self, listener: ResultListener) -> Callable[[], None]:
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        for listener in self._listeners:  # a snapshot: subscribe replaces the tuple
            self._tell(listener, topic, message)
        self._sink.publish(topic, message)

    def _tell(self, listener: ResultListener, topic: str, message: Mapping[str, Any]) -> None:
        try:
            listener(topic, message)
        except Exception:  # noqa: BLE001 - a listener never breaks publishing
            self.listener_errors += 1
            _log.exception("result listener failed on %r", topic)

    def close(self) -> None:
        """Closes the wrapped sink."""
        self._sink.close()
