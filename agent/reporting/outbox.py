"""Durable store-and-forward outbox for QoS 1 messages: SQLite in WAL mode.

Life of a message::

    put()  ->  row in ``outbox`` (committed before anyone may publish it)
           ->  pending() hands it to the MQTT owner thread, which publishes it
           ->  ack() on PUBACK success removes it (its DELETE is batched with others:
               one transaction per ack_batch rows or ack_delay_s, see ``ack``)
           ->  dead_letter() on a PUBACK reason code that can never succeed moves it to
               ``dead_letter`` (kept for inspection, never retried)

After a reconnect, and after a restart of the process, ``pending(after_id=0)`` hands every
remaining row out again in id (= publish) order.

Bounds: ``max_messages`` and ``max_bytes`` (payload bytes). A message of the DROPPABLE class that
does not fit evicts the oldest droppable messages (counted in ``dropped``); if it still does not
fit it is itself dropped and counted. A CRITICAL message (command replies, events, LLM results)
is never dropped: it evicts droppable ones, and if it still does not fit ``put`` raises
``OutboxFullError`` (counted in ``refused``) so the caller knows loudly.

Durability: every ``put`` is its own committed transaction, done before ``put`` returns.
``synchronous="normal"`` (default) survives a crash or SIGKILL of the process and never
corrupts the file; ``"full"`` also keeps the last transactions over a power loss, at the price
of an fsync per message. The file is opened in exclusive locking mode: one agent per outbox.

Speed: recently stored rows are also kept in memory (``recent_cache`` rows), so the owner thread
reads fresh messages without a SELECT; the database is read back only to replay after a
reconnect or a restart. A ``put`` that evicts nothing is a single INSERT (its own transaction,
no BEGIN/COMMIT round trips); row ids are assigned by the outbox (no AUTOINCREMENT bookkeeping
table written per insert): strictly increasing within a run, and after a restart above every id
still stored (outbox and dead letters). Each commit appends its pages to the WAL, so new files
use 1 KiB pages (4x fewer bytes per critical message than SQLite's default 4 KiB). Under
``"normal"`` the only fsyncs are those of a WAL checkpoint, so checkpoints are rare
(``checkpoint_pages``: 65536 pages, 64 MiB of WAL; the file is truncated back to that size).

All methods are thread-safe. Two locks: ``_lock`` guards the SQLite connection (every
statement), ``_index`` the in-memory index, recent cache and pending acks (only quick work
under it). A writer takes ``_lock`` then ``_index``; the MQTT owner's hot path (``ack``,
``pending`` from the cache) takes only ``_index``, so it never waits for a publisher's INSERT.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import MessageTooLargeError, OutboxFullError, OutboxStoreError
from agent.reporting.topics import Priority

__all__ = ["DeadLetter", "Outbox", "OutboxLimits", "OutboxMessage", "OutboxStats"]

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    priority    INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    expires_at  REAL,
    correlation BLOB,
    attempts    INTEGER NOT NULL DEFAULT 0
);
-- expire() finds the rows past expiry without a scan; partial, so the rows that never expire
-- (the critical class) add no index page to their commits
CREATE INDEX IF NOT EXISTS outbox_expires_at ON outbox(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letter (
    id          INTEGER PRIMARY KEY,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    priority    INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    correlation BLOB,
    attempts    INTEGER NOT NULL,
    reason_code INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    failed_at   REAL    NOT NULL
);
"""

_INSERT = (
    "INSERT INTO outbox (id, topic, payload, qos, retain, priority, created_at, expires_at, "
    "correlation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT id, topic, payload, qos, retain, priority, created_at, expires_at, correlation, "
    "attempts FROM outbox "
)


@dataclass(frozen=True)
class _Item:
    topic: str
    payload: bytes
    priority: Priority
    qos: int
    retain: bool
    expires_at: float | None
    correlation: bytes | None
    created_at: float


@dataclass(frozen=True)
class OutboxLimits:
    max_messages: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_message_bytes: int = 256 * 1024


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: Priority
    created_at: float
    expires_at: float | None
    correlation: bytes | None
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    id: int
    topic: str
    payload: bytes
    reason_code: int
    reason: str
    failed_at: float


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    critical: int
    dropped: int
    refused: int
    expired: int
    dead_letters: int


