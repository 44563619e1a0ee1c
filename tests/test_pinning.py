"""CPU pinning on the real kernel: thread affinity, process pinning, nice, SCHED_FIFO, mlockall.

Everything that changes the process (affinity of all threads, nice, scheduler, locked memory)
runs in a child Python so the test runner itself is never pinned or locked.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from child_support import run_child
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.config import AgentConfig, PinningConfig
from agent.errors import PinningError
from agent.numa import NumaNode
from agent.pinning import (
    STAGES,
    allowed_cpus,
    cgroup_cpus,
    parse_cpu_spec,
    pinning_problems,
    plan_pinning,
)
from engines.affinity import (
    format_cpulist,
    parse_cpulist,
    pin_current_thread,
    thread_count,
)
from engines.errors import AffinityError

ALLOWED = frozenset(os.sched_getaffinity(0))
LAST = max(ALLOWED)
BEYOND = max(ALLOWED) + 1  # a CPU this process may not use


# --- CPU set syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", ALLOWED),
        (format_cpulist(ALLOWED), ALLOWED),
        (f" {LAST} ", frozenset({LAST})),
        ([LAST], frozenset({LAST})),
        (sorted(ALLOWED), ALLOWED),
    ],
)
def test_parse_cpu_spec_accepts_auto_ranges_and_lists(
    spec: str | list[int], expected: frozenset[int]
) -> None:
    assert parse_cpu_spec(spec, ALLOWED, key="pinning.process") == expected


def test_parse_cpu_spec_ranges_and_singles() -> None:
    allowed = frozenset(range(8))
    assert parse_cpu_spec("0-3,6", allowed, key="k") == frozenset({0, 1, 2, 3, 6})
    assert parse_cpu_spec("5, 1-2", allowed, key="k") == frozenset({1, 2, 5})


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty CPU set"),
        ("x", "bad CPU list item 'x'"),
        ("3-1", "end is below the start"),
        ("0,,1", "empty item"),
        ("0-", "bad CPU list item '0-'"),
        ("99999-100000", "above the highest possible CPU"),
        ([], "empty CPU set"),
        ([-1], "not CPU numbers"),
        ([True], "not CPU numbers"),
    ],
)
def test_parse_cpu_spec_rejects_garbage_naming_the_key(spec: str | list[int], needle: str) -> None:
    with pytest.raises(PinningError, match=needle) as info:
        parse_cpu_spec(spec, frozenset(range(8)), key="pinning.stages.llm")
    assert str(info.value).startswith("pinning.stages.llm: ")
    assert "\n" not in str(info.value)


def test_cpu_outside_allowed_set_is_a_clear_error() -> None:
    with pytest.raises(PinningError) as info:
        parse_cpu_spec([LAST, BEYOND], allowed_cpus(), key="pinning.process")
    message = str(info.value)
    assert message.startswith("pinning.process: ")
    assert f"CPUs {BEYOND} are outside the allowed set {format_cpulist(ALLOWED)}" in message
    assert info.value.reason == "pinning_invalid"


def test_allowed_cpus_is_the_kernel_affinity() -> None:
    assert allowed_cpus() == ALLOWED


@given(st.frozensets(st.integers(min_value=0, max_value=300), min_size=1))
def test_cpulist_format_parse_round_trip(cpus: frozenset[int]) -> None:
    text = format_cpulist(cpus)
    assert parse_cpulist(text) == cpus
    assert " " not in text


def test_format_cpulist_writes_ranges() -> None:
    assert format_cpulist(frozenset({0, 1, 2, 3, 6, 8, 9})) == "0-3,6,8-9"


# --- config + plan ---------------------------------------------------------------------------


def test_config_rejects_bad_cpu_syntax_with_key_path() -> None:
    with pytest.raises(ValidationError) as info:
        AgentConfig.model_validate({"pinning": {"stages": {"capture": "0-x"}}})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("pinning", "stages", "capture")]
    assert "bad CPU list item '0-x'" in errors[0]["msg"]


def test_config_rejects_boolean_cpu_numbers() -> None:
    with pytest.raises(ValidationError):
        PinningConfig.model_validate({"process": [True]})


def test_plan_defaults_to_the_real_allowed_set() -> None:
    plan = plan_pinning(PinningConfig())
    assert plan.process_cpus == ALLOWED
    assert dict(plan.stage_cpus) == dict.fromkeys(STAGES, ALLOWED)
    assert plan.threads_for("inference") == len(ALLOWED)
    assert plan.numa_policy == "none"
    assert plan.nice is None


def test_plan_unset_stages_inherit_the_process_set() -> None:
    cfg = PinningConfig.model_validate({"process": [LAST], "stages": {"llm": str(LAST)}})
    plan = plan_pinning(cfg)
    assert all(plan.cpus_for(stage) == frozenset({LAST}) for stage in STAGES)
    status = plan.to_status()
    assert json.loads(json.dumps(status)) == status
    assert status["process_cpus"] == str(LAST)


def test_plan_stage_outside_process_set_is_an_error() -> None:
    allowed = frozenset({0, 1, 2, 3})
    cfg = PinningConfig.model_validate({"process": "0-1", "stages": {"inference": "1-2"}})
    with pytest.raises(PinningError, match=r"pinning.stages.inference: CPUs 2 are outside the pro"):
        plan_pinning(cfg, allowed)


def test_plan_stage_outside_allowed_set_names_the_stage_key() -> None:
    cfg = PinningConfig.model_validate({"stages": {"capture": [BEYOND]}})
    with pytest.raises(PinningError, match=r"^pinning.stages.capture: CPUs \d+ are outside the"):
        plan_pinning(cfg)


def test_plan_unknown_stage_is_an_error() -> None:
    plan = plan_pinning(PinningConfig())
    with pytest.raises(PinningError, match="unknown pipeline stage 'decode'"):
        plan.cpus_for("decode")


def test_plan_numa_nodes_default_to_the_nodes_of_the_process_cpus() -> None:
    nodes = (
        NumaNode(0, frozenset({0, 1}), 1024),
        NumaNode(1, frozenset({2, 3}), 1024),
    )
    cfg = PinningConfig.model_validate({"process": "2-3", "numa_policy": "bind"})
    plan = plan_pinning(cfg, frozenset(range(4)), nodes=nodes, mems=frozenset({0, 1}))
    assert plan.numa_nodes == frozenset({1})


def test_plan_preferred_needs_exactly_one_node() -> None:
    nodes = (NumaNode(0, frozenset({0}), 1), NumaNode(1, frozenset({1}), 1))
    cfg = PinningConfig.model_validate({"numa_policy": "preferred", "numa_nodes": [0, 1]})
    with pytest.raises(PinningError, match="takes exactly one node, got 0-1"):
        plan_pinning(cfg, frozenset({0, 1}), nodes=nodes, mems=frozenset({0, 1}))


def test_plan_numa_node_outside_cpuset_mems_is_an_error() -> None:
    nodes = (NumaNode(0, frozenset({0}), 1), NumaNode(1, frozenset({1}), 1))
    cfg = PinningConfig.model_validate({"numa_policy": "bind", "numa_nodes": [1]})
    with pytest.raises(PinningError, match="nodes 1 are not usable; this process may allocate fr"):
        plan_pinning(cfg, frozenset({0, 1}), nodes=nodes, mems=frozenset({0}))


def test_pinning_problems_lists_every_problem_with_its_key() -> None:
    nodes = (NumaNode(0, frozenset({0, 1}), 1),)
    cfg = PinningConfig.model_validate(
        {
            "process": "0-5",
            "stages": {"capture": [0], "llm": "7", "inference": "auto"},
            "numa_policy": "bind",
            "numa_nodes": [2],
        }
    )
    problems = pinning_problems(cfg, frozenset({0, 1}), nodes=nodes, mems=frozenset({0}))
    assert [str(p).split(":")[0] for p in problems] == [
        "pinning.process",
        "pinning.stages.llm",
        "pinning.numa_nodes",
    ]
    assert pinning_problems(PinningConfig()) == []


def test_plan_numa_nodes_without_policy_is_an_error() -> None:
    cfg = PinningConfig.model_validate({"numa_nodes": [0]})
    with pytest.raises(PinningError, match='numa_policy = "none"'):
        plan_pinning(cfg)


# --- thread affinity (engines.affinity) ------------------------------------------------------


def test_pin_current_thread_applies_to_that_thread_and_its_children() -> None:
    seen: dict[str, frozenset[int]] = {}

    def child() -> None:
        seen["child"] = frozenset(os.sched_getaffinity(0))

    def stage() -> None:
        pin_current_thread(frozenset({LAST}))
        seen["stage"] = frozenset(os.sched_getaffinity(0))
        inner = threading.Thread(target=child)
        inner.start()
        inner.join(timeout=10)

    worker = threading.Thread(target=stage)
    worker.start()
    worker.join(timeout=10)
    assert seen == {"stage": frozenset({LAST}), "child": frozenset({LAST})}
    assert frozenset(os.sched_getaffinity(0)) == ALLOWED  # the test runner is untouched


def test_pin_current_thread_outside_allowed_raises_affinity_error() -> None:
    errors: list[BaseException] = []

    def stage() -> None:
        try:
            pin_current_thread(frozenset({BEYOND}))
        except AffinityError as exc:
            errors.append(exc)

    worker = threading.Thread(target=stage)
    worker.start()
    worker.join(timeout=10)
    assert len(errors) == 1
    assert f"cannot pin thread to CPUs {BEYOND}" in str(errors[0])
    assert f"this thread may use CPUs {format_cpulist(ALLOWED)}" in str(errors[0])


def test_pin_current_thread_rejects_an_empty_set() -> None:
    with pytest.raises(AffinityError, match="empty CPU set"):
        pin_current_thread(frozenset())


def test_thread_count_is_the_set_size_and_at_least_one() -> None:
    assert thread_count(frozenset({0, 1, 5})) == 3
    assert thread_count(frozenset()) == 1


# --- process pinning (child processes) -------------------------------------------------------

_APPLY = """
import threading
from agent.config import PinningConfig
from agent.pinning import apply_process_pinning, plan_pinning
stop = threading.Event()
early = threading.Thread(target=stop.wait, daemon=True)
early.start()  # exists before pinning: must be pinned too
plan = plan_pinning(PinningConfig.model_validate(ARGS[0]))
report = apply_process_pinning(plan)
status = report.to_status()
status["readback"] = {
    "affinity": sorted(os.sched_getaffinity(0)),
    "early_thread_affinity": sorted(os.sched_getaffinity(early.native_id)),
    "nice": os.getpriority(os.PRIO_PROCESS, 0),
    "early_thread_nice": os.getpriority(os.PRIO_PROCESS, early.native_id),
    "every_thread_affinity": sorted(
        {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}
    ),
    "thread_count": len(os.listdir("/proc/self/task")),
    "scheduler": os.sched_getscheduler(0),
    "priority": os.sched_getparam(0).sched_priority,
    "vmlck_kb": int([l for l in open("/proc/self/status") if l.startswith("VmLck:")][0].split()[1]),
}
stop.set()
print(json.dumps(status))
"""


def test_apply_process_pinning_pins_every_thread_and_sets_nice() -> None:
    status = run_child(_APPLY, {"process": [LAST], "nice": 7})
    readback = status["readback"]
    assert isinstance(readback, dict)
    assert readback["affinity"] == [LAST]
    assert readback["early_thread_affinity"] == [LAST]
    assert readback["nice"] == 7
    assert readback["early_thread_nice"] == 7
    assert status["process_cpus"] == str(LAST)
    assert readback["every_thread_affinity"] == [[LAST]]  # incl. any library threads
    assert status["threads_pinned"] == readback["thread_count"]
    assert readback["thread_count"] >= 2
    assert status["nice"] == 7
    assert status["warnings"] == []
    assert status["numa_policy"] == {
        "requested": "none",
        "nodes": "",
        "applied": False,
        "readback": None,
        "warning": None,
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO and mlockall need root (CI runs as root)")
def test_apply_process_pinning_sched_fifo_and_mlockall_as_root() -> None:
    status = run_child(_APPLY, {"sched_fifo_priority": 5, "mlockall": True})
    readback = status["readback"]
    assert isinstance(readback, dict)
    assert readback["scheduler"] == os.SCHED_FIFO
    assert readback["priority"] == 5
    assert readback["vmlck_kb"] > 0
    assert status["sched"] == {"policy": "SCHED_FIFO", "priority": 5}
    mlock = status["mlockall"]
    assert isinstance(mlock, dict)
    assert mlock["applied"] is True
    assert mlock["locked_kb"] > 0
    assert status["warnings"] == []


_UNPRIVILEGED = """
from agent.config import PinningConfig
from agent.pinning import apply_process_pinning, plan_pinning
plan = plan_pinning(PinningConfig.model_validate(ARGS[0]))
if os.geteuid() == 0:  # drop to nobody: no CAP_SYS_NICE / CAP_IPC_LOCK, default rlimits
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
report = apply_process_pinning(plan)
status = report.to_status()
status["readback"] = {
    "affinity": sorted(os.sched_getaffinity(0)),
    "scheduler": os.sched_getscheduler(0),
    "nice": os.getpriority(os.PRIO_PROCESS, 0),
}
print(json.dumps(status))
"""


def test_permission_refusals_become_warnings_not_crashes() -> None:
    cfg = {"process": [LAST], "nice": -5, "sched_fifo_priority": 10, "mlockall": True}
    status = run_child(_UNPRIVILEGED, cfg)
    readback = status["readback"]
    assert isinstance(readback, dict)
    assert readback["affinity"] == [LAST]  # affinity needs no privilege and was applied
    assert readback["scheduler"] == os.SCHED_OTHER
    assert readback["nice"] == 0
    warnings = status["warnings"]
    assert isinstance(warnings, list)
    assert len(warnings) == 3
    assert warnings[0].startswith("pinning.nice = -5 not applied: Permission denied")
    assert warnings[1].startswith("pinning.sched_fifo_priority = 10 not applied")
    assert warnings[2].startswith("pinning.mlockall not applied")
    assert status["mlockall"] == {"requested": True, "applied": False, "locked_kb": 0}


_APPLY_RAW = """
from agent.config import PinningConfig
from agent.errors import PinningError
from agent.pinning import apply_process_pinning, plan_pinning
cpus = frozenset(ARGS[0])
plan = plan_pinning(PinningConfig.model_validate({"process": ARGS[0]}), allowed=cpus)
try:
    apply_process_pinning(plan)
