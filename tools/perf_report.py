"""Performance report: runs every benchmark in tools/ and writes docs/performance.md + plots.

Each benchmark runs as its own process (``python tools/bench_<name>.py ...``, exactly what a
person would type, so every figure can be reproduced alone), one after the other, with its JSON
and PNG written under ``<out-dir>/benchmarks/``. From those JSON files this tool takes the
figures the benchmarks measure and states each one as a ratio against the baseline measured in
the same run (engine vs bare ONNX Runtime, pipeline vs serial loop, LLM pipeline decode vs bare
llama.cpp, MQTT outbox vs raw paho, HID paths vs USB's polling rate), with the target from the
issue and whether it was met. The ratios are computed here from the measured values in the
JSON, not copied from the benchmarks' own summaries.

The report describes the machine (CPU model, cores, RAM, kernel, Python, library versions, load
average before and after, date, git commit). A benchmark that fails (exit status, timeout, no
fresh JSON, a JSON without the expected fields) does not stop the others: the report lists it
with the reason and the last lines of its output. Exit status: 0 when every benchmark ran,
1 when at least one failed (the report is written either way), 2 for bad options.
Targets missed do not change the exit status: they are results.

Run it on an idle machine: other work skews every figure (the load average is recorded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import operator
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TAIL_LINES = 25

EPILOG = """\
examples:
  # the full report (about 10 minutes, idle machine): docs/performance.md + docs/benchmarks/*
  .venv/bin/python tools/perf_report.py

  # a smoke test of the plumbing (about a minute); writes to build/perf-quick/ by default
  .venv/bin/python tools/perf_report.py --quick

  # two benchmarks only, into a scratch folder
  .venv/bin/python tools/perf_report.py --quick --only engine,hid --out-dir /tmp/perf
