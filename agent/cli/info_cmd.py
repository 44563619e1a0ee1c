"""`edge-agent info [--json]`: board, CPUs, NUMA, memory, GPU, engines and the pinning plan."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.configfile import load_config
from agent.info import DeviceInfo, collect_info
from engines.affinity import format_cpulist

EPILOG = """\
Examples:
  edge-agent info                 human-readable summary
  edge-agent info --json | jq .engines
                                  machine-readable (CPU sets as "0-3,6" strings)
  edge-agent info --config /etc/edge-agent/agent.toml
                                  the pinning plan of that config on this machine
  edge-agent info --root /mnt/sdcard
                                  board/CPU/memory files of a mounted image
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "info",
        help="show the board, CPUs, NUMA nodes, memory, GPU, available engines and pinning",
        description="Show what this device is and what it can run: board (Jetson model and L4T "
        "release, Raspberry Pi model, else generic), CPUs (allowed set, online, cgroup cpuset), "
        "NUMA nodes, memory, GPU, inference engines (ONNX Runtime providers, TensorRT/pycuda, "
        "llama.cpp) and the CPU pinning the default config (or --config) would apply.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="PATH",
        help="read /proc, /sys, /etc and /dev files under PATH (default: /)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="show the pinning plan of this agent config instead of the default one",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        print(f"edge-agent info: --root {args.root} is not a folder", file=sys.stderr)
        return 2
    if args.config is None:
        info = collect_info(args.root)
    else:
        config = load_config(args.config)
        info = collect_info(args.root, pinning=config.pinning, pinning_source=str(args.config))
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(render(info))
    return 0


def _gib(kb: int | None) -> str:
    return "?" if kb is None else f"{kb / 1024 / 1024:.1f} GiB"


def render(info: DeviceInfo) -> str:
    """The human table: one ``key  value`` row per line, engines and stages indented."""
    rows: list[tuple[str, str]] = []
    board = info.board
    board_text = f"{board.model} [{board.kind}]"
    if board.soc:
        board_text += f", SoC {board.soc}"
    if board.l4t_release:
        board_text += f", L4T {board.l4t_release}"
    rows.append(("board", board_text))
    rows.append(("arch / kernel", f"{info.arch} / {info.kernel}"))
    rows.append(("python", info.python))
    cpus = info.cpus
    online = format_cpulist(cpus.online) if cpus.online is not None else "?"
    rows.append(
        ("cpus", f"allowed {format_cpulist(cpus.allowed)}, online {online}, {cpus.model or '?'}")
    )
    if cpus.cgroup:
        rows.append(("cgroup cpuset", f"{format_cpulist(cpus.cgroup.cpus)} ({cpus.cgroup.path})"))
    rows.extend(
        (f"numa node {n.node}", f"CPUs {format_cpulist(n.cpus) or '-'}, {_gib(n.mem_total_kb)}")
        for n in info.numa_nodes
    )
    if not info.numa_nodes:
        rows.append(("numa", "no NUMA support in the kernel"))
    memory = info.memory
    rows.append(("memory", f"{_gib(memory.total_kb)} total, {_gib(memory.available_kb)} available"))
    if info.gpus:
        for gpu in info.gpus:
            extra = [gpu.driver and f"driver {gpu.driver}"]
            if gpu.memory_total_mib is not None:
                extra.append(f"{gpu.memory_total_mib} MiB")
            if gpu.devices:
                extra.append(" ".join(gpu.devices))
            rows.append((f"gpu ({gpu.kind})", ", ".join([gpu.name, *filter(None, extra)])))
    else:
        rows.append(("gpu", "none"))
    rows.append(("engines", ""))
    for engine in info.engines:
        if engine.available:
            text = f"{engine.version or '?'}"
            if engine.providers:
                text += f", providers {', '.join(engine.providers)}"
            if engine.detail:
                text += f", {engine.detail}"
        else:
            text = f"not available ({engine.detail})"
        rows.append((f"  {engine.name}", text))
    rows.append((f"pinning ({info.pinning_source})", ""))
    plan = info.pinning
    if "error" in plan:
        rows.append(("  error", str(plan["error"])))
    else:
        rows.append(("  process", str(plan["process_cpus"])))
        stages = plan.get("stage_cpus")
        if isinstance(stages, dict):
            rows.extend((f"  {stage}", str(cpus_text)) for stage, cpus_text in stages.items())
        rows.append(("  numa policy", f"{plan['numa_policy']} {plan['numa_nodes']}".strip()))
        nice = plan["nice"] if plan["nice"] is not None else "inherited"
        fifo = plan["sched_fifo_priority"] or "off"
        mlock = "on" if plan["mlockall"] else "off"
        rows.append(("  scheduling", f"nice {nice}, SCHED_FIFO {fifo}, mlockall {mlock}"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}".rstrip() for key, value in rows)
