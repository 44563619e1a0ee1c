"""JSON Lines reporter: one JSON object per line, to standard output or appended to a file.

Each line is ``{"topic": ..., "ts": <unix seconds>, **message}``. Writes are serialised by a
lock and flushed per line, so concurrent pipelines never interleave partial lines and a reader
(``tail -f``, a test) sees each result as soon as it is published.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from agent.errors import ReportingError
from agent.reporting.jsonutil import compact_json
from pipelines.errors import SinkError

__all__ = ["JsonlSink"]

_log = logging.getLogger(__name__)


class JsonlSink:
    """``pipelines.base.ResultSink`` writing JSON Lines; ``path`` "-" means standard output."""

    def __init__(self, path: str | Path = "-", *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._owns_stream = str(path) != "-"
        self.published = 0
        self._stream: IO[str]
        if self._owns_stream:
            target = Path(path)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._stream = target.open("a", encoding="utf-8")
            except OSError as exc:
                raise ReportingError(
                    f"JSONL reporter cannot open {target}: {exc.strerror} — make the folder "
                    "writable or set reporting.jsonl.path"
                ) from exc
            self.target = str(target)
        else:
            self._stream = sys.stdout
            self.target = "stdout"

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        try:
            line = compact_json({"topic": topic, "ts": round(self._clock(), 6), **message})
        except (TypeError, ValueError) as exc:
            raise SinkError(
                f"message on {topic!r} is not JSON-serialisable: {exc} — publish plain "
                "numbers, strings, lists and dicts"
            ) from exc
        with self._lock:
            if self._closed:
                raise SinkError(f"JSONL reporter ({self.target}) is closed; cannot publish")
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError) as exc:
                raise SinkError(f"JSONL reporter ({self.target}) write failed: {exc}") from exc
            self.published += 1

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._stream.flush()
            finally:
                if self._owns_stream:
                    self._stream.close()
