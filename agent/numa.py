"""NUMA topology from sysfs and the memory policy through libnuma (loaded with ctypes).

Topology comes from ``/sys/devices/system/node/node*/`` (``cpulist`` and ``meminfo``); a kernel
without NUMA support has no such folder and the machine is reported as having no nodes.

The memory policy (``bind``, ``preferred``, ``interleave``) is set with libnuma's
``numa_set_membind`` / ``numa_set_preferred`` / ``numa_set_interleave_mask`` and read back with
``get_mempolicy`` (libnuma's syscall wrapper). A Linux memory policy belongs to a *thread*: it is
applied to the calling thread and inherited by the threads it creates afterwards, so the agent
applies it from the main thread before any worker starts.

libnuma is optional at run time: when it cannot be loaded (package ``libnuma1`` missing) or the
kernel reports NUMA as unavailable, :class:`LibNuma` raises ``NumaUnavailableError`` and
:func:`apply_memory_policy` turns that into a warning; the agent keeps running with the default
policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import NumaUnavailableError, PinningError
from agent.sysfs import kb_values, proc_status_field
from engines.affinity import format_cpulist, parse_cpulist

__all__ = [
    "DEFAULT_LIBRARY",
    "LibNuma",
    "MemoryPolicy",
    "NumaNode",
    "NumaOutcome",
    "NumaPolicy",
    "apply_memory_policy",
    "mems_allowed",
    "nodes_of_cpus",
    "read_nodes",
]

NumaPolicy = Literal["none", "bind", "preferred", "interleave"]

DEFAULT_LIBRARY = "libnuma.so.1"
"""Loaded when ``ctypes.util.find_library("numa")`` finds nothing (Debian: package libnuma1)."""

_NODE_DIR = Path("sys/devices/system/node")
_NODE_NAME = re.compile(r"^node(\d+)$")

# Kernel MPOL_* modes (include/uapi/linux/mempolicy.h), as get_mempolicy returns them.
_MODE_NAMES = {
    0: "default",
    1: "preferred",
    2: "bind",
    3: "interleave",
    4: "local",
    5: "preferred_many",
    6: "weighted_interleave",
}
_MODE_MASK = 0x1FFF  # drops MPOL_F_STATIC_NODES / _RELATIVE_NODES / _NUMA_BALANCING
_MASK_WORDS = 16  # 16 x 64 bits = 1024 nodes, the kernel's largest MAX_NUMNODES
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node: its number, its CPUs and its memory (``None`` when sysfs has no meminfo)."""

    node: int
    cpus: frozenset[int]
    mem_total_kb: int | None

    def to_status(self) -> dict[str, object]:
        return {
            "node": self.node,
            "cpus": format_cpulist(self.cpus),
            "mem_total_kb": self.mem_total_kb,
        }


@dataclass(frozen=True)
class MemoryPolicy:
    """A thread's memory policy as the kernel reports it (``mode`` is the MPOL name)."""

    mode: str
    nodes: frozenset[int]

    def to_status(self) -> dict[str, object]:
        return {"mode": self.mode, "nodes": format_cpulist(self.nodes)}


@dataclass(frozen=True)
class NumaOutcome:
    """What :func:`apply_memory_policy` did: ``applied`` and the read-back, or a warning."""

    requested: NumaPolicy
    nodes: frozenset[int]
    applied: bool
    readback: MemoryPolicy | None
    warning: str | None

    def to_status(self) -> dict[str, object]:
        return {
            "requested": self.requested,
            "nodes": format_cpulist(self.nodes),
            "applied": self.applied,
            "readback": self.readback.to_status() if self.readback else None,
            "warning": self.warning,
        }


def read_nodes(root: Path = Path("/")) -> tuple[NumaNode, ...]:
    """NUMA nodes from ``<root>/sys/devices/system/node``, sorted; empty without NUMA support.

    A node folder whose ``cpulist`` cannot be parsed raises ``PinningError`` naming the file.
    """
    base = root / _NODE_DIR
    if not base.is_dir():
        return ()
    nodes: list[NumaNode] = []
    for entry in base.iterdir():
        match = _NODE_NAME.match(entry.name)
        if not match or not entry.is_dir():
            continue
        cpulist_file = entry / "cpulist"
        try:
            cpus = parse_cpulist(cpulist_file.read_text(encoding="ascii"))
        except FileNotFoundError:
            cpus = frozenset()
        except (OSError, ValueError) as exc:
            msg = f"cannot read NUMA node CPUs from {cpulist_file}: {exc}"
            raise PinningError(msg) from exc
        nodes.append(NumaNode(int(match.group(1)), cpus, _node_memory_kb(entry / "meminfo")))
    return tuple(sorted(nodes, key=lambda n: n.node))