class Outbox:
    """The durable outbox (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        limits: OutboxLimits | None = None,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        checkpoint_pages: int = 65536,
        recent_cache: int = 4096,
        max_staged: int = 10_000,
        ack_batch: int = 512,
        ack_delay_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or OutboxLimits()
        self._clock = clock
        self._lock = threading.Lock()  # the SQLite connection
        self._index = threading.RLock()  # _rows, _bytes, _recent, _acked (taken after _lock)
        # id -> payload size, one insertion-ordered map per priority class (ids ascend).
        self._rows: dict[Priority, OrderedDict[int, int]] = {p: OrderedDict() for p in Priority}
        self._bytes = 0
        self.dropped = 0
        self.refused = 0
        self.expired = 0
        self._dead = 0
        self._closed = False
        self._recent: deque[OutboxMessage] = deque(maxlen=max(recent_cache, 1))
        self._acked: list[int] = []  # acknowledged rows still to DELETE (see ack())
        self._acked_since = 0.0
        self.ack_batch = max(1, ack_batch)
        self.ack_delay_s = ack_delay_s
        self._stage_lock = threading.Lock()
        self._staged: deque[_Item] = deque()
        self._staged_dropped = 0
        self.max_staged = max_staged
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=5.0
            )
            # 1 KiB pages (a new file only): each critical message is its own commit, which
            # appends one page to the WAL, later flushed by a checkpoint's fsync
            self._db.execute("PRAGMA page_size=1024")
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise OutboxStoreError(f"MQTT outbox {self.path}: WAL mode unavailable ({mode})")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={int(checkpoint_pages)}")
            self._db.execute(f"PRAGMA journal_size_limit={int(checkpoint_pages) * 1024}")
            self._db.executescript(_SCHEMA)
            self._load_index()
            (self._dead,) = self._db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()
            self._next_id = self._highest_id() + 1
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise OutboxStoreError(
                f"MQTT outbox {self.path} cannot be opened: {exc} — check that the folder is "
                "writable and the file is an outbox database (or move it away)"
            ) from exc
        if self.depth:
            _log.info(
                "outbox %s: %d message(s) from a previous run to replay", self.path, self.depth
            )

    # --- writing -------------------------------------------------------------------------

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        priority: Priority,
        qos: int = 1,
        retain: bool = False,
        expires_at: float | None = None,
        correlation: bytes | None = None,
    ) -> int | None:
        """Store one message, committed before returning (staged messages are committed first,
        in the same transaction, so ids keep publish order); its row id, or None when a
        droppable message did not fit."""
        item = self._item(topic, payload, priority, qos, retain, expires_at, correlation)
        size = len(payload)
        with self._lock:
            self._check_open()
            limits = self.limits
            with self._index:
                slow = (
                    bool(self._staged)
                    or self._stored() + 1 > limits.max_messages
                    or self._bytes + size > limits.max_bytes
                )
            if slow:
                return self._store([item])[-1]
            # fast path (nothing staged, nothing to evict): one INSERT, its own transaction;
            # only the connection lock is held meanwhile (writers are serialised by it)
            try:
                message = self._insert(item)
            except sqlite3.Error as exc:
                raise OutboxStoreError(
                    f"MQTT outbox {self.path} cannot store messages: {exc} — is the disk full?"
                ) from exc
            with self._index:
                self._rows[priority][message.id] = size
                self._bytes += size
                self._recent.append(message)
            return message.id

    def stage(
        self,
        topic: str,
        payload: bytes,
        *,
        priority: Priority = Priority.DROPPABLE,
        qos: int = 1,
        retain: bool = False,
        expires_at: float | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Queue a message for the next group commit (``commit_staged``, done by the MQTT owner
        thread before it publishes anything): one transaction for many messages. Until then a
        SIGKILL loses it, so only the droppable class is staged; ``put`` is for the rest."""
        item = self._item(topic, payload, priority, qos, retain, expires_at, correlation)
        with self._stage_lock:
            if self._closed:
                raise OutboxStoreError(f"MQTT outbox {self.path} is closed")
            if len(self._staged) >= self.max_staged:
                self._staged.popleft()
                self._staged_dropped += 1
            self._staged.append(item)

    def commit_staged(self) -> int:
        """Store every staged message in one transaction; how many were stored."""
        with self._lock:
            self._check_open()
            return sum(1 for r in self._store([]) if r is not None)

    @property
    def staged(self) -> int:
        return len(self._staged)

    def _item(  # noqa: PLR0917 - private helper mirroring put()'s fields
        self,
        topic: str,
        payload: bytes,
        priority: Priority,
        qos: int,
        retain: bool,
        expires_at: float | None,
        correlation: bytes | None,
    ) -> _Item:
        if len(payload) > self.limits.max_message_bytes:
            raise MessageTooLargeError(
                f"message for {topic!r} is {len(payload)} bytes, over the outbox limit of "
                f"{self.limits.max_message_bytes} (reporting.mqtt.outbox.max_message_bytes)"
            )
        return _Item(topic, payload, priority, qos, retain, expires_at, correlation, self._clock())

    def _store(self, extra: list[_Item]) -> list[int | None]:
        """Insert staged + ``extra`` in one transaction (``_lock`` held; takes ``_index``); an
        id or None each."""
        with self._index:
            return self._store_indexed(extra)

    def _store_indexed(self, extra: list[_Item]) -> list[int | None]:
        with self._stage_lock:
            items = [*self._staged, *extra]
            self._staged.clear()
        if not items:
            return []
        results: list[int | None] = []
        fresh: list[OutboxMessage] = []
        refused: OutboxFullError | None = None
        # One message that needs no eviction (the usual critical put): a single INSERT is its
        # own transaction, so skip the BEGIN/COMMIT round trips.
        single = len(items) == 1 and self._plan_eviction(len(items[0].payload)) == []
        try:
            if not single:
                self._db.execute("BEGIN IMMEDIATE")
            for it in items:
                size = len(it.payload)
                evict = self._plan_eviction(size)
                if evict is None:
                    results.append(None)
                    if it.priority is Priority.DROPPABLE:
                        self.dropped += 1
                        continue
                    self.refused += 1
                    refused = OutboxFullError(
                        f"outbox full ({self._stored()} messages, {self._bytes} bytes of "
                        f"{self.limits.max_messages}/{self.limits.max_bytes}): critical message "
                        f"for {it.topic!r} refused — the broker has been unreachable too long, "
                        "or raise reporting.mqtt.outbox limits"
                    )
                    continue
                if evict:
                    self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in evict])
                    for row_id in evict:
                        self._forget(row_id)
                    self.dropped += len(evict)
                message = self._insert(it)
                self._rows[it.priority][message.id] = size
                self._bytes += size
                results.append(message.id)
                fresh.append(message)
            if not single:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._load_index()
            raise OutboxStoreError(
                f"MQTT outbox {self.path} cannot store messages: {exc} — is the disk full?"
            ) from exc
        self._recent.extend(fresh)
        if refused is not None:
            raise refused
        return results

    def _insert(self, item: _Item) -> OutboxMessage:
        """INSERT ``item`` under the next row id (``_lock`` held); raises sqlite3.Error."""
        row_id = self._next_id
        self._db.execute(
            _INSERT,
            (
                row_id,
                item.topic,
                item.payload,
                item.qos,
                int(item.retain),
                int(item.priority),
                item.created_at,
                item.expires_at,
                item.correlation,
            ),
        )
        self._next_id = row_id + 1
        return OutboxMessage(
            row_id,
            item.topic,
            item.payload,
            item.qos,
            item.retain,
            item.priority,
            item.created_at,
            item.expires_at,
            item.correlation,
            0,
        )

    def _plan_eviction(self, size: int) -> list[int] | None:
        """Oldest droppable rows to evict so ``size`` more bytes fit; None if nothing can."""
        count, total = self._stored() + 1, self._bytes + size
        evict: list[int] = []
        if count <= self.limits.max_messages and total <= self.limits.max_bytes:
            return evict
        for row_id, row_size in self._rows[Priority.DROPPABLE].items():
            evict.append(row_id)
            count -= 1
            total -= row_size
            if count <= self.limits.max_messages and total <= self.limits.max_bytes:
                return evict
        return None

    def ack(self, ids: Iterable[int]) -> int:
        """Acknowledged rows leave the outbox at once (depth, bounds, ``pending``); ids no
        longer present are ignored; how many went. Their DELETE is batched: one transaction
        per ``ack_batch`` rows or ``ack_delay_s`` (``flush_acks``), so a crash may leave the
        last acknowledged rows stored and re-sent after the restart: duplicates with the same
        (boot_id, seq), never a loss."""
        with self._index:
            self._check_open()
            gone = [i for i in ids if self._forget(i)]
            if not gone:
                return 0
            if not self._acked:
                self._acked_since = time.monotonic()
            self._acked.extend(gone)
            full = len(self._acked) >= self.ack_batch
        if full:
            self.flush_acks()
        return len(gone)

    def flush_acks(self, *, older_than_s: float | None = None) -> int:
        """DELETE the acknowledged rows now (only when the oldest waits ``older_than_s``
        or longer, if given); how many were deleted."""
        with self._lock:
            self._check_open()
            with self._index:
                if not self._acked:
                    return 0
                if older_than_s is not None and time.monotonic() - self._acked_since < older_than_s:
                    return 0
            return self._flush_acks()

    def dead_letter(self, row_id: int, reason_code: int, reason: str) -> bool:
        """Move a row to ``dead_letter`` (the broker refused it for good); False if gone."""
        with self._lock:
            self._check_open()
            with self._index:
                if not self._forget(row_id):
                    return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO dead_letter (id, topic, payload, qos, retain, priority, "
                    "created_at, correlation, attempts, reason_code, reason, failed_at) "
                    "SELECT id, topic, payload, qos, retain, priority, created_at, correlation, "
                    "attempts, ?, ?, ? FROM outbox WHERE id=?",
                    (reason_code, reason, self._clock(), row_id),
                )
                self._db.execute("DELETE FROM outbox WHERE id=?", (row_id,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxStoreError(
                    f"MQTT outbox {self.path}: dead-letter failed: {exc}"
                ) from exc
            self._dead += 1
            return True

    def add_attempt(self, row_id: int) -> int:
        """Count one more failed delivery attempt; the new count (0 if the row is gone)."""
        with self._lock:
            self._check_open()
            try:
                self._db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id=?", (row_id,))
                row = self._db.execute(
                    "SELECT attempts FROM outbox WHERE id=?", (row_id,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise OutboxStoreError(f"MQTT outbox {self.path}: update failed: {exc}") from exc
            return int(row[0]) if row else 0

    def expire(self) -> list[str]:
        """Delete messages past their expiry; the topics of those deleted."""
        now = self._clock()
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, topic FROM outbox WHERE expires_at IS NOT NULL AND expires_at <= ? "
                "ORDER BY id",
                (now,),
            ).fetchall()
            with self._index:
                gone = [row_id for row_id, _ in rows if self._forget(row_id)]
            if gone:
                self._delete(gone)
                self.expired += len(gone)
            expired = set(gone)
            return [topic for row_id, topic in rows if row_id in expired]

    # --- reading -------------------------------------------------------------------------

    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Up to ``limit`` stored messages with id > ``after_id``, in id order."""
        with self._index:
            self._check_open()
            recent = self._recent
            if recent and recent[0].id <= after_id + 1:
                # Every row after after_id is in the cache (ids ascend, each put appends).
                # Ids in the cache are consecutive (a failed store empties it), so the first
                # wanted row sits at a known index: no scan through a backlog of thousands.
                start = after_id + 1 - recent[0].id
                if start >= len(recent):
                    return []
                if recent[start].id == after_id + 1:
                    found: list[OutboxMessage] = []
                    index = self._rows
                    for msg in itertools.islice(recent, start, None):
                        if msg.id in index[msg.priority]:
                            found.append(msg)
                            if len(found) >= limit:
                                break
                    return found
                newer: list[OutboxMessage] = []
                for msg in reversed(recent):
                    if msg.id <= after_id:
                        break
                    newer.append(msg)
                newer.reverse()
                live = self._rows
                out = [m for m in newer if m.id in live[m.priority]]
                return out[:limit]
        with self._lock:
            self._check_open()
            self._flush_acks()  # the database must not hand out acknowledged rows
            try:
                rows = self._db.execute(
                    _SELECT + "WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxStoreError(f"MQTT outbox {self.path}: read failed: {exc}") from exc
        return [_message(r) for r in rows]

    @property
    def last_id(self) -> int:
        """Id of the newest stored row (0 when none was stored since opening)."""
        recent = self._recent
        return recent[-1].id if recent else 0

    def get(self, row_id: int) -> OutboxMessage | None:
        with self._lock:
            self._check_open()
            row = self._db.execute(_SELECT + "WHERE id=?", (row_id,)).fetchone()
        return _message(row) if row else None

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, topic, payload, reason_code, reason, failed_at FROM dead_letter "
                "ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeadLetter(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

    @property
    def depth(self) -> int:
        """Stored plus staged messages."""
        return sum(len(r) for r in self._rows.values()) + len(self._staged)

    def stats(self) -> OutboxStats:
        with self._index:
            return OutboxStats(
                depth=self.depth,
                bytes=self._bytes,
                critical=len(self._rows[Priority.CRITICAL]),
                dropped=self.dropped + self._staged_dropped,
                refused=self.refused,
                expired=self.expired,
                dead_letters=self._dead,
            )

    def close(self) -> None:
        """Commit what is staged, then close the database."""
        with self._lock:
            if self._closed:
                return
            try:
                self._store([])
                self._flush_acks()
            finally:
                with self._stage_lock:
                    self._closed = True
            try:
                self._db.close()
            except sqlite3.Error as exc:
                raise OutboxStoreError(f"MQTT outbox {self.path}: close failed: {exc}") from exc

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- internals (_lock and/or _index held, as each says) ------------------------------

    def _stored(self) -> int:
        """Stored (not acked) rows (``_index`` held)."""
        return sum(len(r) for r in self._rows.values())

    def _highest_id(self) -> int:
        """The highest row id stored in this file (outbox, dead letters, and the AUTOINCREMENT
        counter of files made by older versions)."""
        (top,) = self._db.execute(
            "SELECT max(coalesce((SELECT max(id) FROM outbox), 0), "
            "coalesce((SELECT max(id) FROM dead_letter), 0))"
        ).fetchone()
        has_seq = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'"
        ).fetchone()
        if has_seq:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
            if row is not None:
                top = max(int(top), int(row[0]))
        return int(top)

    def _load_index(self) -> None:
        """(Re)build the in-memory index of stored rows from the database (``_lock`` held)."""
        with self._index:
            self._rows = {p: OrderedDict() for p in Priority}
            self._bytes = 0
            self._recent.clear()
            acked = set(self._acked)
            for row_id, size, prio in self._db.execute(
                "SELECT id, length(payload), priority FROM outbox ORDER BY id"
            ):
                if row_id in acked:
                    continue
                self._rows[Priority(prio)][row_id] = size
                self._bytes += size

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxStoreError(f"MQTT outbox {self.path} is closed")

    def _forget(self, row_id: int) -> bool:
        """Drop a row from the index (``_index`` held); False if it was not there."""
        for rows in self._rows.values():
            size = rows.pop(row_id, None)
            if size is not None:
                self._bytes -= size
                return True
        return False

    def _flush_acks(self) -> int:
        """DELETE the pending acks (``_lock`` held)."""
        with self._index:
            ids, self._acked = self._acked, []
        if ids:
            try:
                self._delete(ids)
            except OutboxStoreError:
                with self._index:
                    self._acked = ids + self._acked  # retried with the next flush
                raise
        return len(ids)

    def _delete(self, ids: list[int]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise OutboxStoreError(f"MQTT outbox {self.path}: delete failed: {exc}") from exc

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                _log.warning("outbox %s: rollback failed: %s", self.path, exc)


def _message(row: tuple[object, ...]) -> OutboxMessage:
    (row_id, topic, payload, qos, retain, prio, created, expires, corr, attempts) = row
    return OutboxMessage(
        id=int(row_id),  # type: ignore[call-overload]
        topic=str(topic),
        payload=bytes(payload),  # type: ignore[call-overload]
        qos=int(qos),  # type: ignore[call-overload]
        retain=bool(retain),
        priority=Priority(int(prio)),  # type: ignore[call-overload]
        created_at=float(created),  # type: ignore[arg-type]
        expires_at=None if expires is None else float(expires),  # type: ignore[arg-type]
        correlation=None if corr is None else bytes(corr),  # type: ignore[call-overload]
        attempts=int(attempts),  # type: ignore[call-overload]
    )
