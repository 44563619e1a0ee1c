"""Heartbeats and the systemd watchdog pinger, with a real notify socket."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.health import Watchdog, watchdog_interval_s
from agent.notify import Notifier
from pipelines.base import Heartbeats


class ManualClock:
    """A monotonic clock the test moves by hand (staleness without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Notifier, socket.socket]]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        notifier = Notifier(address)
        yield notifier, sock
        notifier.close()


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on ``sock`` (non-blocking)."""
    out: list[bytes] = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096, socket.MSG_DONTWAIT))
    return out


def test_watchdog_implements_heartbeats_protocol() -> None:
    assert isinstance(Watchdog(Notifier(None), None), Heartbeats)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_from_environment(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected


def test_stale_critical_worker_withholds_pings(
    notify_socket: tuple[Notifier, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    notifier, sock = notify_socket
    clock = ManualClock()
    dog = Watchdog(notifier, 2.0, clock=clock)
    dog.register("capture", 1.0)
    dog.register("optional", 0.5, critical=False)
    assert dog.ping_if_healthy()
    assert pending(sock) == [b"WATCHDOG=1"]

    clock.now += 0.9
    dog.beat("capture")
    clock.now += 0.9  # capture beat 0.9 s ago (< 1 s); the non-critical one is stale
    assert dog.stale_workers() == []
    assert dog.ping_if_healthy()
    assert pending(sock) == [b"WATCHDOG=1"]

    clock.now += 0.2  # capture now 1.1 s without a beat
    with caplog.at_level(logging.WARNING, logger="agent.health"):
        assert dog.stale_workers() == ["capture"]
        assert not dog.ping_if_healthy()
        assert not dog.ping_if_healthy()
    assert pending(sock) == []
    stale_logs = [r for r in caplog.records if "capture" in r.getMessage()]
    assert len(stale_logs) == 1  # logged once per episode

    dog.beat("capture")
    assert dog.ping_if_healthy()
    assert pending(sock) == [b"WATCHDOG=1"]
    assert dog.pings_sent == 3


def test_unregistered_worker_no_longer_counts(
    notify_socket: tuple[Notifier, socket.socket],
) -> None:
    notifier, sock = notify_socket
    clock = ManualClock()
    dog = Watchdog(notifier, 2.0, clock=clock)
    dog.register("decoder", 1.0)
    clock.now += 5
    assert dog.stale_workers() == ["decoder"]
    dog.unregister("decoder")
    dog.beat("decoder")  # a late beat of a stopped worker is ignored
    assert dog.stale_workers() == []
    assert dog.ping_if_healthy()
    assert pending(sock) == [b"WATCHDOG=1"]


def test_status_reports_workers() -> None:
    clock = ManualClock()
    dog = Watchdog(Notifier(None), None, clock=clock)
    dog.register("w", 2.0)
    clock.now += 1.5
    dog.beat("w")
    clock.now += 0.25
    status = dog.status()
    assert status["systemd_timeout_s"] is None
    assert status["workers"] == {
        "w": {"critical": True, "interval_s": 2.0, "age_s": 0.25, "beats": 1}
    }


def test_register_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        Watchdog(Notifier(None), None).register("w", 0)


def test_pinger_thread_pings_until_stop_event(
    notify_socket: tuple[Notifier, socket.socket],
) -> None:
    notifier, sock = notify_socket
    dog = Watchdog(notifier, 0.1)  # real clock: pings every 50 ms
    dog.register("main", 60.0)
    stop = threading.Event()
    dog.start(stop)
    assert dog.pinging
    sock.settimeout(10)
    assert [sock.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    stop.set()
    assert dog.join(10)
    assert not dog.pinging


def test_no_pinger_without_systemd_request() -> None:
    dog = Watchdog(Notifier(None), None)
    stop = threading.Event()
    dog.start(stop)
    assert not dog.pinging
    assert dog.join(0.1)
