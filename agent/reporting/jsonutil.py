"""Compact JSON as the agent writes it on every wire and log: no spaces, UTF-8 kept as is
(not ``\\u`` escaped), NaN and infinities refused (``ValueError``: not JSON)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["compact_json"]


def compact_json(obj: Any) -> str:
    """``obj`` as compact JSON text; ``TypeError``/``ValueError`` when it is not serialisable
    (each caller turns those into its own error)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
