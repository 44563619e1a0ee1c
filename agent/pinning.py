"""CPU, NUMA and scheduling pinning: validate the config into a plan, apply it to the process.

Two steps, so that ``edge-agent config validate`` can check a config without touching the
process:

- :func:`plan_pinning` (pure): resolves every CPU set of ``[pinning]`` against the CPUs this
  process may use (``sched_getaffinity``, which already reflects the cgroup cpuset and systemd's
  ``CPUAffinity=``) and the NUMA nodes of ``/sys/devices/system/node``. A CPU outside the allowed
  set, a stage CPU outside the process set, or a NUMA node that does not exist is a
  ``PinningError`` naming the config key, the bad values and what is allowed.
- :func:`apply_process_pinning` (at agent start, from the main thread, before any worker
  starts): pins every existing thread to the process set, sets the NUMA memory policy (libnuma),
  the nice value, SCHED_FIFO and ``mlockall``. Threads created afterwards inherit all of it;
  each stage thread then narrows itself with ``engines.affinity.pin_current_thread``.

A refused affinity is an error (the agent would run on CPUs the operator reserved for something
else). A refused nice/SCHED_FIFO/mlockall (no CAP_SYS_NICE / CAP_IPC_LOCK, rlimits) or a missing
libnuma is a warning in the report: the agent runs, and status says what was not applied.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from agent.config import CpuSpec, PinningConfig
from agent.errors import PinningError
from agent.numa import (
    NumaNode,
    NumaOutcome,
    NumaPolicy,
    apply_memory_policy,
    mems_allowed,
    nodes_of_cpus,
    read_nodes,
)
from agent.sysfs import kb_value, proc_status_field
from engines.affinity import (
    MAX_CPU,
    current_thread_cpus,
    format_cpulist,
    parse_cpulist,
    thread_count,
)

__all__ = [
    "STAGES",
    "CgroupCpus",
    "PinningPlan",
    "PinningReport",
    "allowed_cpus",
    "apply_process_pinning",
    "cgroup_cpus",
    "parse_cpu_spec",
    "pinning_problems",
    "plan_pinning",
]

STAGES = ("capture", "preprocess", "inference", "postprocess", "llm", "reporting")
"""Pipeline stages that have a CPU set of their own (``[pinning.stages]``)."""

_AUTO = "auto"

_SCHED_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
}


def _mlockall_flags() -> int:
    """MCL_CURRENT | MCL_FUTURE; their values differ on a few architectures (asm/mman.h)."""
    machine = platform.machine().lower()
    if machine.startswith(("ppc", "powerpc", "sparc", "alpha")):
        return 0x2000 | 0x4000
    return 1 | 2


def allowed_cpus() -> frozenset[int]:
    """CPUs the calling thread may use: ``sched_getaffinity(0)`` (cgroup cpuset applied).

    Call it from the main thread before any pinning: a pinned thread sees only its own set.
    """
    return current_thread_cpus()


@dataclass(frozen=True)
class CgroupCpus:
    """The effective CPU set of this process's cgroup, and the file it was read from."""

    path: Path
    cpus: frozenset[int]

    def to_status(self) -> dict[str, str]:
        return {"path": str(self.path), "cpus": format_cpulist(self.cpus)}


