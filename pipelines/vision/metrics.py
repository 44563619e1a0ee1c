"""Pipeline metrics: latency histograms (p50/p95/p99), frame rates and counters.

Everything here is fixed-size: a histogram is a log-spaced bucket array (about 2 % resolution
from 1 µs to ~17 min), a rate meter keeps one counter per second over a short window. Recording
is O(1) under a lock and allocates nothing, so a pipeline can record every frame forever without
its memory growing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["Counters", "LatencyHistogram", "RateMeter"]

_MIN_S = 1e-6
_GROWTH = 1.02
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 1400  # 1e-6 * 1.02**1400 ~ 1.1e6 s


class LatencyHistogram:
    """Cumulative histogram of durations in seconds; percentiles to within ~2 %."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = np.zeros(_BUCKETS + 1, dtype=np.int64)
        self._count = 0
        self._sum = 0.0
        self._max = 0.0

    @staticmethod
    def _bucket(seconds: float) -> int:
        if not seconds > _MIN_S:  # also catches NaN
            return 0
        return min(_BUCKETS, 1 + int(math.log(seconds / _MIN_S) / _LOG_GROWTH))

    def record(self, seconds: float) -> None:
        index = self._bucket(seconds)
        with self._lock:
            self._counts[index] += 1
            self._count += 1
            if not math.isnan(seconds):
                self._sum += seconds
                self._max = max(self._max, seconds)

    @property
    def count(self) -> int:
        return self._count

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0-100) in seconds; ``None`` while empty."""
        with self._lock:
            if self._count == 0:
                return None
            target = max(1, math.ceil(self._count * q / 100.0))
            cumulative = np.cumsum(self._counts)
            index = int(np.searchsorted(cumulative, target))
            high = self._max
        if index == 0:
            return _MIN_S
        # geometric centre of the bucket, never above the largest value seen
        upper = _MIN_S * _GROWTH**index
        return min(high, upper / math.sqrt(_GROWTH))

    def summary_ms(self) -> dict[str, Any]:
        """``{count, mean, p50, p95, p99, max}`` with durations in milliseconds."""
        with self._lock:
            count, total, high = self._count, self._sum, self._max
        if count == 0:
            return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
        out: dict[str, Any] = {"count": count, "mean": round(total / count * 1e3, 4)}
        for q in (50, 95, 99):
            value = self.percentile(q)
            out[f"p{q}"] = None if value is None else round(value * 1e3, 4)
        out["max"] = round(high * 1e3, 4)
        return out


class RateMeter:
    """Events per second: total average and a sliding window of whole seconds."""

    def __init__(self, window_s: int = 5) -> None:
        self._lock = threading.Lock()
        self._window = window_s
        self._slots = np.zeros(window_s + 1, dtype=np.int64)
        self._slot_second = np.full(window_s + 1, -1, dtype=np.int64)
        self._total = 0
        self._started = time.monotonic()

    def mark(self, n: int = 1, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        index = second % len(self._slots)
        with self._lock:
            if self._slot_second[index] != second:
                self._slot_second[index] = second
                self._slots[index] = 0
            self._slots[index] += n
            self._total += n

    @property
    def total(self) -> int:
        return self._total

    def rate(self, now: float | None = None) -> float:
        """Events per second over the last ``window_s`` complete seconds (or since start)."""
        t = time.monotonic() if now is None else now
        second = int(t)
        with self._lock:
            lo = second - self._window
            mask = (self._slot_second >= lo) & (self._slot_second < second)
            events = int(self._slots[mask].sum())
        span = min(float(self._window), t - self._started)
        if span <= 0:
            return 0.0
        # before a full window has passed, average over the (fractional) time since start
        if t - self._started < self._window:
            with self._lock:
                events = self._total
            return events / max(span, 1e-9)
        return events / span

    def average(self, now: float | None = None) -> float:
        t = time.monotonic() if now is None else now
        elapsed = t - self._started
        return self._total / elapsed if elapsed > 0 else 0.0


class Counters:
    """Named monotonically increasing counters (drops, errors, reconnects...)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
