"""Small readers of Linux ``/proc`` and ``/sys`` text shared by pinning, NUMA and ``info``.

``root`` arguments let tests point the readers at a fake tree (``<root>/proc/self/status``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["kb_value", "kb_values", "proc_status_field"]


def proc_status_field(key: str, root: Path = Path("/")) -> str | None:
    """The value of ``key`` in ``<root>/proc/self/status`` (stripped); None when the file is
    unreadable or has no such line."""
    try:
        text = (root / "proc/self/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value.strip()
    return None


def kb_value(text: str) -> int | None:
    """The number of a ``"N kB"`` value (``/proc`` writes sizes so); None when not a number."""
    parts = text.split()
    return int(parts[0]) if parts and parts[0].isdigit() else None


def kb_values(text: str) -> dict[str, int]:
    """Every ``Key: N kB`` line of a meminfo-style file as ``{Key: N}``.

    Works for ``/proc/meminfo`` and for sysfs ``node*/meminfo``, whose keys carry a
    ``Node N`` prefix (the key is the last word before the colon). Lines without a number are
    left out.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = name.split()
        number = kb_value(rest)
        if words and number is not None:
            values.setdefault(words[-1], number)
    return values
