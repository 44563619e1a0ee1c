"""Shared pieces of the vision pipeline tests: a real in-memory sink, a real pipeline context
(model store on the real models, agent watchdog as heartbeat registry) and a real HTTP server
that serves the sample video with byte ranges and can be killed mid-transfer."""

from __future__ import annotations

import http.server
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.health import Watchdog
from agent.notify import Notifier
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig
from pipelines.base import PipelineContext, ResolvedModel
from pipelines.config import VisionPipelineConfig
from pipelines.errors import SinkError, SourceOpenError


class MemorySink:
    """A ResultSink that keeps every message in memory (optionally slow, to test policies)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._messages: list[tuple[str, dict[str, Any]]] = []
        self._closed = False
        self.arrived = threading.Condition(self._lock)

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            if self._closed:
                raise SinkError("memory sink is closed")
            self._messages.append((topic, dict(message)))
            self.arrived.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def messages(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [m for _, m in self._messages if pipeline in (None, m["pipeline"])]

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _ in self._messages}

    def wait_for(self, count: int, timeout_s: float, pipeline: str | None = None) -> bool:
        """True once ``count`` messages (of ``pipeline``) arrived, False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                have = sum(1 for _, m in self._messages if pipeline in (None, m["pipeline"]))
                if have >= count:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.arrived.wait(remaining)


def make_context(
    models_dir: Path, data_dir: Path, state_dir: Path, sink: MemorySink
) -> tuple[PipelineContext, Watchdog]:
    env = {"EDGE_AGENT_MODEL_PATH": str(models_dir), "EDGE_AGENT_DATA_PATH": str(data_dir)}
    store = ModelStore(ModelStoreConfig(allow_download=False), state_dir, env=env)

    def resolve_model(name: str) -> ResolvedModel:
        manifest = store.manifest(name)
        return ResolvedModel(manifest, store.resolve(name), store.labels(manifest))

    def resolve_data(name: str) -> Path:
        if (data_dir / name).is_file():
            return data_dir / name
        if name in {m.name for m in store.manifests()}:
            return store.resolve(name)
        raise SourceOpenError(f"{name!r} is neither a data manifest nor a file under {data_dir}")

    watchdog = Watchdog(Notifier(None), None)
    ctx = PipelineContext(
        sink=sink,
        heartbeats=watchdog,
        resolve_model=resolve_model,
        resolve_data=resolve_data,
        process_cpus=frozenset(os.sched_getaffinity(0)),
    )
    return ctx, watchdog


def vision_config(**overrides: Any) -> VisionPipelineConfig:
    raw: dict[str, Any] = {
        "type": "vision",
        "name": "test",
        "model": "yolox_nano_416",
        "engine": {"type": "onnxruntime"},
        "sources": [{"type": "file", "path": "videos/bikes.mp4"}],
        "policy": "all",
    }
    raw.update(overrides)
    return VisionPipelineConfig.model_validate(raw)


class VideoServer:
    """HTTP server on 127.0.0.1 serving one file with Range support, throttled, killable."""

    def __init__(self, payload: bytes, *, port: int = 0, bytes_per_s: float = 2e6) -> None:
        self.payload = payload
        self.bytes_per_s = bytes_per_s
        self.dead = threading.Event()
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                server.requests += 1
                data = server.payload
                start, end = 0, len(data) - 1
                match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start = int(match[1])
                    end = int(match[2]) if match[2] else end
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                chunk = 16384
                pos = start
                while pos <= end:
                    if server.dead.is_set():
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    piece = data[pos : min(end + 1, pos + chunk)]
                    try:
                        self.wfile.write(piece)
                    except OSError:
                        return
                    pos += len(piece)
                    time.sleep(len(piece) / server.bytes_per_s)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bikes.mp4"

    def kill(self) -> None:
        """Cut every open transfer and stop listening (the port then refuses connections)."""
        self.dead.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