"""


# -- figures ---------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass(frozen=True)
class Target:
    """A target on the ratio (``on="ratio"``) or on ``value - baseline`` (``on="delta"``)."""

    op: str
    threshold: float
    on: str = "ratio"
    unit: str = ""

    def met(self, figure: Figure) -> bool:
        measured = figure.ratio if self.on == "ratio" else figure.value - figure.baseline
        return _OPS[self.op](measured, self.threshold)

    def text(self) -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {self.threshold:g}"
        return f"difference {self.op} {self.threshold:g} {self.unit}".rstrip()


@dataclass(frozen=True)
class Figure:
    """One measured value against its baseline from the same run."""

    name: str
    value: float
    value_label: str
    baseline: float
    baseline_label: str
    unit: str
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """value / baseline; NaN for a zero baseline, which only a figure judged on its
        difference may have (``_read_figures`` reports any other as a failure)."""
        return self.value / self.baseline if self.baseline else math.nan

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "value_label": self.value_label,
            "baseline": self.baseline,
            "baseline_label": self.baseline_label,
            "unit": self.unit,
            "ratio": None if math.isnan(self.ratio) else self.ratio,
            "difference": self.value - self.baseline,
            "target": self.target.text() if self.target else None,
            "met": self.met,
            "note": self.note,
        }


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def engine_figures(data: dict[str, Any]) -> tuple[list[Figure], list[str]]:
    fps = data["throughput"]["calls_per_s"]
    bare = fps["bare InferenceSession.run"]
    alloc = data["allocations"]
    figures = [
        Figure(
            "engine.infer vs bare ONNX Runtime",
            fps["engine.infer"],
            "engine.infer",
            bare,
            "bare InferenceSession.run",
            "calls/s",
            Target(">=", 0.98),
        ),
        Figure(
            "engine submit/collect (pipelined) vs bare ONNX Runtime",
            fps["engine submit/collect"],
            "submit/collect",
            bare,
            "bare InferenceSession.run",
            "calls/s",
        ),
        Figure(
            f"live bytes in engines/ after {alloc['calls']} calls vs first window",
            alloc["last"]["engine_bytes"],
            f"after {alloc['last']['calls_done']} calls",
            alloc["first"]["engine_bytes"],
            f"after {alloc['first']['calls_done']} calls",
            "bytes",
            Target("<=", 1024, on="delta", unit="bytes"),
            note=f"blocks {alloc['first']['engine_blocks']} -> {alloc['last']['engine_blocks']}; "
            f"largest peak rise in a window {alloc['max_peak_increase_bytes']} B vs one output "
            f"array {alloc['output_bytes']} B",
        ),
    ]
    notes = [
        (
            f"Model {data['model']}, {data['threads']} intra-op threads on CPUs "
            f"{data['machine']['cpus_used']}, {len(data['throughput']['rounds'])} interleaved "
            f"rounds; engine output equals bare output: {data['engine_output_matches_bare']}."
        ),
    ]
    trt = data["tensorrt"]
    if trt.get("status") == "measured":
        figures.append(
            Figure(
                "TensorRT pinned vs pageable host memory",
                trt["pinned"]["calls_per_s"],
                "pinned",
                trt["pageable"]["calls_per_s"],
                "pageable",
                "calls/s",
            )
        )
        figures.append(
            Figure(
                "TensorRT mapped vs pageable host memory",
                trt["mapped"]["calls_per_s"],
                "mapped",
                trt["pageable"]["calls_per_s"],
                "pageable",
                "calls/s",
            )
        )
    else:
        notes.append(f"TensorRT memory modes: {trt.get('status')} ({trt.get('reason', '')}).")
    return figures, notes


def vision_figures(data: dict[str, Any]) -> tuple[list[Figure], list[str]]:
    targets = data["targets"]
    cpu = targets["pre_post_cpu_pct_of_inference"]
    latest = data["pipeline_latest"]["latency_ms"]["end_to_end"]
    latest_1t = data["pipeline_latest_1_thread"]["latency_ms"]["end_to_end"]
    serial = _median([r["fps"] for r in data["serial_rounds"]])
    serial_agent = _median([r["fps"] for r in data["serial_agent_rounds"]])
    pipeline = _median([r["fps"] for r in data["pipeline_rounds"]])
    figures = [
        Figure(
            "(c) pipeline vs (b) serial loop, throughput",
            pipeline,
            "pipeline",
            serial,
            "serial loop",
            "FPS",
            Target(">=", 1.0),
        ),
        Figure(
            "(c) pipeline vs (b2) serial loop of the agent's parts",
            pipeline,
            "pipeline",
            serial_agent,
            "serial, agent parts",
            "FPS",
        ),
        Figure(
            "(c) pipeline vs (a) engine alone (inference floor)",
            pipeline,
            "pipeline",
            data["engine"]["fps"],
            "engine only",
            "FPS",
        ),
        Figure(
            "preprocess + decode/NMS CPU vs inference time",
            cpu["preprocess_cpu_ms"] + cpu["postprocess_cpu_ms"],
            "pre + post thread CPU",
            cpu["inference_ms_quietest_p50"],
            "engine-only inference p50",
            "ms/frame",
            Target("<=", 0.10),
        ),
        Figure(
            "`latest` @25 FPS end-to-end p99 vs p50",
            latest["p99"],
            "p99",
            latest["p50"],
            "p50",
            "ms",
            Target("<=", 1.5),
            note=f"engine with {data['pipeline_latest']['engine_threads']} intra-op threads",
        ),
        Figure(
            "`latest` @25 FPS end-to-end p99 vs p50, 1 intra-op thread",
            latest_1t["p99"],
            "p99",
            latest_1t["p50"],
            "p50",
            "ms",
            note="the embedded defaults' engine setting; reported beside the target above",
        ),
    ]
    notes = []
    rss = data["rss"]
    if rss.get("growth_pct") is None:
        notes.append(f"RSS growth: not measured ({rss.get('note', 'no samples')}).")
    else:
        figures.append(
            Figure(
                f"RSS after {targets['rss_growth_pct']['frames']} frames vs after warm-up",
                rss["rss_end_mib"],
                "end",
                rss["rss_after_warmup_mib"],
                f"after {rss['warmup_frames']} frames",
                "MiB",
                Target("<", 1.05),
                note=f"peak {rss['rss_peak_mib']} MiB",
            )
        )
    notes.append(
        f"Model {data['model']} on ONNX Runtime CPU, {len(data['pipeline_rounds'])} alternating "
        f"rounds of {data['pipeline_rounds'][0]['frames']} frames; medians of the rounds."
    )
    return figures, notes


def llm_figures(data: dict[str, Any]) -> tuple[list[Figure], list[str]]:
    runs = data["runs"]
    raw, pipe, mqtt = runs["raw"], runs["pipeline"], runs.get("mqtt")
    pipe_rate = _median(pipe["decode_tok_s"])
    cancel, prefix = data["cancel"], data["prefix_cache"]
    figures = [
        Figure(
            "pipeline decode vs bare llama.cpp",
            pipe_rate,
            "pipeline",
            _median(raw["decode_tok_s"]),
            "bare llama-cpp-python",
            "tok/s",
            Target(">=", 0.98),
        ),
        Figure(
            "pipeline time to first token vs bare llama.cpp",
            _median(pipe["ttft_ms"]),
            "pipeline",
            _median(raw["ttft_ms"]),
            "bare llama-cpp-python",
            "ms",
            Target("<=", 10.0, on="delta", unit="ms"),
        ),
        Figure(
            "cancel during decode -> request ended, vs one decode step",
            _median(cancel["decode_cancel_ms"]),
            "cancel",
            1000.0 / pipe_rate,
            "one decode step",
            "ms",
            Target("<=", 1.0),
            note=f"cancel during prompt evaluation: {_median(cancel['prompt_cancel_ms']):.2f} ms",
        ),
        Figure(
            f"TTFT speed-up with a cached {int(_median(prefix['prefix_tokens']))}-token prefix",
            _median(prefix["cold_ttft_ms"]),
            "cold TTFT",
            _median(prefix["cached_ttft_ms"]),
            "cached-prefix TTFT",
            "ms",
            Target(">=", 5.0),
            note=f"model {prefix['model']}",
        ),
    ]
    if mqtt:
        figures[1:1] = [
            Figure(
                "whole agent over MQTT decode vs bare llama.cpp",
                _median(mqtt["decode_tok_s"]),
                "agent via MQTT",
                _median(raw["decode_tok_s"]),
                "bare llama-cpp-python",
                "tok/s",
            )
        ]
        figures.append(
            Figure(
                "time to first token over MQTT vs in-process pipeline",
                _median(mqtt["ttft_ms"]),
                "MQTT",
                _median(pipe["ttft_ms"]),
                "pipeline",
                "ms",
                note="the difference is the MQTT round trip (reported, no target)",
            )
        )
    rss = data["rss"]
    figures.append(
        Figure(
            "RSS after loading (mmap) vs model file size",
            rss["mmap"]["loaded"]["VmRSS"] / 1e6,
            "VmRSS after load",
            rss["model_bytes"] / 1e6,
            "model file",
            "MB",
            note=f"anonymous {rss['mmap']['loaded']['RssAnon'] / 1e6:.1f} MB; without mmap "
            f"{rss['no_mmap']['loaded']['VmRSS'] / 1e6:.1f} MB",
        )
    )
    notes = [
        (
            f"Model {data['model']}, llama.cpp threads {data['threads']}, {data['rounds']} rounds "
            f"after {data['warmup_rounds']} warm-up, {data['max_tokens']} tokens each; medians."
        )
    ]
    if not mqtt:
        notes.append("The MQTT side was skipped (--skip-mqtt).")
    return figures, notes


def mqtt_figures(data: dict[str, Any]) -> tuple[list[Figure], list[str]]:
    raw = _median(data["raw_paho_msg_per_s"])
    cpu = data["cpu_us_per_msg_median"]
    lat = data["vision_latency"]
    figures = [
        Figure(
            "outbox QoS 1, detections (group commit) vs raw paho",
            _median(data["outbox_msg_per_s"]),
            "outbox detections",
            raw,
            "raw paho",
            "msg/s",
            Target(">=", 0.7),
        ),
        Figure(
            "outbox QoS 1, events (committed in publish) vs raw paho",
            _median(data["outbox_events_msg_per_s"]),
            "outbox events",
            raw,
            "raw paho",
            "msg/s",
            Target(">=", 0.7),
        ),
        Figure(
            "CPU per message, outbox detections vs raw paho",
            cpu["outbox"],
            "outbox",
            cpu["raw"],
            "raw paho",
            "µs/msg",
        ),
    ]
    notes = [
        (
            f"{data['messages_per_round']} messages x {data['rounds']} rounds, in-flight window "
            f"{data['window']}, {data['payload_bytes']}-byte payload; {data['broker']}."
        )
    ]
    total, pipeline = lat["capture_to_subscriber_ms"], lat["pipeline_end_to_end_ms"]
    if total["count"]:
        figures.append(
            Figure(
                "vision capture -> MQTT subscriber p50 vs pipeline end-to-end p50",
                total["p50"],
                "capture to subscriber",
                pipeline["p50"],
                "capture to message built",
                "ms",
                note=f"p99 {total['p99']} ms vs {pipeline['p99']} ms; MQTT leg p50 "
                f"{lat['mqtt_leg_ms']['p50']} ms, {lat['messages']} messages",
            )
        )
    else:
        notes.append("Vision latency over MQTT: no messages arrived in the window.")
    return figures, notes


def hid_figures(data: dict[str, Any]) -> tuple[list[Figure], list[str]]:
    usb = data["usb_reports_per_s"]
    labels = {
        "encode_detections": "detection summary -> 1 report",
        "encode_text": "2 KB LLM text -> reports",
        "reassemble": "host-side reassembly",
        "sink_fifo": "HidSink.publish -> writer thread -> FIFO",
    }
    figures = [
        Figure(
            f"{labels.get(name, name)} vs USB HID polling rate",
            _median(data["runs"][name]),
            name,
            usb,
            "USB: 1 report per 1 ms interval",
            "reports/s",
        )
        for name in data["runs"]
    ]
    notes = [
        (
            "Baseline: the USB wire's own limit (one 64-byte report per 1 ms polling interval), a "
            "constant, not a measurement; a ratio above 1 means the wire, not the agent, is the "
            "limit. The issue sets no target here."
        )
    ]
    return figures, notes


# -- benchmarks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    name: str
    title: str
    script: str
    full_args: tuple[str, ...]
    quick_args: tuple[str, ...]
    out_args: Callable[[Path], list[str]]
    expected_s: int
    expected_quick_s: int
    figures: Callable[[dict[str, Any]], tuple[list[Figure], list[str]]]
    doc: str

    def command(self, folder: Path, *, quick: bool) -> list[str]:
        args = self.quick_args if quick else self.full_args
        return [sys.executable, self.script, *args, *self.out_args(folder)]


BENCHES: tuple[Bench, ...] = (
    Bench(
        "engine",
        "Engine: TensorEngine vs bare ONNX Runtime",
        "tools/bench_engine.py",
        (),
        (
            "--calls",
            "100",
            "--window",
            "50",
            "--blocks",
            "2",
            "--block-calls",
            "5",
            "--trt-calls",
            "10",
        ),
        lambda folder: ["--out", str(folder)],
        80,
        8,
        engine_figures,
        "docs/engines.md",
    ),
    Bench(
        "vision",
        "Vision pipeline vs a serial loop",
        "tools/bench_vision.py",
        (),
        (
            "--frames",
            "200",
            "--rounds",
            "1",
            "--round-frames",
            "30",
            "--engine-frames",
            "20",
            "--latest-frames",
            "30",
        ),
        lambda folder: ["--out", str(folder / "vision")],
        240,
        20,
        vision_figures,
        "docs/vision.md",
    ),
    Bench(
        "llm",
        "LLM pipeline vs bare llama.cpp",
        "tools/bench_llm.py",
        ("--rounds", "9", "--max-tokens", "48"),
        ("--rounds", "1", "--warmup", "0", "--max-tokens", "8"),
        lambda folder: ["--out", str(folder / "llm.json")],
        200,
        35,
        llm_figures,
        "docs/llm.md",
    ),
    Bench(
        "mqtt",
        "MQTT outbox vs raw paho",
        "tools/bench_mqtt.py",
        (),
        (
            "--messages",
            "500",
            "--rounds",
            "1",
            "--latency-seconds",
            "2",
            "--latency-warmup",
            "1",
        ),
        lambda folder: ["--out", str(folder / "mqtt")],
        60,
        8,
        mqtt_figures,
        "tools/bench_mqtt.py",
    ),
    Bench(
        "hid",
        "HID reporting vs the USB polling rate",
        "tools/bench_hid.py",
        (),
        ("--rounds", "1", "--seconds", "0.05", "--messages", "200"),
        lambda folder: ["--out", str(folder / "hid")],
        12,
        3,
        hid_figures,
        "docs/hid-protocol.md",
    ),
)
NAMES = tuple(b.name for b in BENCHES)


@dataclass
class Outcome:
    bench: Bench
    command: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    error: str | None = None
    tail: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    json_path: Path | None = None
    png_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def display_command(self) -> str:
        """The command as a person types it in the repository (paths relative to it)."""
        args = [arg.removeprefix(f"{ROOT}{os.sep}") for arg in self.command[1:]]
        return shlex.join(["python", *args])


def _stream(proc: subprocess.Popen[str], name: str, log: Path, tail: deque[str]) -> None:
    """Copies the child's output to the terminal (prefixed) and to its log file."""
    stdout = proc.stdout
    if stdout is None:
        return
    with log.open("w", encoding="utf-8") as out:
        for line in stdout:
            out.write(line)
            out.flush()
            text = line.rstrip("\n")
            tail.append(text)
            print(f"  {name} | {text}", flush=True)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the benchmark's process group (it may have started mosquitto), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        else:
            return


