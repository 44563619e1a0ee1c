"""systemd notify protocol on a real AF_UNIX datagram socket (path and abstract namespace)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(5)
        yield address, sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"edge-agent-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_reach_a_path_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.status("starting: pinning")
    assert recv(sock) == ["STATUS=starting: pinning"]
    assert notifier.extend_timeout(90)
    assert recv(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert notifier.ready("ready: 1 pipeline(s)\nrunning")
    assert recv(sock) == ["READY=1", "STATUS=ready: 1 pipeline(s) running"]
    assert notifier.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert recv(sock) == ["STOPPING=1", "STATUS=stopping"]
    notifier.close()
    assert not notifier.status("after close")


def test_abstract_namespace_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = Notifier(address)
    assert notifier.ready("ready")
    assert recv(sock) == ["READY=1", "STATUS=ready"]
    notifier.close()


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready("ready")
    assert not notifier.watchdog()


def test_socket_pointing_nowhere_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        assert not notifier.ready("ready")
        assert not notifier.watchdog()
        assert not notifier.status("still running")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()
    assert "keeps running" in warnings[0].getMessage()
    notifier.close()


def test_socket_that_appears_later_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(tmp_path / "late.sock")
    notifier = Notifier(address)
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        assert not notifier.status("early")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(5)
        assert notifier.status("late")
        assert recv(sock) == ["STATUS=late"]
    notifier.close()


def test_full_receiver_queue_drops_instead_of_blocking(
    path_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    address, _unread = path_socket  # bound but never read while sending
    notifier = Notifier(address, send_timeout_s=0.05)
    sent = 0
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        while sent < 10_000 and notifier.status(f"message {sent}"):
            sent += 1
    assert 0 < sent < 10_000  # the queue filled up: dropped after the timeout, not stuck
    assert any("timed out" in r.getMessage() for r in caplog.records)
    notifier.close()