def _node_memory_kb(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return kb_values(text).get("MemTotal")


def mems_allowed(root: Path = Path("/")) -> frozenset[int] | None:
    """Memory nodes the cpuset allows (``Mems_allowed_list`` of ``/proc/self/status``)."""
    value = proc_status_field("Mems_allowed_list", root)
    if value is None:
        return None
    try:
        return parse_cpulist(value)
    except ValueError:
        return None


def nodes_of_cpus(nodes: tuple[NumaNode, ...], cpus: frozenset[int]) -> frozenset[int]:
    """The nodes that own at least one of ``cpus`` (the "local" nodes of a CPU set)."""
    return frozenset(n.node for n in nodes if n.cpus & cpus)


class _Bitmask(ctypes.Structure):
    # struct bitmask { unsigned long size; unsigned long *maskp; } (numa.h)
    _fields_ = (("size", ctypes.c_ulong), ("maskp", ctypes.POINTER(ctypes.c_ulong)))


_BitmaskPtr = ctypes.POINTER(_Bitmask)


class LibNuma:
    """libnuma loaded through ctypes. ``name`` picks the library (tests pass a missing one).

    Raises ``NumaUnavailableError`` when the library cannot be loaded, lacks a needed symbol, or
    ``numa_available()`` says the kernel has no NUMA support.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or ctypes.util.find_library("numa") or DEFAULT_LIBRARY
        try:
            lib = ctypes.CDLL(self.name, use_errno=True)
            self._declare(lib)
        except OSError as exc:
            msg = f"libnuma not loadable ({exc}); install libnuma1 for NUMA policies"
            raise NumaUnavailableError(msg) from exc
        except AttributeError as exc:
            msg = f"libnuma {self.name} lacks {exc}; a libnuma >= 2.0.8 is needed"
            raise NumaUnavailableError(msg) from exc
        self._lib = lib
        if lib.numa_available() < 0:
            msg = f"numa_available() < 0 in {self.name}: the kernel has no NUMA support"
            raise NumaUnavailableError(msg)

    @staticmethod
    def _declare(lib: ctypes.CDLL) -> None:
        lib.numa_available.argtypes = []
        lib.numa_available.restype = ctypes.c_int
        lib.numa_max_node.argtypes = []
        lib.numa_max_node.restype = ctypes.c_int
        lib.numa_allocate_nodemask.argtypes = []
        lib.numa_allocate_nodemask.restype = _BitmaskPtr
        lib.numa_bitmask_setbit.argtypes = [_BitmaskPtr, ctypes.c_uint]
        lib.numa_bitmask_setbit.restype = _BitmaskPtr
        lib.numa_bitmask_isbitset.argtypes = [_BitmaskPtr, ctypes.c_uint]
        lib.numa_bitmask_isbitset.restype = ctypes.c_int
        lib.numa_bitmask_free.argtypes = [_BitmaskPtr]
        lib.numa_bitmask_free.restype = None
        lib.numa_set_membind.argtypes = [_BitmaskPtr]
        lib.numa_set_membind.restype = None
        lib.numa_set_interleave_mask.argtypes = [_BitmaskPtr]
        lib.numa_set_interleave_mask.restype = None
        lib.numa_set_preferred.argtypes = [ctypes.c_int]
        lib.numa_set_preferred.restype = None
        lib.numa_set_localalloc.argtypes = []
        lib.numa_set_localalloc.restype = None
        lib.numa_get_membind.argtypes = []
        lib.numa_get_membind.restype = _BitmaskPtr
        lib.get_mempolicy.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_uint,
        ]
        lib.get_mempolicy.restype = ctypes.c_long

    def max_node(self) -> int:
        """The highest node number the system has (``numa_max_node``)."""
        return int(self._lib.numa_max_node())

    @contextmanager
    def _nodemask(self, nodes: frozenset[int]) -> Iterator[ctypes._Pointer[_Bitmask]]:
        mask = self._lib.numa_allocate_nodemask()
        if not mask:
            msg = "numa_allocate_nodemask() returned NULL (out of memory)"
            raise PinningError(msg)
        try:
            for node in sorted(nodes):
                self._lib.numa_bitmask_setbit(mask, node)
            yield mask
        finally:
            self._lib.numa_bitmask_free(mask)

    def _check_nodes(self, nodes: frozenset[int]) -> None:
        highest = self.max_node()
        bad = sorted(n for n in nodes if n < 0 or n > highest)
        if not nodes or bad:
            msg = (
                f"NUMA nodes {format_cpulist(frozenset(bad)) or '(none)'} do not exist; "
                f"this machine has nodes 0-{highest}"
            )
            raise PinningError(msg)

    def set_policy(self, policy: NumaPolicy, nodes: frozenset[int]) -> None:
        """Set the calling thread's memory policy; ``none`` restores local allocation."""
        if policy == "none":
            self._lib.numa_set_localalloc()
            return
        self._check_nodes(nodes)
        if policy == "preferred":
            if len(nodes) != 1:
                msg = f"numa policy 'preferred' takes one node, got {format_cpulist(nodes)}"
                raise PinningError(msg)
            self._lib.numa_set_preferred(next(iter(nodes)))
            return
        with self._nodemask(nodes) as mask:
            if policy == "bind":
                self._lib.numa_set_membind(mask)
            else:
                self._lib.numa_set_interleave_mask(mask)

    def current_policy(self) -> MemoryPolicy:
        """The calling thread's policy read back from the kernel with ``get_mempolicy``."""
        mode = ctypes.c_int(-1)
        words = (ctypes.c_ulong * _MASK_WORDS)()
        rc = self._lib.get_mempolicy(ctypes.byref(mode), words, _MASK_WORDS * _ULONG_BITS, None, 0)
        if rc != 0:
            errno = ctypes.get_errno()
            msg = f"get_mempolicy failed: errno {errno}"
            raise PinningError(msg)
        nodes = frozenset(
            word_index * _ULONG_BITS + bit
            for word_index, word in enumerate(words)
            for bit in range(_ULONG_BITS)
            if word >> bit & 1
        )
        return MemoryPolicy(_MODE_NAMES.get(mode.value & _MODE_MASK, f"mode{mode.value}"), nodes)

    def membind(self) -> frozenset[int]:
        """Nodes the calling thread may allocate from (``numa_get_membind``)."""
        mask = self._lib.numa_get_membind()
        if not mask:
            msg = "numa_get_membind() returned NULL"
            raise PinningError(msg)
        try:
            return frozenset(
                node
                for node in range(self.max_node() + 1)
                if self._lib.numa_bitmask_isbitset(mask, node)
            )
        finally:
            self._lib.numa_bitmask_free(mask)


_EXPECTED_MODES = {
    "bind": ("bind",),
    "preferred": ("preferred", "preferred_many"),
    "interleave": ("interleave", "weighted_interleave"),
}


def apply_memory_policy(
    policy: NumaPolicy, nodes: frozenset[int], *, library: str | None = None
) -> NumaOutcome:
    """Apply ``policy`` on ``nodes`` to the calling thread and verify it with ``get_mempolicy``.

    A missing libnuma (or a kernel without NUMA) gives ``applied=False`` and a warning. A policy
    the kernel does not report back as set raises ``PinningError``.
    """
    if policy == "none":
        return NumaOutcome(policy, nodes, applied=False, readback=None, warning=None)
    try:
        lib = LibNuma(library)
    except NumaUnavailableError as exc:
        warning = (
            f"NUMA memory policy {policy!r} on nodes {format_cpulist(nodes)} not applied: {exc}"
        )
        return NumaOutcome(policy, nodes, applied=False, readback=None, warning=warning)
    lib.set_policy(policy, nodes)
    readback = lib.current_policy()
    if readback.mode not in _EXPECTED_MODES[policy] or readback.nodes != nodes:
        msg = (
            f"NUMA memory policy {policy!r} on nodes {format_cpulist(nodes)} did not take effect: "
            f"the kernel reports {readback.mode!r} on nodes {format_cpulist(readback.nodes) or '-'}"
            " (are the nodes in the cgroup's cpuset.mems?)"
        )
        raise PinningError(msg)
    return NumaOutcome(policy, nodes, applied=True, readback=readback, warning=None)