def run_bench(
    bench: Bench,
    folder: Path,
    log_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    *,
    quick: bool,
) -> Outcome:
    command = bench.command(folder, quick=quick)
    outcome = Outcome(bench, command)
    json_path = _json_path(bench, folder)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.time()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    reader = threading.Thread(
        target=_stream, args=(proc, bench.name, log_dir / f"{bench.name}.log", tail), daemon=True
    )
    reader.start()
    try:
        outcome.returncode = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        outcome.error = f"timed out after {timeout_s:g} s (--timeout) and was stopped"
    except KeyboardInterrupt:
        _stop_group(proc)
        raise
    reader.join(10)
    outcome.seconds = time.time() - started
    outcome.tail = list(tail)
    if outcome.error is None and outcome.returncode != 0:
        last = next((line.strip() for line in reversed(outcome.tail) if line.strip()), "")
        outcome.error = f"exit status {outcome.returncode}: {last or 'no output'}"
    if outcome.error is None:
        _read_figures(outcome, json_path, started)
    return outcome


def _json_path(bench: Bench, folder: Path) -> Path:
    return folder / f"{bench.name}.json"


def _read_figures(outcome: Outcome, json_path: Path, started: float) -> None:
    if not json_path.is_file() or json_path.stat().st_mtime < started - 1:
        outcome.error = f"exit status 0 but {json_path} was not written by this run"
        return
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        figures, notes = outcome.bench.figures(data)
    except json.JSONDecodeError as exc:
        outcome.error = f"{json_path} is not valid JSON: {exc}"
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        outcome.error = f"{json_path} lacks an expected field ({type(exc).__name__}: {exc})"
    except statistics.StatisticsError as exc:
        outcome.error = f"{json_path}: a series of measurements is empty ({exc})"
    except ZeroDivisionError:
        outcome.error = f"{json_path}: a baseline measured zero"
    else:
        # a ratio is computed when the report is written: a zero baseline fails here, named
        zero = [
            f.name
            for f in figures
            if f.baseline == 0 and (f.target is None or f.target.on == "ratio")
        ]
        if zero:
            outcome.error = f"{json_path}: a baseline measured zero ({'; '.join(zero)})"
        else:
            outcome.figures, outcome.notes = figures, notes
    outcome.json_path = json_path
    png = json_path.with_suffix(".png")
    outcome.png_path = png if png.is_file() and png.stat().st_mtime >= started - 1 else None


