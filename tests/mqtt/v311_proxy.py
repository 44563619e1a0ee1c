"""A TCP proxy in front of the real mosquitto that behaves like an MQTT 3.1.1-only broker: it
answers an MQTT 5 CONNECT with the 3.1.1 CONNACK "unacceptable protocol version" (what a v3
broker sends) and closes; any other CONNECT is forwarded, and the connection piped both ways.
"""

from __future__ import annotations

import contextlib
import socket
import threading


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> bytes:
    header = _read_exact(sock, 1)
    length, mult, raw_len = 0, 1, b""
    while True:
        byte = _read_exact(sock, 1)
        raw_len += byte
        length += (byte[0] & 0x7F) * mult
        mult *= 128
        if not byte[0] & 0x80:
            break
    return header + raw_len + _read_exact(sock, length)


class V311OnlyProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.refused_v5 = 0
        self.forwarded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(conn)
            try:
                packet = _read_packet(conn)
            except (ConnectionError, OSError):
                return
            # CONNECT: header, remaining length, 00 04 'MQTT', protocol level
            name_at = 1 + next(i for i in range(1, 5) if not packet[i] & 0x80)
            level = packet[name_at + 6]
            if level == 5:
                self.refused_v5 += 1
                conn.sendall(b"\x20\x02\x00\x01")
                return
            self.forwarded += 1
            up = stack.enter_context(socket.create_connection(("127.0.0.1", self.upstream_port)))
            up.sendall(packet)
            t = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
            t.start()
            _pipe(conn, up)
            t.join(5)

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self._thread.join(2)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
