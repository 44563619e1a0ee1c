"""NUMA: topology from the real sysfs, memory policy through the real libnuma (child processes).

The policy is read back twice: by the module (``get_mempolicy``) and independently from the
kernel's ``/proc/self/numa_maps``, whose policy column shows the thread's policy for every
mapping that has none of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from child_support import run_child

from agent.errors import NumaUnavailableError, PinningError
from agent.numa import (
    LibNuma,
    NumaNode,
    apply_memory_policy,
    mems_allowed,
    nodes_of_cpus,
    read_nodes,
)

MISSING_LIBRARY = "libnuma-does-not-exist.so.9"
SYSFS_NODES = Path("/sys/devices/system/node")
HAS_NUMA_SYSFS = SYSFS_NODES.is_dir()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


# --- topology --------------------------------------------------------------------------------


def test_read_nodes_on_this_machine_cover_the_allowed_cpus() -> None:
    nodes = read_nodes()
    if not HAS_NUMA_SYSFS:
        assert nodes == ()
        return
    expected = sorted(int(p.name[4:]) for p in SYSFS_NODES.glob("node[0-9]*"))
    assert [n.node for n in nodes] == expected
    all_cpus = frozenset().union(*(n.cpus for n in nodes))
    assert all_cpus >= frozenset(os.sched_getaffinity(0))
    assert all(n.mem_total_kb is not None and n.mem_total_kb > 0 for n in nodes if n.cpus)


def test_read_nodes_parses_a_two_node_tree(tmp_path: Path) -> None:
    base = tmp_path / "sys/devices/system/node"
    _write(base / "node0/cpulist", "0-3\n")
    _write(base / "node0/meminfo", "Node 0 MemTotal:       16318508 kB\nNode 0 MemFree: 1 kB\n")
    _write(base / "node1/cpulist", "4-7,12\n")
    _write(base / "node1/meminfo", "Node 1 MemTotal:        8388608 kB\n")
    _write(base / "node2/cpulist", "\n")  # memory-only node: no CPUs, no meminfo file
    _write(base / "online", "0-2\n")  # not a node folder
    (base / "power").mkdir()
    nodes = read_nodes(tmp_path)
    assert nodes == (
        NumaNode(0, frozenset(range(4)), 16318508),
        NumaNode(1, frozenset({4, 5, 6, 7, 12}), 8388608),
        NumaNode(2, frozenset(), None),
    )
    assert nodes[1].to_status() == {"node": 1, "cpus": "4-7,12", "mem_total_kb": 8388608}
    assert nodes_of_cpus(nodes, frozenset({3, 4})) == frozenset({0, 1})
    assert nodes_of_cpus(nodes, frozenset({12})) == frozenset({1})


def test_read_nodes_without_numa_support_is_empty(tmp_path: Path) -> None:
    assert read_nodes(tmp_path) == ()


def test_read_nodes_bad_cpulist_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "sys/devices/system/node/node0/cpulist", "zero\n")
    with pytest.raises(PinningError, match=r"node0/cpulist: bad CPU list item 'zero'"):
        read_nodes(tmp_path)


def test_mems_allowed_parses_proc_status(tmp_path: Path) -> None:
    _write(tmp_path / "proc/self/status", "Name:\tx\nMems_allowed_list:\t0-1,3\nVmLck:\t0 kB\n")
    assert mems_allowed(tmp_path) == frozenset({0, 1, 3})
    assert mems_allowed(tmp_path / "nowhere") is None


def test_mems_allowed_on_this_machine_contains_the_memory_nodes() -> None:
    mems = mems_allowed()
    assert mems is not None
    with_memory = {n.node for n in read_nodes() if n.mem_total_kb}
    assert with_memory <= mems


# --- libnuma ---------------------------------------------------------------------------------

_APPLY_POLICY = """
from agent.numa import LibNuma, apply_memory_policy
outcome = apply_memory_policy(ARGS[0], frozenset(ARGS[1]))
lib = LibNuma()
heap = [line.split() for line in open("/proc/self/numa_maps") if " heap " in line]
print(json.dumps({
    "status": outcome.to_status(),
    "membind": sorted(lib.membind()),
    "numa_maps_policy": heap[0][1] if heap else None,
}))
"""


@pytest.mark.skipif(not HAS_NUMA_SYSFS, reason="kernel without NUMA support (no sysfs nodes)")
@pytest.mark.parametrize(
    ("policy", "kernel_name"),
    [("bind", "bind:0"), ("preferred", "prefer:0"), ("interleave", "interleave:0")],
)
def test_apply_memory_policy_on_node_zero_reads_back(policy: str, kernel_name: str) -> None:
    result = run_child(_APPLY_POLICY, policy, [0])
    assert result["status"] == {
        "requested": policy,
        "nodes": "0",
        "applied": True,
        "readback": {"mode": policy, "nodes": "0"},
        "warning": None,
    }
    assert result["numa_maps_policy"] == kernel_name
    assert result["membind"] == [0]


@pytest.mark.skipif(not HAS_NUMA_SYSFS, reason="kernel without NUMA support (no sysfs nodes)")
def test_policy_none_restores_local_allocation() -> None:
    result = run_child(
        """
        from agent.numa import LibNuma, apply_memory_policy
        apply_memory_policy("bind", frozenset({0}))
        lib = LibNuma()
        bound = lib.current_policy().mode
        lib.set_policy("none", frozenset())
        print(json.dumps({"bound": bound, "after": lib.current_policy().to_status()}))
        """
    )
    assert result["bound"] == "bind"
    # libnuma >= 2.0.12 sets MPOL_LOCAL; older ones MPOL_PREFERRED with an empty mask
    assert result["after"] in ({"mode": "local", "nodes": ""}, {"mode": "preferred", "nodes": ""})


@pytest.mark.skipif(not HAS_NUMA_SYSFS, reason="kernel without NUMA support (no sysfs nodes)")
def test_unknown_node_is_rejected_before_anything_changes() -> None:
    lib = LibNuma()
    beyond = lib.max_node() + 1
    before = lib.current_policy()
    with pytest.raises(PinningError, match=f"NUMA nodes {beyond} do not exist"):
        lib.set_policy("bind", frozenset({beyond}))
    assert lib.current_policy() == before


def test_missing_libnuma_raises_numa_unavailable() -> None:
    with pytest.raises(NumaUnavailableError, match=MISSING_LIBRARY) as info:
        LibNuma(MISSING_LIBRARY)
    assert info.value.reason == "numa_unavailable"
    assert "install libnuma1" in str(info.value)


def test_missing_libnuma_is_a_warning_not_a_failure() -> None:
    outcome = apply_memory_policy("bind", frozenset({0}), library=MISSING_LIBRARY)
    assert outcome.applied is False
    assert outcome.readback is None
    assert outcome.warning is not None
    assert outcome.warning.startswith("NUMA memory policy 'bind' on nodes 0 not applied: ")
    assert MISSING_LIBRARY in outcome.warning


def test_missing_libnuma_leaves_process_pinning_running() -> None:
    result = run_child(
        """
        from agent.config import PinningConfig
        from agent.pinning import apply_process_pinning, plan_pinning
        plan = plan_pinning(PinningConfig(numa_policy="interleave"))
        report = apply_process_pinning(plan, numa_library=ARGS[0])
        print(json.dumps(report.to_status()))
        """,
        MISSING_LIBRARY,
    )
    warnings = result["warnings"]
    assert isinstance(warnings, list)
    assert len(warnings) == 1
    assert MISSING_LIBRARY in warnings[0]
    policy = result["numa_policy"]
    assert isinstance(policy, dict)
    assert policy["applied"] is False
    assert result["process_cpus"] == result["allowed_cpus"]


@pytest.mark.skipif(not HAS_NUMA_SYSFS, reason="kernel without NUMA support (no sysfs nodes)")
def test_process_pinning_reports_the_applied_numa_policy() -> None:
    result = run_child(
        """
        from agent.config import PinningConfig
        from agent.pinning import apply_process_pinning, plan_pinning
        plan = plan_pinning(PinningConfig(numa_policy="bind"))
        print(json.dumps(apply_process_pinning(plan).to_status()))
        """
    )
    policy = result["numa_policy"]
    assert isinstance(policy, dict)
    assert policy["applied"] is True
    readback = policy["readback"]
    assert isinstance(readback, dict)
    assert readback["mode"] == "bind"
    assert readback["nodes"] == policy["nodes"]
    nodes = result["numa_nodes"]
    assert isinstance(nodes, list)
    assert [n["node"] for n in nodes] == [n.node for n in read_nodes()]
    assert result["warnings"] == []
