"""Benchmark: the ONNX Runtime engine through the TensorEngine interface vs a bare ORT loop.

Same model (yolox_nano_416), same threads (2), same session options, same input (a real photo,
letterboxed as the model wants). Throughput is measured in interleaved blocks (bare, engine,
engine-pipelined, then the next round in another order) so a noisy, shared machine hurts every
variant alike; the ratio is engine calls/s over bare calls/s from this one run (target >= 0.98).
The allocation profile runs ``--calls`` engine calls under tracemalloc and compares the first and
last windows (live blocks/bytes attributed to ``engines/`` after a full ``gc.collect()``, which
empties CPython's tuple/float free lists that tracemalloc would otherwise count as live, and the
peak rise inside each window, which would show any per-call array).

On a machine where tensorrt and pycuda import, the same tool builds an FP16 plan and compares the
TensorRT memory modes pinned / mapped / pageable; elsewhere that section says "skipped" and why.

    python tools/bench_engine.py [--calls 5000] [--blocks 40] [--block-calls 25]

Writes docs/benchmarks/engine.json and docs/benchmarks/engine.png; prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from engines.affinity import format_cpulist, pin_current_thread
from engines.config import OnnxRuntimeConfig, TensorRTConfig
from engines.errors import EngineUnavailableError
from engines.onnxruntime import OnnxRuntimeEngine, intra_op_affinities
from engines.registry import build_engine, load_tensorrt_runtime

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.98
MODEL = "yolox_nano_416.onnx"


def _first_dir(env: str, fallback: Path) -> Path:
    for part in os.environ.get(env, "").split(os.pathsep):
        if part and Path(part).is_dir():
            return Path(part)
    return fallback


def _frame(data_dir: Path) -> np.ndarray:
    """dog.jpg letterboxed to 416x416 top-left, pad 114, BGR 0-255 NCHW float32 (YOLOX input)."""
    image = cv2.imread(str(data_dir / "darknet" / "dog.jpg"), cv2.IMREAD_COLOR)
    if image is None:
        msg = f"cannot read {data_dir / 'darknet' / 'dog.jpg'}: set EDGE_AGENT_DATA_PATH"
        raise SystemExit(msg)
    scale = min(416 / image.shape[0], 416 / image.shape[1])
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    canvas = np.full((416, 416, 3), 114, np.uint8)
    canvas[: size[1], : size[0]] = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32)


def _bare_session(model: Path, threads: int, cpus: frozenset[int]) -> ort.InferenceSession:
    """The same session options the engine sets, without the engine around it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    affinity = intra_op_affinities(cpus, threads)
    if affinity is not None:
        options.add_session_config_entry("session.intra_op_thread_affinities", affinity)
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _timed(step: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return time.perf_counter() - start


def _throughput(
    variants: dict[str, Callable[[], Any]], blocks: int, block_calls: int
) -> dict[str, Any]:
    names = list(variants)
    for step in variants.values():  # warm-up, not measured
        _timed(step, 20)
    rounds: list[dict[str, float]] = []
    for index in range(blocks):
        order = names if index % 2 == 0 else names[::-1]
        rounds.append({name: block_calls / _timed(variants[name], block_calls) for name in order})
        print(f"  round {index + 1}/{blocks}: " + ", ".join(
            f"{name} {rounds[-1][name]:.1f}/s" for name in names))  # fmt: skip
    totals = {name: sum(block_calls / r[name] for r in rounds) for name in names}
    fps = {name: blocks * block_calls / totals[name] for name in names}
    return {"rounds": rounds, "calls_per_s": fps}


def _allocation_profile(engine: OnnxRuntimeEngine, feed: dict[str, np.ndarray], calls: int,
                        window: int) -> dict[str, Any]:  # fmt: skip
    engine_frames = [
        tracemalloc.Filter(inclusive=True, filename_pattern="*/engines/*", all_frames=True)
    ]
    windows: list[dict[str, int]] = []
    snapshots: list[tracemalloc.Snapshot] = []
    tracemalloc.start(16)
    try:
        done = 0
        while done < calls:
            count = min(window, calls - done)
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(count):
                engine.infer(feed)
            traced, peak = tracemalloc.get_traced_memory()
            done += count
            gc.collect()  # empties CPython's free lists, which tracemalloc counts as live
            snapshot = tracemalloc.take_snapshot().filter_traces(engine_frames)
            snapshots = [snapshots[0], snapshot] if snapshots else [snapshot]
            stats = snapshot.statistics("lineno")
            windows.append(
                {
                    "calls_done": done,
                    "traced_bytes": traced,
                    "peak_increase_bytes": peak - before,
                    "engine_blocks": sum(s.count for s in stats),
                    "engine_bytes": sum(s.size for s in stats),
                }
            )
    finally:
        tracemalloc.stop()
    first, last = windows[0], windows[-1]
    growth = [
        f"{diff.traceback.format()[-1].strip()} count {diff.count_diff:+d} size {diff.size_diff:+d}"
        for diff in snapshots[-1].compare_to(snapshots[0], "traceback")[:5]
        if diff.count_diff or diff.size_diff
    ]
    return {
        "calls": calls,
        "window": window,
        "windows": windows,
        "first": first,
        "last": last,
        "engine_blocks_growth": last["engine_blocks"] - first["engine_blocks"],
        "engine_bytes_growth": last["engine_bytes"] - first["engine_bytes"],
        "max_peak_increase_bytes": max(w["peak_increase_bytes"] for w in windows),
        "largest_changes_first_to_last": growth,
        "output_bytes": int(sum(a.nbytes for a in engine.infer(feed).values())),
    }


def _tensorrt_modes(model: Path, calls: int) -> dict[str, Any]:
    try:
        runtime = load_tensorrt_runtime()
    except EngineUnavailableError as exc:
        return {"status": "skipped", "reason": str(exc)}
    from engines.plans import PlanStore
    from engines.tensorrt import TensorRTEngine
    from engines.tensorrt_build import BuildRequest, build_plan

    with tempfile.TemporaryDirectory() as folder:
        store = PlanStore(Path(folder))
        plan = build_plan(BuildRequest(onnx=model, precision="fp16"), store, runtime=runtime,
                          progress=lambda line: print(f"  build: {line}"))  # fmt: skip
        results: dict[str, Any] = {"status": "measured", "plan": plan.name, "calls": calls}
        for memory in ("pinned", "mapped", "pageable"):
            config = TensorRTConfig(type="tensorrt", memory=memory, slots=2)
            with TensorRTEngine(config, plan, runtime=runtime, cpus=frozenset({0})) as engine:
                engine.input_buffer("images")[...] = 114.0
                pending = None
                start = time.perf_counter()
                for _ in range(calls):
                    ticket = engine.submit()
                    if pending is not None:
                        engine.collect(pending)
                    pending = ticket
                engine.collect(pending)
                results[memory] = {"calls_per_s": calls / (time.perf_counter() - start)}
        base = results["pageable"]["calls_per_s"]
        results["pinned_over_pageable"] = results["pinned"]["calls_per_s"] / base
        results["mapped_over_pageable"] = results["mapped"]["calls_per_s"] / base
        return results


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rounds = report["throughput"]["rounds"]
    x = np.arange(1, len(rounds) + 1)
    for name in rounds[0]:
        left.plot(x, [r[name] for r in rounds], marker="o", label=name)
    ratio = report["throughput"]["ratio_engine_infer"]
    left.set_title(f"yolox_nano_416, 2 threads: engine/bare = {ratio:.3f} (target >= 0.98)")
    left.set_xlabel("interleaved round")
    left.set_ylabel("calls per second")
    left.legend()
    left.grid(alpha=0.3)
    windows = report["allocations"]["windows"]
    done = [w["calls_done"] for w in windows]
    right.plot(
        done, [w["engine_bytes"] for w in windows], marker="o", label="live bytes (engines/)"
    )
    right.plot(done, [w["peak_increase_bytes"] for w in windows], marker="s",
               label="peak rise within window (all)")  # fmt: skip
    right.axhline(report["allocations"]["output_bytes"], color="grey", linestyle="--",
                  label="one output array")  # fmt: skip
    right.set_yscale("symlog")
    right.set_title(f"tracemalloc over {report['allocations']['calls']} engine calls")
    right.set_xlabel("calls done")
    right.set_ylabel("bytes")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls in the allocation profile")
    parser.add_argument("--window", type=int, default=250, help="calls per allocation window")
    parser.add_argument("--blocks", type=int, default=40, help="interleaved throughput rounds")
    parser.add_argument("--block-calls", type=int, default=25, help="calls per block")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (both sides)")
    parser.add_argument("--trt-calls", type=int, default=1000, help="calls per TensorRT mode")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()

    models = _first_dir("EDGE_AGENT_MODEL_PATH", ROOT.parent / "shared" / "models")
    data = _first_dir("EDGE_AGENT_DATA_PATH", ROOT.parent / "shared" / "data")
    model = models / MODEL
    allowed = sorted(os.sched_getaffinity(0))
    cpus = frozenset(allowed[: args.threads])
    pin_current_thread(cpus)
    load_start = os.getloadavg()
    started = time.time()
    frame = _frame(data)
    feed = {"images": frame}

    bare = _bare_session(model, args.threads, cpus)
    config = OnnxRuntimeConfig(type="onnxruntime", intra_op_threads=args.threads)
    engine = build_engine(config, model, cpus=cpus)
    if not isinstance(engine, OnnxRuntimeEngine):
        raise SystemExit("expected the ONNX Runtime engine")
    reference = bare.run(None, feed)[0]
    same = bool(np.allclose(engine.infer(feed)["output"], reference, rtol=1e-5, atol=1e-4))
    pending: list[Any] = []

    def pipelined() -> None:
        ticket = engine.submit(feed)
        if pending:
            engine.collect(pending.pop())
        pending.append(ticket)

    print(
        f"throughput: {args.blocks} rounds x {args.block_calls} calls, CPUs {format_cpulist(cpus)}"
    )
    variants: dict[str, Callable[[], Any]] = {
        "bare InferenceSession.run": lambda: bare.run(None, feed),
        "engine.infer": lambda: engine.infer(feed),
        "engine submit/collect": pipelined,
    }
    throughput = _throughput(variants, args.blocks, args.block_calls)
    if pending:
        engine.collect(pending.pop())
    fps = throughput["calls_per_s"]
    bare_fps = fps["bare InferenceSession.run"]
    per_round = [r["engine.infer"] / r["bare InferenceSession.run"] for r in throughput["rounds"]]
    throughput.update(
        {
            "ratio_engine_infer": fps["engine.infer"] / bare_fps,
            "ratio_engine_submit_collect": fps["engine submit/collect"] / bare_fps,
            "per_round_ratio_median": float(np.median(per_round)),
            "per_round_ratio_min": float(np.min(per_round)),
            "per_round_ratio_max": float(np.max(per_round)),
            "target": TARGET_RATIO,
        }
    )
    throughput["meets_target"] = throughput["ratio_engine_infer"] >= TARGET_RATIO
    print(f"allocation profile: {args.calls} calls in windows of {args.window}")
    allocations = _allocation_profile(engine, feed, args.calls, args.window)
    allocations["flat"] = (
        allocations["engine_blocks_growth"] <= 4
        and allocations["engine_bytes_growth"] <= 1024
        and allocations["max_peak_increase_bytes"] < allocations["output_bytes"] // 8
    )
    engine.close()
    print("tensorrt modes:")
    tensorrt = _tensorrt_modes(model, args.trt_calls)
    load_end = os.getloadavg()
    report = {
        "tool": "tools/bench_engine.py",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus_allowed": len(allowed),
            "cpus_used": format_cpulist(cpus),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in load_end],
            "note": "shared machine: other jobs ran during the benchmark (see load averages); "
            "interleaved blocks spread that noise over all variants",
        },
        "model": MODEL,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "input": "data/darknet/dog.jpg letterboxed to 1x3x416x416 float32 (same array for all)",
        "engine_output_matches_bare": same,
        "throughput": throughput,
        "allocations": allocations,
        "tensorrt": tensorrt,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, args.out / "engine.png")
    pipelined_fps = fps["engine submit/collect"]
    print(
        f"bare {bare_fps:.1f}/s, engine.infer {fps['engine.infer']:.1f}/s "
        f"(ratio {throughput['ratio_engine_infer']:.3f}), submit/collect {pipelined_fps:.1f}/s "
        f"(ratio {throughput['ratio_engine_submit_collect']:.3f})"
    )
    print(
        f"allocations: engine blocks {allocations['first']['engine_blocks']} -> "
        f"{allocations['last']['engine_blocks']}, bytes {allocations['first']['engine_bytes']} -> "
        f"{allocations['last']['engine_bytes']}, max peak rise "
        f"{allocations['max_peak_increase_bytes']} B (flat: {allocations['flat']})"
    )
    print(f"tensorrt: {tensorrt['status']}; load average {load_start} -> {load_end}")
    print(f"wrote {args.out / 'engine.json'} and {args.out / 'engine.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
