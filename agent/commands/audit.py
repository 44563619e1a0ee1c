"""Append-only audit log: one JSON line per command decision (``AuditRecord``), flushed per
line, also handed to a publisher (the MQTT reporter puts it on ``events``).

Lines are ASCII (non-ASCII escaped as ``\\uXXXX``): text from a command (its name, an error
message quoting it) can hold U+2028, U+0085 and the like, which many line-oriented tools
(and Python's ``str.splitlines``) take for line breaks."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from agent.errors import ReportingError
from agent.reporting.messages import AuditRecord

__all__ = ["AuditLog"]

_log = logging.getLogger(__name__)


class AuditLog:
    def __init__(
        self,
        path: Path | None,
        *,
        publish: Callable[[AuditRecord], None] | None = None,
        fsync: bool = False,
    ) -> None:
        self.path = path
        self._publish = publish
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.records = 0
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise ReportingError(
                    f"audit log {path} cannot be opened: {exc.strerror} — make the folder "
                    "writable or set reporting.mqtt.commands.audit_log"
                ) from exc

    def set_publisher(self, publish: Callable[[AuditRecord], None] | None) -> None:
        self._publish = publish

    def append(self, record: AuditRecord) -> None:
        line = (json.dumps(record.model_dump(mode="json"), separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.records += 1
            if self._fd is not None:
                try:
                    os.write(self._fd, line)
                    if self._fsync:
                        os.fsync(self._fd)
                except OSError as exc:
                    _log.error("audit log %s: write failed: %s", self.path, exc.strerror)
        if self._publish is not None:
            try:
                self._publish(record)
            except ReportingError as exc:
                _log.error("audit event for %s not published: %s", record.command_id, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