# -- machine ---------------------------------------------------------------------------------

LIBRARIES = (
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    ("llama-cpp-python", ("llama_cpp_python", "llama-cpp-python")),
    ("paho-mqtt", ("paho-mqtt",)),
    ("numpy", ("numpy",)),
    (
        "opencv",
        (
            "opencv-python-headless",
            "opencv-python",
            "opencv-contrib-python-headless",
            "opencv-contrib-python",
        ),
    ),
    ("pydantic", ("pydantic",)),
    ("matplotlib", ("matplotlib",)),
    ("psutil", ("psutil",)),
)


def _dist_version(names: Sequence[str]) -> str:
    installed = {
        dist.metadata["Name"].lower().replace("_", "-") for dist in metadata.distributions()
    }
    for name in names:
        if name.lower().replace("_", "-") in installed:
            return f"{metadata.version(name)} ({name})"
    return "not installed"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _meminfo_gib(key: str) -> float | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 2**20 if match else None


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return platform.system()
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)"?$', text, re.MULTILINE)
    return match.group(1) if match else platform.system()


def _command_output(command: list[str]) -> str | None:
    try:
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text or None


def _mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        return "not installed"
    text = _command_output([binary, "-h"]) or ""
    match = re.search(r"version (\S+)", text)
    return match.group(1) if match else "unknown"


