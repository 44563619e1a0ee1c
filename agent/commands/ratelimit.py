"""Token buckets: ``rate_per_s`` tokens refill per second up to ``burst``; a command takes one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s < 0 or burst < 1:
            raise ValueError(
                f"token bucket needs rate >= 0 and burst >= 1 (got {rate_per_s}, {burst})"
            )
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._t = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False
