"""MQTT-style topic filters on relative topics: ``+`` matches one level, a final ``#`` any."""

from __future__ import annotations

__all__ = ["check_filter", "topic_matches"]


def check_filter(pattern: str) -> str:
    """``pattern`` if it is a well-formed filter, else ``ValueError`` naming the problem."""
    levels = pattern.split("/")
    if not pattern or any(level == "" for level in levels):
        msg = f"topic filter {pattern!r} has an empty level"
        raise ValueError(msg)
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            msg = f"topic filter {pattern!r}: '#' must be a whole last level"
            raise ValueError(msg)
        if "+" in level and level != "+":
            msg = f"topic filter {pattern!r}: '+' must be a whole level"
            raise ValueError(msg)
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """True if the relative ``topic`` matches the filter ``pattern``."""
    want = pattern.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or level not in ("+", have[i]):
            return False
    return len(want) == len(have)