def cgroup_cpus(root: Path = Path("/")) -> CgroupCpus | None:
    """The cgroup's effective cpuset (v2 ``cpuset.cpus.effective``, v1 ``cpuset.effective_cpus``).

    The process's own cgroup (from ``/proc/self/cgroup``) is tried first, then the hierarchy
    root; ``None`` when no such file is readable. Only reported: the kernel already applies it
    to ``sched_getaffinity``.
    """
    cgroup_root = root / "sys/fs/cgroup"
    candidates: list[Path] = []
    try:
        lines = (root / "proc/self/cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates.append(cgroup_root / relative / "cpuset.cpus.effective")
        elif "cpuset" in controllers.split(","):
            candidates.append(cgroup_root / "cpuset" / relative / "cpuset.effective_cpus")
    candidates += [
        cgroup_root / "cpuset.cpus.effective",
        cgroup_root / "cpuset" / "cpuset.effective_cpus",
    ]
    for candidate in candidates:
        try:
            cpus = parse_cpulist(candidate.read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue
        if cpus:
            return CgroupCpus(candidate, cpus)
    return None


def parse_cpu_spec(spec: CpuSpec, allowed: frozenset[int], *, key: str) -> frozenset[int]:
    """Resolve one config CPU set: ``"auto"`` (= ``allowed``), ``"0-3,6"`` or ``[0, 1]``.

    Raises ``PinningError`` naming ``key`` for an empty or malformed set and for CPUs outside
    ``allowed``.
    """
    allowed_text = format_cpulist(allowed) or "(none)"
    if isinstance(spec, str):
        text = spec.strip()
        if text == _AUTO:
            if not allowed:
                msg = '"auto" but no CPU is allowed to this process'
                raise PinningError(msg, key=key)
            return allowed
        try:
            cpus = parse_cpulist(text)
        except ValueError as exc:
            raise PinningError(str(exc), key=key) from exc
    else:
        bad_items = [
            cpu
            for cpu in spec
            if isinstance(cpu, bool) or not isinstance(cpu, int) or not 0 <= cpu <= MAX_CPU
        ]
        if bad_items:
            msg = f"{bad_items!r} are not CPU numbers (0-{MAX_CPU})"
            raise PinningError(msg, key=key)
        cpus = frozenset(spec)
    if not cpus:
        msg = 'empty CPU set; write "auto", a list such as "0-3,6", or [0, 1]'
        raise PinningError(msg, key=key)
    outside = cpus - allowed
    if outside:
        msg = (
            f"CPUs {format_cpulist(outside)} are outside the allowed set {allowed_text} "
            f"(sched_getaffinity: cgroup cpuset, CPUAffinity=, taskset); "
            f'use CPUs from {allowed_text} or "auto"'
        )
        raise PinningError(msg, key=key)
    return cpus


@dataclass(frozen=True)
class PinningPlan:
    """Validated pinning: every stage has a CPU set (unset stages inherit ``process_cpus``).

    ``nodes`` is the NUMA topology the plan was checked against (reported by
    :func:`apply_process_pinning`, not part of :meth:`to_status`).
    """

    allowed_cpus: frozenset[int]
    process_cpus: frozenset[int]
    stage_cpus: Mapping[str, frozenset[int]]
    numa_policy: NumaPolicy
    numa_nodes: frozenset[int]
    nodes: tuple[NumaNode, ...]
    nice: int | None
    sched_fifo_priority: int
    mlockall: bool

    def cpus_for(self, stage: str) -> frozenset[int]:
        """The CPU set of ``stage`` (one of :data:`STAGES`)."""
        try:
            return self.stage_cpus[stage]
        except KeyError:
            msg = f"unknown pipeline stage {stage!r}; stages are {', '.join(STAGES)}"
            raise PinningError(msg) from None

    def threads_for(self, stage: str) -> int:
        """Thread count for a runtime running in ``stage`` (one per pinned CPU, at least 1)."""
        return thread_count(self.cpus_for(stage))

    def to_status(self) -> dict[str, object]:
        return {
            "allowed_cpus": format_cpulist(self.allowed_cpus),
            "process_cpus": format_cpulist(self.process_cpus),
            "stage_cpus": {s: format_cpulist(c) for s, c in self.stage_cpus.items()},
            "numa_policy": self.numa_policy,
            "numa_nodes": format_cpulist(self.numa_nodes),
            "nice": self.nice,
            "sched_fifo_priority": self.sched_fifo_priority,
            "mlockall": self.mlockall,
        }


def plan_pinning(
    cfg: PinningConfig,
    allowed: frozenset[int] | None = None,
    *,
    nodes: tuple[NumaNode, ...] | None = None,
    mems: frozenset[int] | None = None,
) -> PinningPlan:
    """Validate ``cfg`` into a :class:`PinningPlan` without changing anything.

    ``allowed`` defaults to :func:`allowed_cpus`, ``nodes`` to the sysfs NUMA nodes and
    ``mems`` to the cpuset's ``Mems_allowed_list``. Raises the first ``PinningError`` (one
    line, naming the ``pinning.*`` key) for anything that cannot be applied on this machine;
    :func:`pinning_problems` lists all of them.
    """
    plan, problems = _resolve(cfg, allowed, nodes, mems)
    if plan is None:
        raise problems[0]
    return plan


def pinning_problems(
    cfg: PinningConfig,
    allowed: frozenset[int] | None = None,
    *,
    nodes: tuple[NumaNode, ...] | None = None,
    mems: frozenset[int] | None = None,
) -> list[PinningError]:
    """Every reason ``cfg`` cannot be applied here (for ``config validate``); empty when valid.

    Each message starts with its key (``pinning.stages.llm: ...``).
    """
    return _resolve(cfg, allowed, nodes, mems)[1]


def _resolve(
    cfg: PinningConfig,
    allowed: frozenset[int] | None,
    nodes: tuple[NumaNode, ...] | None,
    mems: frozenset[int] | None,
) -> tuple[PinningPlan | None, list[PinningError]]:
    if allowed is None:
        allowed = allowed_cpus()
    problems: list[PinningError] = []
    try:
        process = parse_cpu_spec(cfg.process, allowed, key="pinning.process")
    except PinningError as exc:
        problems.append(exc)
        process = allowed  # keep checking the stages against what is allowed
    stages: dict[str, frozenset[int]] = {}
    for stage in STAGES:
        spec: CpuSpec | None = getattr(cfg.stages, stage)
        try:
            stages[stage] = _stage_cpus(spec, allowed, process, key=f"pinning.stages.{stage}")
        except PinningError as exc:
            problems.append(exc)
    if nodes is None:
        nodes = read_nodes()
    if mems is None:
        mems = mems_allowed()
    try:
        numa_nodes = _plan_numa(cfg, process, nodes, mems)
    except PinningError as exc:
        problems.append(exc)
    if problems:
        return None, problems
    plan = PinningPlan(
        allowed_cpus=allowed,
        process_cpus=process,
        stage_cpus=MappingProxyType(stages),
        numa_policy=cfg.numa_policy,
        numa_nodes=numa_nodes,
        nodes=nodes,
        nice=cfg.nice,
        sched_fifo_priority=cfg.sched_fifo_priority,
        mlockall=cfg.mlockall,
    )
    return plan, []


def _stage_cpus(
    spec: CpuSpec | None, allowed: frozenset[int], process: frozenset[int], *, key: str
) -> frozenset[int]:
    if spec is None or (isinstance(spec, str) and spec.strip() == _AUTO):
        return process
    cpus = parse_cpu_spec(spec, allowed, key=key)
    outside = cpus - process
    if outside:
        msg = (
            f"CPUs {format_cpulist(outside)} are outside the process set "
            f"pinning.process = {format_cpulist(process)}; a stage can only narrow it"
        )
        raise PinningError(msg, key=key)
    return cpus


def _plan_numa(
    cfg: PinningConfig,
    process: frozenset[int],
    nodes: tuple[NumaNode, ...],
    mems: frozenset[int] | None,
) -> frozenset[int]:
    requested = frozenset(cfg.numa_nodes)
    if cfg.numa_policy == "none":
        if requested:
            msg = (
                f"nodes {format_cpulist(requested)} have no effect while "
                'pinning.numa_policy = "none"; set a policy (bind, preferred, interleave) '
                "or remove numa_nodes"
            )
            raise PinningError(msg, key="pinning.numa_nodes")
        return frozenset()
    if not nodes:
        # Kernel without NUMA: nothing to check against; applying gives a warning.
        return requested
    existing = frozenset(n.node for n in nodes)
    usable = existing & mems if mems is not None else existing
    chosen = requested or nodes_of_cpus(nodes, process)
    bad = chosen - usable
    if bad:
        msg = (
            f"nodes {format_cpulist(bad)} are not usable; this process may "
            f"allocate from nodes {format_cpulist(usable) or '(none)'} "
            "(/sys/devices/system/node, cpuset.mems)"
        )
        raise PinningError(msg, key="pinning.numa_nodes")
    if cfg.numa_policy == "preferred" and len(chosen) != 1:
        msg = (
            f'"preferred" takes exactly one node, got '
            f"{format_cpulist(chosen)}; set pinning.numa_nodes = [N]"
        )
        raise PinningError(msg, key="pinning.numa_policy")
    return chosen


@dataclass(frozen=True)
class PinningReport:
    """What :func:`apply_process_pinning` applied, read back from the kernel."""

    plan: PinningPlan
    cgroup: CgroupCpus | None
    process_cpus: frozenset[int]
    threads_pinned: int
    numa_nodes: tuple[NumaNode, ...]
    numa: NumaOutcome
    nice: int
    sched_policy: str
    sched_priority: int
    mlocked: bool
    locked_kb: int | None
    warnings: tuple[str, ...] = field(default=())

    def to_status(self) -> dict[str, object]:
        """JSON-serialisable summary for status reports and ``edge-agent info``."""
        return {
            "allowed_cpus": format_cpulist(self.plan.allowed_cpus),
            "cgroup": self.cgroup.to_status() if self.cgroup else None,
            "process_cpus": format_cpulist(self.process_cpus),
            "stage_cpus": {s: format_cpulist(c) for s, c in self.plan.stage_cpus.items()},
            "threads_pinned": self.threads_pinned,
            "numa_nodes": [n.to_status() for n in self.numa_nodes],
            "numa_policy": self.numa.to_status(),
            "nice": self.nice,
            "sched": {"policy": self.sched_policy, "priority": self.sched_priority},
            "mlockall": {
                "requested": self.plan.mlockall,
                "applied": self.mlocked,
                "locked_kb": self.locked_kb,
            },
            "warnings": list(self.warnings),
        }


def _task_ids() -> list[int]:
    """This process's threads, the calling one first (it must succeed for the others to)."""
    me = threading.get_native_id()
    try:
        others = [int(t.name) for t in Path("/proc/self/task").iterdir() if int(t.name) != me]
    except OSError:
        others = []
    return [me, *sorted(others)]


def _for_each_thread(action: Callable[[int], None]) -> int:
    """Run ``action(tid)`` for every thread; threads that ended meanwhile are skipped.

    The first other ``OSError`` propagates (the calling thread goes first, so a refusal stops
    before any other thread changed). Returns how many threads were changed.
    """
    done = 0
    for tid in _task_ids():
        done += _on_thread(action, tid)
    return done


def _on_thread(action: Callable[[int], None], tid: int) -> int:
    try:
        action(tid)
    except ProcessLookupError:
        return 0
    return 1


def _pin_all_threads(cpus: frozenset[int]) -> int:
    try:
        pinned = _for_each_thread(lambda tid: os.sched_setaffinity(tid, cpus))
    except OSError as exc:
        msg = (
            f"cannot pin to CPUs {format_cpulist(cpus)}: "
            f"{exc.strerror or exc}; this process may use CPUs {format_cpulist(allowed_cpus())}"
        )
        raise PinningError(msg, key="pinning.process") from exc
    readback = current_thread_cpus()
    if readback != cpus:
        msg = (
            f"asked for CPUs {format_cpulist(cpus)} but the kernel gave "
            f"{format_cpulist(readback)} (cgroup cpuset changed?)"
        )
        raise PinningError(msg, key="pinning.process")
    return pinned


def _set_nice(nice: int, warnings: list[str]) -> None:
    try:
        _for_each_thread(lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice))
    except PermissionError as exc:
        warnings.append(
            f"pinning.nice = {nice} not applied: {exc.strerror} (needs CAP_SYS_NICE or "
            "RLIMIT_NICE, e.g. systemd Nice= or LimitNICE=)"
        )
    except OSError as exc:
        msg = f"setpriority({nice}) failed: {exc.strerror or exc}"
        raise PinningError(msg, key="pinning.nice") from exc


def _set_fifo(priority: int, warnings: list[str]) -> None:
    param = os.sched_param(priority)
    try:
        _for_each_thread(lambda tid: os.sched_setscheduler(tid, os.SCHED_FIFO, param))
    except PermissionError as exc:
        warnings.append(
            f"pinning.sched_fifo_priority = {priority} not applied: {exc.strerror} (needs "
            "CAP_SYS_NICE or RLIMIT_RTPRIO, e.g. systemd LimitRTPRIO=)"
        )
    except OSError as exc:
        msg = f"SCHED_FIFO {priority} failed: {exc.strerror or exc}"
        raise PinningError(msg, key="pinning.sched_fifo_priority") from exc


def _mlockall(warnings: list[str]) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlockall.argtypes = [ctypes.c_int]
    libc.mlockall.restype = ctypes.c_int
    if libc.mlockall(_mlockall_flags()) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.ENOMEM, errno.EAGAIN):
        warnings.append(
            f"pinning.mlockall not applied: {os.strerror(err)} (needs CAP_IPC_LOCK or a "
            "large enough RLIMIT_MEMLOCK, e.g. systemd LimitMEMLOCK=infinity)"
        )
        return False
    msg = f"mlockall failed: {os.strerror(err)}"
    raise PinningError(msg, key="pinning.mlockall")


