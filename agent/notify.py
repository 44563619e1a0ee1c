"""The systemd notify protocol, spoken directly on ``$NOTIFY_SOCKET`` (no libsystemd).

Each message is one datagram of newline-separated ``KEY=VALUE`` assignments sent to the
AF_UNIX datagram socket named by ``NOTIFY_SOCKET``; a leading ``@`` names a socket in the
abstract namespace (the ``@`` becomes a NUL byte). The agent sends:

- ``READY=1`` (with ``STATUS=``) once reporting is up and the pipelines are started or have
  failed (then the status says ``degraded``),
- ``STATUS=...`` on every state change,
- ``EXTEND_TIMEOUT_USEC=...`` before long start steps (model loads), so ``TimeoutStartSec`` is
  not hit while work progresses,
- ``WATCHDOG=1`` from the watchdog pinger (see ``agent.health``),
- ``STOPPING=1`` when a stop begins.

Without ``NOTIFY_SOCKET`` every call is a no-op. A socket that cannot be reached is logged once
as a warning and the agent keeps running (systemd then simply does not hear from it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["NOTIFY_SOCKET_ENV", "SEND_TIMEOUT_S", "Notifier"]

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
SEND_TIMEOUT_S = 2.0
"""Longest a send waits on a full socket queue before the message is dropped (and logged)."""

_log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to one socket address; thread-safe; ``close()`` frees the socket."""

    def __init__(self, address: str | None, *, send_timeout_s: float = SEND_TIMEOUT_S) -> None:
        self._address = address or None
        self._send_timeout_s = send_timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False
        self._closed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` (a no-op one when it is unset or empty)."""
        env = os.environ if environ is None else environ
        return cls(env.get(NOTIFY_SOCKET_ENV))

    @property
    def enabled(self) -> bool:
        """True when a socket address is configured (whether or not it is reachable)."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        return self._address

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status))

    def status(self, status: str) -> bool:
        return self.send(_status(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", _status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for ``seconds`` more before the start (or stop) times out."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was delivered to the socket."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        with self._lock:
            if self._closed:
                return False
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                    # a receiver that stops reading must not stall the agent
                    self._sock.settimeout(self._send_timeout_s)
                self._sock.sendto(payload, _socket_address(self._address))
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    _log.warning(
                        "cannot send to %s=%s (%s); systemd will not hear from this agent, "
                        "which keeps running",
                        NOTIFY_SOCKET_ENV,
                        self._address,
                        exc.strerror or exc,
                    )
                else:
                    _log.debug("notify send failed: %s", exc)
                return False
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _socket_address(address: str) -> str:
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())
