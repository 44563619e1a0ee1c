"""The durable outbox on real SQLite files: order, persistence, bounds, priorities, expiry,
dead letters, group commit."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.errors import MessageTooLargeError, OutboxFullError, OutboxStoreError
from agent.reporting.outbox import Outbox, OutboxLimits
from agent.reporting.topics import Priority

CRIT = Priority.CRITICAL
DROP = Priority.DROPPABLE


def test_rows_come_back_in_order_and_ack_deletes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        ids = [ob.put(f"t/{i}", f"m{i}".encode(), priority=CRIT) for i in range(5)]
        assert ids == sorted(ids)
        rows = ob.pending(after_id=0, limit=10)
        assert [r.payload for r in rows] == [f"m{i}".encode() for i in range(5)]
        assert ob.pending(after_id=rows[2].id, limit=10) == rows[3:]
        assert ob.ack([rows[0].id, rows[1].id, 999_999]) == 2
        assert [r.id for r in ob.pending()] == [r.id for r in rows[2:]]
        assert ob.depth == 3


def test_rows_survive_a_reopen_and_replay_from_the_database(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        for i in range(4):
            ob.put("t", f"{i}".encode(), priority=CRIT, correlation=b"c" if i == 2 else None)
        ob.ack([ob.pending()[0].id])
    with Outbox(path) as again:
        rows = again.pending()
        assert [r.payload for r in rows] == [b"1", b"2", b"3"]
        assert rows[1].correlation == b"c"
        assert again.depth == 3
        assert again.stats().bytes == 3


def test_staged_messages_are_committed_in_one_group_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    ob = Outbox(path)
    ob.stage("d", b"a")
    ob.stage("d", b"b")
    assert ob.staged == 2
    assert ob.depth == 2
    assert ob.pending() == []  # not stored yet
    assert ob.commit_staged() == 2
    assert [r.payload for r in ob.pending()] == [b"a", b"b"]
    ob.stage("d", b"c")
    # a synchronous put commits what is staged first, so ids keep publish order
    crit = ob.put("e", b"crit", priority=CRIT)
    assert [r.payload for r in ob.pending()] == [b"a", b"b", b"c", b"crit"]
    assert ob.pending()[-1].id == crit
    ob.stage("d", b"last")
    ob.close()
    with Outbox(path) as again:
        assert [r.payload for r in again.pending()][-1] == b"last"


def test_droppable_messages_are_evicted_oldest_first_and_counted(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_messages=4)) as ob:
        ob.put("e", b"c1", priority=CRIT)
        for i in range(6):
            ob.put("d", f"d{i}".encode(), priority=DROP)
        assert [r.payload for r in ob.pending()] == [b"c1", b"d3", b"d4", b"d5"]
        assert ob.stats().dropped == 3


def test_critical_messages_are_never_dropped_but_refused_loudly(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", OutboxLimits(max_messages=3)) as ob:
        ob.put("d", b"d0", priority=DROP)
        for i in range(3):
            ob.put("e", f"c{i}".encode(), priority=CRIT)  # the third evicts the detection
        with pytest.raises(OutboxFullError, match="critical message"):
            ob.put("e", b"c3", priority=CRIT)
        assert ob.put("d", b"d1", priority=DROP) is None  # no room: the new one is dropped
        stats = ob.stats()
        assert (stats.refused, stats.dropped, stats.critical) == (1, 2, 3)
        assert [r.payload for r in ob.pending()] == [b"c0", b"c1", b"c2"]


def test_byte_bound_applies_too(tmp_path: Path) -> None:
    limits = OutboxLimits(max_messages=1000, max_bytes=100, max_message_bytes=60)
    with Outbox(tmp_path / "o.sqlite", limits) as ob:
        ob.put("d", b"x" * 60, priority=DROP)
        ob.put("d", b"y" * 50, priority=DROP)  # evicts the first (60 + 50 > 100)
        assert [r.payload[:1] for r in ob.pending()] == [b"y"]
        with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
            ob.put("d", b"z" * 61, priority=DROP)


def test_expired_messages_are_deleted_and_counted(tmp_path: Path) -> None:
    now = [1000.0]
    with Outbox(tmp_path / "o.sqlite", clock=lambda: now[0]) as ob:
        ob.put("d", b"old", priority=DROP, expires_at=1005.0)
        ob.put("d", b"keep", priority=DROP, expires_at=2000.0)
        ob.put("e", b"forever", priority=CRIT)
        assert ob.expire() == []
        now[0] = 1006.0
        assert ob.expire() == ["d"]
        assert [r.payload for r in ob.pending()] == [b"keep", b"forever"]
        assert ob.stats().expired == 1


def test_expiry_uses_its_index_and_keeps_id_order(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    now = [1000.0]
    with Outbox(path, clock=lambda: now[0]) as ob:
        ob.put("a", b"1", priority=DROP, expires_at=1009.0)
        ob.put("b", b"2", priority=DROP, expires_at=1001.0)  # expires first, listed second
        ob.put("c", b"3", priority=DROP, expires_at=1005.0)
        ob.put("d", b"4", priority=DROP, expires_at=3000.0)
        now[0] = 1010.0
        assert ob.expire() == ["a", "b", "c"]
        assert [r.payload for r in ob.pending()] == [b"4"]
    db = sqlite3.connect(path)
    db.execute("DROP INDEX outbox_expires_at")  # a file from before the index
    db.commit()
    db.close()
    Outbox(path).close()  # opening adds it
    db = sqlite3.connect(path)
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT id, topic FROM outbox "
        "WHERE expires_at IS NOT NULL AND expires_at <= 1 ORDER BY id"
    ).fetchall()
    db.close()
    assert any("USING INDEX outbox_expires_at" in str(row[-1]) for row in plan), plan


def test_dead_letter_moves_the_row_out_for_good(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        row = ob.put("edge/x/vision/p/events", b"denied", priority=CRIT)
        assert row is not None
        assert ob.add_attempt(row) == 1
        assert ob.dead_letter(row, 0x87, "not_authorized")
        assert not ob.dead_letter(row, 0x87, "again")
        assert ob.pending() == []
        (dl,) = ob.dead_letters()
        assert (dl.topic, dl.payload, dl.reason_code) == ("edge/x/vision/p/events", b"denied", 0x87)
    with Outbox(path) as again:
        assert again.stats().dead_letters == 1


def test_an_unusable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxStoreError, match="cannot be opened"):
        Outbox(bad)


def test_one_agent_per_outbox_file(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        ob.put("e", b"x", priority=CRIT)
        other = sqlite3.connect(str(path), timeout=0.1)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT COUNT(*) FROM outbox").fetchone()
        other.close()


def test_publish_after_close_is_refused(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    ob.close()
    with pytest.raises(OutboxStoreError, match="closed"):
        ob.put("e", b"x", priority=CRIT)
    with pytest.raises(OutboxStoreError, match="closed"):
        ob.stage("d", b"x")


def test_row_ids_increase_after_acks_dead_letters_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        first = ob.put("t", b"1", priority=CRIT)
        second = ob.put("t", b"2", priority=CRIT)
        assert first is not None
        assert second is not None
        assert ob.dead_letter(second, 0x87, "not_authorized")
        assert ob.ack([first]) == 1
        assert ob.depth == 0
        third = ob.put("t", b"3", priority=CRIT)  # the table is empty: still a new id
        assert third is not None
        assert third > second
        ob.ack([third])
        kept = ob.put("t", b"kept", priority=CRIT)
    with Outbox(path) as again:
        fourth = again.put("t", b"4", priority=CRIT)
        assert fourth is not None
        assert kept is not None
        assert fourth > kept  # above every id still stored (outbox and dead letters)
        assert [r.payload for r in again.pending()] == [b"kept", b"4"]


def test_a_file_from_the_autoincrement_schema_keeps_counting(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, priority INTEGER "
        "NOT NULL, created_at REAL NOT NULL, expires_at REAL, correlation BLOB, attempts "
        "INTEGER NOT NULL DEFAULT 0);"
    )
    for i in range(7):
        db.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, priority, created_at) "
            "VALUES ('t', ?, 1, 0, 0, 0)",
            (str(i).encode(),),
        )
    db.execute("DELETE FROM outbox WHERE id > 2")
    db.commit()
    db.close()
    with Outbox(path) as ob:
        assert [r.payload for r in ob.pending()] == [b"0", b"1"]
        new = ob.put("t", b"new", priority=CRIT)
        assert new == 8  # after the highest id ever handed out (7), not after the live ones


def test_acked_rows_leave_at_once_and_are_deleted_in_batches(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", recent_cache=2, ack_batch=4) as ob:
        ids = [ob.put("t", f"{i}".encode(), priority=CRIT) for i in range(6)]
        assert ob.ack(ids[:3]) == 3
        assert ob.depth == 3
        # rows 0-2 are still in the file (3 < ack_batch); the database read must skip them
        assert [r.payload for r in ob.pending(after_id=0)] == [b"3", b"4", b"5"]
        assert ob.flush_acks() == 0  # the read above already deleted them
        assert ob.ack([ids[3]]) == 1
        assert ob.flush_acks(older_than_s=3600) == 0  # not old enough yet
        assert ob.flush_acks() == 1


def _crash_after_acks(path: Path, flush: bool) -> None:
    """A child that stores 5 rows, acks 3 and dies without closing (like a SIGKILL)."""
    code = (
        "import os, sys\n"
        "from agent.reporting.outbox import Outbox\n"
        "from agent.reporting.topics import Priority\n"
        f"ob = Outbox({str(path)!r})\n"
        "ids = [ob.put('t', str(i).encode(), priority=Priority.CRITICAL) for i in range(5)]\n"
        "ob.ack(ids[:3])\n"
        f"{'ob.flush_acks()' if flush else 'pass'}\n"
        "os._exit(0)\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


def test_a_crash_before_the_batched_delete_only_duplicates(tmp_path: Path) -> None:
    _crash_after_acks(tmp_path / "a.sqlite", flush=False)
    with Outbox(tmp_path / "a.sqlite") as ob:  # acked rows come back: re-sent, never lost
        assert [r.payload for r in ob.pending()] == [b"0", b"1", b"2", b"3", b"4"]
    _crash_after_acks(tmp_path / "b.sqlite", flush=True)
    with Outbox(tmp_path / "b.sqlite") as ob:
        assert [r.payload for r in ob.pending()] == [b"3", b"4"]


def test_pending_from_a_long_backlog_starts_right_after_the_cursor(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        ids = [ob.put("t", f"{i}".encode(), priority=CRIT) for i in range(1000)]
        assert ob.ack([ids[502]]) == 1
        page = ob.pending(after_id=ids[499], limit=5)
        assert [r.payload for r in page] == [b"500", b"501", b"503", b"504", b"505"]
        assert ob.pending(after_id=ids[-1]) == []


def test_puts_and_acks_from_two_threads_stay_consistent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", ack_batch=64) as ob:
        done = threading.Event()
        errors: list[BaseException] = []
        sent: list[int] = []

        def owner() -> None:  # like the MQTT owner: read what is new, ack it
            cursor = 0
            try:
                while not (done.is_set() and ob.depth == 0):
                    rows = ob.pending(after_id=cursor, limit=20)
                    if not rows:
                        time.sleep(0.001)
                        continue
                    cursor = rows[-1].id
                    sent.extend(r.id for r in rows)
                    ob.ack([r.id for r in rows])
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=owner)
        thread.start()
        ids = [ob.put("t", f"{i}".encode(), priority=CRIT) for i in range(3000)]
        done.set()
        thread.join(60)
        assert not thread.is_alive(), "the owner thread did not drain the outbox"
        assert not errors
        assert sent == ids  # every row handed out once, in order
        assert ob.depth == 0
        # acknowledged rows whose batched DELETE has not run yet are still stored
        stored = [i for i in ids if ob.get(i) is not None]
        assert len(stored) < ob.ack_batch  # each full batch was deleted at once
        assert ob.flush_acks() == len(stored)
        assert [i for i in ids if ob.get(i) is not None] == []
        assert ob.flush_acks() == 0
    with Outbox(tmp_path / "o.sqlite") as again:
        assert again.pending() == []
