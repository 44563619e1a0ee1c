"""Replay protection: every command_id that got a decision is remembered (in SQLite, so a
restart does not forget) until ``forget_at`` = max(expires_at, decision time) + retention."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import OutboxStoreError

__all__ = ["ReplayGuard"]

_PRUNE_EVERY = 256


class ReplayGuard:
    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._since_prune = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS seen "
                "(command_id TEXT PRIMARY KEY, forget_at REAL NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise OutboxStoreError(
                f"command replay store {self.path} cannot be opened: {exc} — check the state "
                "directory is writable"
            ) from exc

    def check_and_remember(self, command_id: str, forget_at: float) -> bool:
        """True if ``command_id`` is new (and now remembered); False if it was seen."""
        now = self._clock()
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT forget_at FROM seen WHERE command_id=?", (command_id,)
                ).fetchone()
                if row is not None and row[0] > now:
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO seen (command_id, forget_at) VALUES (?, ?)",
                    (command_id, forget_at),
                )
                self._since_prune += 1
                if self._since_prune >= _PRUNE_EVERY:
                    self._since_prune = 0
                    self._db.execute("DELETE FROM seen WHERE forget_at <= ?", (now,))
            except sqlite3.Error as exc:
                raise OutboxStoreError(f"command replay store {self.path}: {exc}") from exc
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
