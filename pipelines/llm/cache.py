"""Bounded stores of saved KV states: prompt prefixes and multi-turn sessions.

``KvLru``: an LRU bounded by entry count and bytes; ``get`` moves an entry to the front,
``put`` evicts from the back until both bounds hold (an entry larger than ``max_bytes`` alone is
not kept). Evictions can be handed to a callback (sessions spill to disk).

``SessionStore``: sessions (their messages and KV state) in a ``KvLru``; with a disk folder an
evicted session is written to ``<dir>/<sha256(session_id)>.session`` (one file, atomically
replaced, bounded by ``max_disk_bytes`` — the oldest files go first) and read back on a miss.
A file from another model (name, size or context size differ) or a damaged file is ignored and
removed, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from engines.llama import KvState

__all__ = ["CacheStats", "KvLru", "Session", "SessionStore"]

_log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MAGIC = b"EASESS1\n"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    inserts: int = 0


class KvLru(Generic[K, V]):
    """LRU of values with a byte size, bounded by ``max_entries`` and ``max_bytes``."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        size_of: Callable[[V], int],
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._on_evict = on_evict
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key, last=False)
            self.stats.hits += 1
            return found[0]

    def peek_keys(self) -> list[K]:
        with self._lock:
            return list(self._items)

    def put(self, key: K, value: V) -> bool:
        """Insert or replace; False when the value alone exceeds the bounds (not kept)."""
        size = self._size_of(value)
        evicted: list[tuple[K, V]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if self.max_entries == 0 or size > self.max_bytes:
                return False
            self._items[key] = (value, size)
            self._items.move_to_end(key, last=False)
            self._bytes += size
            self.stats.inserts += 1
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                k, (v, s) = self._items.popitem(last=True)
                self._bytes -= s
                self.stats.evictions += 1
                evicted.append((k, v))
        if self._on_evict is not None:
            for k, v in evicted:
                self._on_evict(k, v)
        return True

    def pop(self, key: K) -> V | None:
        with self._lock:
            found = self._items.pop(key, None)
            if found is None:
                return None
            self._bytes -= found[1]
            return found[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def status(self) -> dict[str, Any]:
        return {
            "entries": len(self._items),
            "bytes": self._bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "inserts": self.stats.inserts,
            "evictions": self.stats.evictions,
        }


@dataclass
class Session:
    """One conversation: its messages so far and the KV state after its last turn."""

    session_id: str
    messages: list[dict[str, str]] = field(default_factory=list)
    state: KvState | None = None

    @property
    def nbytes(self) -> int:
        text = sum(len(m.get("content", "")) for m in self.messages)
        return text + (self.state.nbytes if self.state is not None else 0)


class SessionStore:
    """Sessions in RAM (LRU) with an optional disk spill (see the module docstring)."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        disk_dir: Path | None,
        max_disk_bytes: int,
        model_identity: Mapping[str, Any],
    ) -> None:
        self._identity = dict(model_identity)
        self._disk = disk_dir
        self._max_disk = max_disk_bytes
        self.disk_writes = 0
        self.disk_reads = 0
        self.disk_errors = 0
        self._lru: KvLru[str, Session] = KvLru(
            max_entries,
            max_bytes,
            lambda s: s.nbytes,
            on_evict=self._spill if disk_dir is not None else None,
        )
        if disk_dir is not None:
            disk_dir.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self._lru.max_entries > 0

    def get(self, session_id: str) -> Session | None:
        found = self._lru.get(session_id)
        if found is not None or self._disk is None:
            return found
        loaded = self._read(session_id)
        if loaded is not None:
            self._lru.put(session_id, loaded)
        return loaded

    def put(self, session: Session) -> None:
        if not self._lru.put(session.session_id, session) and self._disk is not None:
            self._spill(session.session_id, session)  # too large for RAM: disk only

    def drop(self, session_id: str) -> bool:
        found = self._lru.pop(session_id) is not None
        if self._disk is not None:
            path = self._path(session_id)
            if path.exists():
                path.unlink(missing_ok=True)
                found = True
        return found

    # ------------------------------------------------------------------ disk

    def _path(self, session_id: str) -> Path:
        if self._disk is None:  # pragma: no cover - only called with a disk folder
            raise RuntimeError("no session folder")
        return self._disk / f"{hashlib.sha256(session_id.encode()).hexdigest()}.session"

    def _spill(self, session_id: str, session: Session) -> None:
        if self._disk is None or self._max_disk == 0:
            return
        head = json.dumps(
            {
                "session_id": session_id,
                "identity": self._identity,
                "messages": session.messages,
                "tokens": list(session.state.tokens) if session.state else [],
            }
        ).encode()
        data = session.state.data if session.state else b""
        path = self._path(session_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as out:
                out.write(_MAGIC + struct.pack("<Q", len(head)) + head + data)
            tmp.replace(path)
            self.disk_writes += 1
            self._trim_disk()
        except OSError as exc:
            self.disk_errors += 1
            tmp.unlink(missing_ok=True)
            _log.warning("cannot write session %s to %s: %s", session_id, path, exc.strerror)

    def _trim_disk(self) -> None:
        if self._disk is None:  # pragma: no cover
            return
        files = []
        for p in self._disk.glob("*.session"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _mtime, size, p in sorted(files):
            if total <= self._max_disk:
                break
            p.unlink(missing_ok=True)
            total -= size

    def _read(self, session_id: str) -> Session | None:
        path = self._path(session_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.disk_errors += 1
            _log.warning("cannot read session file %s: %s", path, exc.strerror)
            return None
        try:
            session = _parse_session(raw, session_id, self._identity)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            self.disk_errors += 1
            _log.warning("ignoring session file %s (%s); the session starts again", path, exc)
            path.unlink(missing_ok=True)
            return None
        self.disk_reads += 1
        path.unlink(missing_ok=True)  # RAM has it now; written again when evicted
        return session

    def status(self) -> dict[str, Any]:
        out = self._lru.status()
        if self._disk is not None:
            files = list(self._disk.glob("*.session"))
            out["disk"] = {
                "dir": str(self._disk),
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files if p.exists()),
                "max_bytes": self._max_disk,
                "writes": self.disk_writes,
                "reads": self.disk_reads,
                "errors": self.disk_errors,
            }
        return out


def _parse_session(raw: bytes, session_id: str, identity: Mapping[str, Any]) -> Session:
    """A session file's content; ValueError (or KeyError/TypeError) when it does not fit."""
    if not raw.startswith(_MAGIC):
        raise ValueError("bad magic")
    (n,) = struct.unpack_from("<Q", raw, len(_MAGIC))
    start = len(_MAGIC) + 8
    head = json.loads(raw[start : start + n])
    if head.get("session_id") != session_id or head.get("identity") != identity:
        raise ValueError("written for another session or model")
    tokens = tuple(int(t) for t in head["tokens"])
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in head["messages"]]
    data = raw[start + n :]
    state = KvState(tokens, data) if tokens and data else None
    return Session(session_id, messages, state)
