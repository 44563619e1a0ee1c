"""A systemd-like notify socket for tests: bound, read by a thread, messages collected."""

from __future__ import annotations

import threading
import time
from socket import AF_UNIX, SOCK_DGRAM, socket

import pytest

__all__ = ["NotifyListener"]


class NotifyListener:
    """Binds ``address`` (a path, or ``@name`` for the abstract namespace) and records every
    datagram as its list of ``KEY=VALUE`` lines."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket(AF_UNIX, SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.05)
        self._messages: list[list[str]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self._messages.append(data.decode().split("\n"))

    def take(self, first_line: str, timeout_s: float = 60) -> list[list[str]]:
        """Messages up to and including the first whose first line starts with ``first_line``
        (waits for it); they are removed from the record."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                ends = [i for i, m in enumerate(self._messages) if m[0].startswith(first_line)]
                if ends:
                    out = self._messages[: ends[0] + 1]
                    del self._messages[: ends[0] + 1]
                    return out
            if time.monotonic() > deadline:
                pytest.fail(f"no notify message {first_line!r} within {timeout_s} s")
            time.sleep(0.01)

    def take_all(self) -> list[list[str]]:
        """Every message received so far (removed from the record)."""
        with self._lock:
            out, self._messages = self._messages, []
        return out

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._sock.close()