def _git() -> dict[str, Any]:
    git = shutil.which("git")
    if git is None:
        return {"commit": "unknown (no git)", "dirty_files": None}
    commit = _command_output([git, "rev-parse", "HEAD"]) or "unknown"
    status = _command_output([git, "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty_files": len(status.splitlines()) if status else 0}


def describe_machine() -> dict[str, Any]:
    cpus_allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "architecture": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "cpus_allowed": cpus_allowed,
        "ram_gib": _meminfo_gib("MemTotal"),
        "ram_available_gib_at_start": _meminfo_gib("MemAvailable"),
        "os": _os_release(),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "libraries": {label: _dist_version(names) for label, names in LIBRARIES},
        "mosquitto": _mosquitto_version(),
        "git": _git(),
    }


# -- report ----------------------------------------------------------------------------------


def format_number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _cell(text: str | None) -> str:
    """``text`` safe inside a markdown table cell (a benchmark's error line may hold ``|``)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _times(ratio: float) -> str:
    """``1.013x``, or ``n/a`` for a figure with a zero baseline (judged on its difference)."""
    return "n/a" if math.isnan(ratio) else f"{format_ratio(ratio)}x"


def _met_text(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "reported"}[met]


def _figure_row(figure: Figure) -> str:
    measured = f"{format_number(figure.value)} {figure.unit} ({figure.value_label})"
    baseline = f"{format_number(figure.baseline)} {figure.unit} ({figure.baseline_label})"
    name = _cell(figure.name) + (f"<br><sub>{_cell(figure.note)}</sub>" if figure.note else "")
    target = _target_text(figure)
    return (
        f"| {name} | {measured} | {baseline} | **{_times(figure.ratio)}** | {target} "
        f"| {_met_text(figure.met)} |"
    )


def _machine_rows(machine: dict[str, Any], run: dict[str, Any]) -> list[str]:
    git = machine["git"]
    dirty = git["dirty_files"]
    dirty_text = "" if not dirty else f" (plus uncommitted changes in {dirty} tracked files)"
    ram = machine["ram_gib"]
    avail = machine["ram_available_gib_at_start"]
    rows = [
        ("CPU", f"{machine['cpu_model']} ({machine['architecture']})"),
        (
            "cores",
            (
                f"{machine['logical_cpus']} logical CPUs, {machine['cpus_allowed']} allowed to "
                "this process"
            ),
        ),
        (
            "RAM",
            f"{ram:.1f} GiB ({avail:.1f} GiB available at start)" if ram and avail else "unknown",
        ),
        ("OS / kernel", f"{machine['os']} / Linux {machine['kernel']}"),
        ("Python", machine["python"]),
        *((name, version) for name, version in machine["libraries"].items()),
        ("mosquitto", machine["mosquitto"]),
        ("git commit", f"`{git['commit']}`{dirty_text}"),
        ("started / finished (UTC)", f"{run['started']} / {run['finished']}"),
        ("wall time", f"{run['wall_s']:.0f} s"),
        ("load average (1, 5, 15 min) before", ", ".join(f"{v:.2f}" for v in run["load_before"])),
        ("load average (1, 5, 15 min) after", ", ".join(f"{v:.2f}" for v in run["load_after"])),
    ]
    return ["| | |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in rows)]


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _doc_link(doc: str, here: Path) -> str:
    """A relative link when the report lies inside the repository, else the repository path."""
    if here.is_relative_to(ROOT):
        return f"[{doc}]({_relative(ROOT / doc, here)})"
    return f"`{doc}`"


def _target_text(figure: Figure) -> str:
    if figure.target is None:
        return "—"
    text = figure.target.text()
    if figure.target.on == "delta":
        text += f" (measured {figure.value - figure.baseline:+.2f} {figure.target.unit})"
    return text


def write_markdown(
    path: Path,
    *,
    outcomes: list[Outcome],
    machine: dict[str, Any],
    run: dict[str, Any],
    summary_png: Path | None,
    command_line: str,
) -> None:
    here = path.parent
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    targeted = [f for o in ok for f in o.figures if f.met is not None]
    met = [f for f in targeted if f.met]
    lines = [
        "# Performance report",
        "",
        f"Written by `{command_line}` (`tools/perf_report.py`)"
        + (" in **quick mode**: short smoke runs, not figures to quote." if run["quick"] else "."),
        (
            "Every figure is a ratio against a baseline measured in the same run of the same "
            "benchmark, on the machine described below. Each benchmark can be re-run alone with "
            "the command shown in its section; its JSON and plot are linked there."
        ),
        "",
        f"**{len(ok)} of {len(outcomes)} benchmarks ran; {len(met)} of {len(targeted)} targets "
        f"met.**" + (f" Failed: {', '.join(o.bench.name for o in failed)}." if failed else ""),
        "",
        "## Machine",
        "",
        *_machine_rows(machine, run),
        "",
        (
            "Other work running on the machine skews every figure: compare the load averages with "
            "the number of CPUs."
        ),
        "",
        "## Summary",
        "",
    ]
    if summary_png is not None:
        lines += [f"![ratios against their baselines]({_relative(summary_png, here)})", ""]
    lines += [
        "| benchmark | figure | ratio | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        if not outcome.ok:
            lines.append(f"| {outcome.bench.name} | **failed**: {_cell(outcome.error)} | | | |")
            continue
        for figure in outcome.figures:
            target = _target_text(figure)
            lines.append(
                f"| {outcome.bench.name} | {_cell(figure.name)} | {_times(figure.ratio)} "
                f"| {target} | {_met_text(figure.met)} |"
            )
    lines.append("")
    for outcome in outcomes:
        bench = outcome.bench
        display = outcome.display_command()
        lines += [
            f"## {bench.title} ({bench.name})",
            "",
            (
                f"Command: `{display}` — {outcome.seconds:.0f} s. Method and caveats: "
                f"{_doc_link(bench.doc, here)}."
            ),
            "",
        ]
        if not outcome.ok:
            lines += [
                f"**Failed**: {outcome.error}",
                "",
                "Last lines of its output:",
                "",
                "```text",
                *outcome.tail[-TAIL_LINES:],
                "```",
                "",
            ]
            continue
        lines += [
            "| figure | measured | baseline (same run) | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
            *(_figure_row(f) for f in outcome.figures),
            "",
            *(f"- {note}" for note in outcome.notes),
            "",
        ]
        links = []
        if outcome.json_path is not None:
            links.append(f"[{outcome.json_path.name}]({_relative(outcome.json_path, here)})")
        if outcome.png_path is not None:
            lines += [f"![{bench.name}]({_relative(outcome.png_path, here)})", ""]
        if links:
            lines += [f"Data: {', '.join(links)}.", ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def plot_summary(outcomes: list[Outcome], path: Path, machine: dict[str, Any]) -> Path | None:
    """One panel per benchmark: each figure's ratio as a bar, its target as a black tick."""
    ran = [o for o in outcomes if o.ok and o.figures]
    if not ran:
        return None
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(1.2, 0.45 * len(o.figures) + 0.8) for o in ran]
    fig, axes = plt.subplots(len(ran), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    colors = {True: "#3a9a4a", False: "#c0392b", None: "#8a8a8a"}
    for ax, outcome in zip(axes[:, 0], ran, strict=True):
        figures = outcome.figures[::-1]
        ratios = [0.0 if math.isnan(f.ratio) else f.ratio for f in figures]
        y = list(range(len(figures)))
        ax.barh(y, ratios, color=[colors[f.met] for f in figures])
        for i, figure in enumerate(figures):
            ax.text(ratios[i], i, f" {_times(figure.ratio)}", va="center", fontsize=8)
            if figure.target is not None and figure.target.on == "ratio":
                ax.plot([figure.target.threshold] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        ax.axvline(1.0, color="#444444", lw=0.8, linestyle=":")
        ax.set_yticks(y, [f.name.replace("`", "") for f in figures], fontsize=8)
        positive = [r for r in ratios if r > 0]
        if positive and max(positive) / max(min(positive), 1e-9) > 30:
            ax.set_xscale("log")
        ax.set_title(outcome.bench.title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ratio to the baseline measured in the same run")
    fig.suptitle(
        f"{machine['cpu_model']}, {machine['cpus_allowed']} CPUs, commit "
        f"{str(machine['git']['commit'])[:10]}\n"
        "green: target met, red: target missed, grey: no target; black tick: the target",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- main ------------------------------------------------------------------------------------


def _first_dir(env: str, fallback: Path) -> str:
    for part in os.environ.get(env, "").split(os.pathsep):
        if part and Path(part).is_dir():
            return os.environ[env]
    return str(fallback)


def parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        msg = f"unknown benchmark {given}; choose from {', '.join(NAMES)}"
        raise argparse.ArgumentTypeError(msg)
    return names


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/perf_report.py",
        description=(__doc__ or "").split("\n\n", maxsplit=1)[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs of every benchmark (a smoke test of the plumbing, about a minute); "
        "the figures are not worth quoting",
    )
    parser.add_argument(
        "--only",
        type=parse_only,
        default=list(NAMES),
        metavar="NAMES",
        help=f"comma-separated subset of: {','.join(NAMES)} (default: all, in that order)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where performance.md goes; JSON and PNG files go to <out-dir>/benchmarks/ "
        "(default: docs/, or build/perf-quick/ with --quick so smoke runs never overwrite "
        "the committed results)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="full output of each benchmark (default: build/perf-report/logs/)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=1200.0,
        help="seconds one benchmark may run before it is stopped and reported failed "
        "(default 1200)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_out = ROOT / "build" / "perf-quick" if args.quick else ROOT / "docs"
    out_dir: Path = (args.out_dir or default_out).resolve()
    bench_dir = out_dir / "benchmarks"
    log_dir: Path = (args.log_dir or ROOT / "build" / "perf-report" / "logs").resolve()
    try:
        bench_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"perf_report: cannot create {bench_dir} or {log_dir}: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["EDGE_AGENT_MODEL_PATH"] = _first_dir("EDGE_AGENT_MODEL_PATH", SHARED / "models")
    env["EDGE_AGENT_DATA_PATH"] = _first_dir("EDGE_AGENT_DATA_PATH", SHARED / "data")
    env.setdefault("PYTHONUNBUFFERED", "1")
    selected = [b for b in BENCHES if b.name in args.only]
    expected = sum(b.expected_quick_s if args.quick else b.expected_s for b in selected)
    machine = describe_machine()
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    print(
        f"perf_report: {len(selected)} benchmarks ({', '.join(b.name for b in selected)}), "
        f"{'quick' if args.quick else 'full'} mode, expected ~{expected / 60:.1f} min; "
        f"load average {load_before[0]:.2f} on {machine['cpus_allowed']} CPUs; "
        f"output in {out_dir}",
        flush=True,
    )
    outcomes: list[Outcome] = []
    for index, bench in enumerate(selected, 1):
        wait = bench.expected_quick_s if args.quick else bench.expected_s
        print(f"[{index}/{len(selected)}] {bench.name}: {bench.script} (~{wait} s)", flush=True)
        outcome = run_bench(bench, bench_dir, log_dir, env, args.timeout, quick=args.quick)
        outcomes.append(outcome)
        state = "ok" if outcome.ok else f"FAILED ({outcome.error})"
        print(f"[{index}/{len(selected)}] {bench.name}: {state} in {outcome.seconds:.0f} s",
              flush=True)  # fmt: skip
    finished = dt.datetime.now(dt.timezone.utc)
    run = {
        "quick": args.quick,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "wall_s": (finished - started).total_seconds(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }
    given = sys.argv[1:] if argv is None else list(argv)
    command_line = shlex.join(["python", "tools/perf_report.py", *given])
    summary_png = plot_summary(outcomes, bench_dir / "performance.png", machine)
    report = out_dir / "performance.md"
    write_markdown(
        report,
        outcomes=outcomes,
        machine=machine,
        run=run,
        summary_png=summary_png,
        command_line=command_line,
    )
    summary = {
        "tool": "tools/perf_report.py",
        "command": command_line,
        "machine": machine,
        "run": run,
        "benchmarks": [
            {
                "name": o.bench.name,
                "command": o.display_command(),
                "seconds": round(o.seconds, 1),
                "ok": o.ok,
                "error": o.error,
                "figures": [f.as_json() for f in o.figures],
                "notes": o.notes,
            }
            for o in outcomes
        ],
    }
    (bench_dir / "performance.json").write_text(json.dumps(summary, indent=2) + "\n",
                                                encoding="utf-8")  # fmt: skip
    failed = [o.bench.name for o in outcomes if not o.ok]
    print(f"wrote {report}" + (f" and {summary_png}" if summary_png else ""))
    if failed:
        print(f"perf_report: failed benchmarks: {', '.join(failed)} (see {report})",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("perf_report: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
