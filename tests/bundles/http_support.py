"""A real HTTP server for URL installs (http.server on 127.0.0.1, in a thread).

It honours ``Range`` (or ignores it on demand), can drop the connection part-way through a
body, leave out or lie about ``Content-Length``, answer a status instead of the body (404,
503), and be slow. ``requests`` records the ``Range`` header of every GET.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["BundleServer", "serving"]


class BundleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.send_length = True
        self.announce: int | None = None  # a Content-Length that is not the body's (a lie)
        self.drops: list[int] = []  # per request, in turn: body bytes sent before hanging up
        self.statuses: list[int] = []  # per request, in turn: answer this status instead
        self.delay_s = 0.0
        self.chunk = 32 * 1024
        self.requests: list[str | None] = []  # the Range header of each GET
        self.stop = threading.Event()

    def url(self, path: str = "/b.bundle") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    server: BundleServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        wanted = self.headers.get("Range")
        srv.requests.append(wanted)
        if srv.statuses:
            self.send_error(srv.statuses.pop(0))
            return
        if self.path not in srv.files:
            self.send_error(404)
            return
        body = srv.files[self.path]
        start = 0
        if wanted and srv.honour_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if srv.send_length:
            length = srv.announce if srv.announce is not None else len(body) - start
            self.send_header("Content-Length", str(length))
        self.end_headers()
        end = start + srv.drops.pop(0) if srv.drops else len(body)
        try:
            for offset in range(start, end, srv.chunk):
                self.wfile.write(body[offset : min(offset + srv.chunk, end)])
                if srv.delay_s and srv.stop.wait(srv.delay_s):
                    return
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away (killed): fine
        self.close_connection = True


@contextmanager
def serving(files: Mapping[str, bytes]) -> Iterator[BundleServer]:
    """A running server with ``files`` (URL path -> body); shut down on exit."""
    srv = BundleServer()
    srv.files.update(files)
    thread = threading.Thread(
        target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
    )
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