except PinningError as exc:
    print(json.dumps({"error": str(exc), "reason": exc.reason}))
else:
    print(json.dumps({"error": None}))
"""


def test_apply_refused_affinity_is_an_error() -> None:
    result = run_child(_APPLY_RAW, [BEYOND])
    assert result["reason"] == "pinning_invalid"
    assert f"pinning.process: cannot pin to CPUs {BEYOND}: Invalid argument" in str(result["error"])


def test_apply_partially_granted_affinity_is_an_error() -> None:
    # The kernel silently drops CPUs that are not online; the read-back catches it.
    result = run_child(_APPLY_RAW, [LAST, 4000])
    assert result["reason"] == "pinning_invalid"
    assert f"asked for CPUs {LAST},4000 but the kernel gave {LAST}" in str(result["error"])


# --- cgroup cpuset ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


def test_cgroup_cpus_reads_the_processes_v2_cgroup(tmp_path: Path) -> None:
    _write(tmp_path / "proc/self/cgroup", "0::/system.slice/edge-agent.service\n")
    _write(tmp_path / "sys/fs/cgroup/cpuset.cpus.effective", "0-7\n")
    own = tmp_path / "sys/fs/cgroup/system.slice/edge-agent.service/cpuset.cpus.effective"
    _write(own, "2-3\n")
    found = cgroup_cpus(tmp_path)
    assert found is not None
    assert found.cpus == frozenset({2, 3})
    assert found.path == own
    assert found.to_status() == {"path": str(own), "cpus": "2-3"}


def test_cgroup_cpus_reads_v1_cpuset_and_falls_back_to_the_root(tmp_path: Path) -> None:
    _write(tmp_path / "proc/self/cgroup", "3:cpuset:/docker/abc\n0::/\n")
    _write(tmp_path / "sys/fs/cgroup/cpuset/cpuset.effective_cpus", "0-3\n")
    found = cgroup_cpus(tmp_path)
    assert found is not None
    assert found.cpus == frozenset(range(4))
    _write(tmp_path / "sys/fs/cgroup/cpuset/docker/abc/cpuset.effective_cpus", "1\n")
    found = cgroup_cpus(tmp_path)
    assert found is not None
    assert found.cpus == frozenset({1})


def test_cgroup_cpus_none_without_cpuset_files(tmp_path: Path) -> None:
    assert cgroup_cpus(tmp_path) is None


def test_cgroup_cpus_on_this_machine_contains_the_allowed_set() -> None:
    found = cgroup_cpus()
    candidates = [
        Path("/sys/fs/cgroup/cpuset.cpus.effective"),
        Path("/sys/fs/cgroup/cpuset/cpuset.effective_cpus"),
    ]
    if not any(p.is_file() for p in candidates):
        assert found is None
        return
    assert found is not None
    assert found.cpus >= ALLOWED
