"""Thread CPU affinity: pin the calling thread, size runtime thread pools from a CPU set.

On Linux ``sched_setaffinity(0, ...)`` acts on the *calling thread* (a task), not on the whole
process, so each pipeline stage calls :func:`pin_current_thread` as the first thing its thread
does. Threads created afterwards inherit the mask of the thread that created them, which is how
ONNX Runtime's and llama.cpp's worker threads end up on the stage's CPUs.

Thread counts handed to the runtimes come from :func:`thread_count` of the pinned set, never from
``os.cpu_count()`` (which counts every CPU of the machine, not the ones this process may use).

CPU sets are written in the kernel's cpulist format (``"0-3,6"``): :func:`parse_cpulist` reads it
(sysfs files, config values) and :func:`format_cpulist` writes it (status, reports).
"""

from __future__ import annotations

import os

from engines.errors import AffinityError

__all__ = [
    "MAX_CPU",
    "current_thread_cpus",
    "format_cpulist",
    "parse_cpulist",
    "pin_current_thread",
    "thread_count",
]

MAX_CPU = 8191
"""Highest CPU number accepted (the kernel's largest NR_CPUS); guards against ``0-99999999``."""


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse a cpulist such as ``"0-3,6"`` (kernel format; whitespace around items allowed).

    Raises ``ValueError`` with a one-line message naming the bad item; an empty string is an
    empty set (sysfs writes an empty line for a node without CPUs).
    """
    cpus: set[int] = set()
    for raw in text.strip().split(","):
        item = raw.strip()
        if not item:
            if text.strip():
                msg = f"empty item in CPU list {text.strip()!r}"
                raise ValueError(msg)
            continue
        first, sep, last = item.partition("-")
        if not _is_number(first) or (sep and not _is_number(last)):
            msg = f"bad CPU list item {item!r} in {text.strip()!r}: expected N or N-M (e.g. 0-3,6)"
            raise ValueError(msg)
        lo = int(first)
        hi = int(last) if sep else lo
        if hi < lo:
            msg = f"bad CPU range {item!r} in {text.strip()!r}: the end is below the start"
            raise ValueError(msg)
        if hi > MAX_CPU:
            msg = f"CPU {hi} in {text.strip()!r} is above the highest possible CPU {MAX_CPU}"
            raise ValueError(msg)
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def _is_number(text: str) -> bool:
    stripped = text.strip()
    return stripped.isascii() and stripped.isdigit()


def format_cpulist(cpus: frozenset[int] | set[int]) -> str:
    """Write ``cpus`` as a cpulist: runs become ranges (``{0,1,2,3,6}`` -> ``0-3,6``)."""
    parts: list[str] = []
    ordered = sorted(cpus)
    index = 0
    while index < len(ordered):
        start = end = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == end + 1:
            index += 1
            end = ordered[index]
        parts.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(parts)


def current_thread_cpus() -> frozenset[int]:
    """The CPUs the calling thread may run on (``sched_getaffinity(0)``)."""
    return frozenset(os.sched_getaffinity(0))


def pin_current_thread(cpus: frozenset[int]) -> None:
    """Restrict the calling thread to ``cpus``; threads it creates afterwards inherit the mask.

    Raises ``AffinityError`` for an empty set or when the kernel refuses the set (a CPU that is
    offline, does not exist, or lies outside the cgroup cpuset).
    """
    if not cpus:
        msg = "cannot pin a thread to an empty CPU set: give at least one CPU in the pinning config"
        raise AffinityError(msg)
    if any(cpu < 0 for cpu in cpus):
        msg = f"cannot pin a thread to negative CPU numbers {format_cpulist(cpus)}"
        raise AffinityError(msg)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        allowed = format_cpulist(current_thread_cpus())
        msg = (
            f"cannot pin thread to CPUs {format_cpulist(cpus)}: {exc.strerror or exc}; "
            f"this thread may use CPUs {allowed} (cgroup cpuset / CPUAffinity=)"
        )
        raise AffinityError(msg) from exc
    except OverflowError as exc:
        msg = f"cannot pin thread to CPUs {format_cpulist(cpus)}: CPU number too large"
        raise AffinityError(msg) from exc


def thread_count(cpus: frozenset[int]) -> int:
    """Threads to give a runtime pinned to ``cpus``: one per CPU, at least 1."""
    return max(1, len(cpus))