def _locked_kb() -> int | None:
    value = proc_status_field("VmLck")
    return None if value is None else kb_value(value)


def apply_process_pinning(plan: PinningPlan, *, numa_library: str | None = None) -> PinningReport:
    """Apply ``plan`` to this process; call from the main thread before workers start.

    Order: CPU affinity of every thread, NUMA memory policy (calling thread; inherited by the
    threads it creates), nice and SCHED_FIFO of every thread, ``mlockall``. ``numa_library``
    overrides the libnuma file name. Raises ``PinningError`` when the affinity cannot be set or
    a setting is rejected for a reason other than permissions; permission refusals and a
    missing libnuma are returned as ``warnings``.
    """
    warnings: list[str] = []
    pinned = _pin_all_threads(plan.process_cpus)
    numa = apply_memory_policy(plan.numa_policy, plan.numa_nodes, library=numa_library)
    if numa.warning:
        warnings.append(numa.warning)
    if plan.nice is not None:
        _set_nice(plan.nice, warnings)
    if plan.sched_fifo_priority > 0:
        _set_fifo(plan.sched_fifo_priority, warnings)
    mlocked = _mlockall(warnings) if plan.mlockall else False
    policy = os.sched_getscheduler(0)
    return PinningReport(
        plan=plan,
        cgroup=cgroup_cpus(),
        process_cpus=plan.process_cpus,  # _pin_all_threads checked the kernel's read-back
        threads_pinned=pinned,
        numa_nodes=plan.nodes,
        numa=numa,
        nice=os.getpriority(os.PRIO_PROCESS, 0),
        sched_policy=_SCHED_NAMES.get(policy, f"policy{policy}"),
        sched_priority=os.sched_getparam(0).sched_priority,
        mlocked=mlocked,
        locked_kb=_locked_kb(),
        warnings=tuple(warnings),
    )
