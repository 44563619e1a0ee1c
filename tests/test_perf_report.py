"""tools/perf_report.py end to end: the real tool runs the real benchmarks (quick mode, the fast
engine and HID ones) and the report is checked against the JSON those benchmarks wrote; a
benchmark that fails (its model missing, or past --timeout) is reported while the others still
run. No figure is asserted against a speed: only that the report states what the JSON holds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import onnxruntime as ort
import pytest

from tools.perf_report import BENCHES, Figure, Outcome, _figure_row, _read_figures, format_ratio

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "perf_report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Run:
    returncode: int
    output: str
    stderr: str
    out_dir: Path

    @property
    def markdown(self) -> str:
        return (self.out_dir / "performance.md").read_text(encoding="utf-8")

    @property
    def summary(self) -> dict[str, Any]:
        path = self.out_dir / "benchmarks" / "performance.json"
        return json.loads(path.read_text(encoding="utf-8"))

    def bench_json(self, name: str) -> dict[str, Any]:
        path = self.out_dir / "benchmarks" / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8"))

    def figures(self, name: str) -> dict[str, dict[str, Any]]:
        (bench,) = [b for b in self.summary["benchmarks"] if b["name"] == name]
        return {f["name"]: f for f in bench["figures"]}


def run_tool(out_dir: Path, env: dict[str, str], *args: str) -> Run:
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--out-dir",
            str(out_dir),
            "--log-dir",
            str(out_dir / "logs"),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, out_dir)


def _env(models: Path, data: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["EDGE_AGENT_MODEL_PATH"] = str(models)
    env["EDGE_AGENT_DATA_PATH"] = str(data)
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, data_dir: Path) -> Run:
    out = tmp_path_factory.mktemp("perf-ok")
    return run_tool(out, _env(models_dir, data_dir), "--quick", "--only", "engine,hid")


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Run:
    """The engine benchmark pointed at an empty model folder: it exits with ORT's NO_SUCHFILE."""
    out = tmp_path_factory.mktemp("perf-fail")
    empty = out / "no-models"
    empty.mkdir()
    return run_tool(out, _env(empty, data_dir), "--quick", "--only", "engine,hid")


def test_quick_run_succeeds_and_shows_progress(quick_run: Run) -> None:
    assert quick_run.returncode == 0, quick_run.stderr + quick_run.output[-3000:]
    assert "[1/2] engine: tools/bench_engine.py" in quick_run.output
    assert "[2/2] hid: ok in" in quick_run.output
    assert "  engine | throughput:" in quick_run.output  # the benchmark's own output, streamed
    assert (quick_run.out_dir / "logs" / "engine.log").read_text().startswith("throughput:")
    assert "**2 of 2 benchmarks ran;" in quick_run.markdown
    assert "quick mode" in quick_run.markdown


def test_engine_ratio_is_computed_from_the_benchmark_json(quick_run: Run) -> None:
    fps = quick_run.bench_json("engine")["throughput"]["calls_per_s"]
    ratio = fps["engine.infer"] / fps["bare InferenceSession.run"]
    figure = quick_run.figures("engine")["engine.infer vs bare ONNX Runtime"]
    assert figure["value"] == fps["engine.infer"]
    assert figure["baseline"] == fps["bare InferenceSession.run"]
    assert figure["ratio"] == pytest.approx(ratio, rel=1e-12)
    assert figure["target"] == "ratio >= 0.98"
    assert figure["met"] is (ratio >= 0.98)
    met = "yes" if ratio >= 0.98 else "**no**"
    row = (
        f"| engine | engine.infer vs bare ONNX Runtime | {format_ratio(ratio)}x "
        f"| ratio >= 0.98 | {met} |"
    )
    assert row in quick_run.markdown
    pipelined = fps["engine submit/collect"] / fps["bare InferenceSession.run"]
    assert f"**{format_ratio(pipelined)}x**" in quick_run.markdown


def test_allocation_figure_uses_first_and_last_window(quick_run: Run) -> None:
    alloc = quick_run.bench_json("engine")["allocations"]
    (figure,) = [
        f for name, f in quick_run.figures("engine").items() if name.startswith("live bytes")
    ]
    assert figure["value"] == alloc["last"]["engine_bytes"]
    assert figure["baseline"] == alloc["first"]["engine_bytes"]
    growth = alloc["last"]["engine_bytes"] - alloc["first"]["engine_bytes"]
    assert figure["met"] is (growth <= 1024)
    assert f"(measured {growth:+.2f} bytes)" in quick_run.markdown


def test_hid_ratios_are_against_the_usb_rate(quick_run: Run) -> None:
    data = quick_run.bench_json("hid")
    figures = quick_run.figures("hid")
    assert len(figures) == len(data["runs"]) == 4
    for figure in figures.values():
        runs = data["runs"][figure["value_label"]]
        assert figure["value"] == pytest.approx(float(np.median(runs)))
        assert figure["baseline"] == data["usb_reports_per_s"] == 1000.0
        assert figure["met"] is None  # the issue sets no HID target: reported, not judged
        assert f"| hid | {figure['name']} | {format_ratio(figure['ratio'])}x |" in (
            quick_run.markdown
        )


def test_machine_section_describes_this_machine(quick_run: Run) -> None:
    md = quick_run.markdown
    machine = md.split("## Machine", 1)[1].split("## Summary", 1)[0]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    if model:
        assert f"| CPU | {model.group(1).strip()} " in machine
    assert f"{os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} allowed" in machine
    assert f"Linux {os.uname().release}" in machine
    assert f"| Python | {sys.version.split()[0]} " in machine
    assert f"| onnxruntime | {ort.__version__} " in machine
    assert f"| numpy | {np.__version__} " in machine
    for label in ("llama-cpp-python", "paho-mqtt", "opencv", "mosquitto", "RAM"):
        assert f"| {label} | " in machine
    for when in ("before", "after"):
        assert re.search(rf"\| load average \(1, 5, 15 min\) {when} \| [\d.]+, [\d.]+, [\d.]+ \|",
                         machine)  # fmt: skip
    commit = quick_run.summary["machine"]["git"]["commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert f"| git commit | `{commit}`" in machine
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT,
                           check=False)  # fmt: skip
    assert known.returncode == 0


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.shape[0] > 150  # one panel or more
    assert image.shape[1] > 500
    assert float(np.std(image[..., :3])) > 0.01  # drawn, not a blank canvas


def test_plots_are_written_and_linked(quick_run: Run) -> None:
    bench = quick_run.out_dir / "benchmarks"
    for name in ("performance", "engine", "hid"):
        _check_png(bench / f"{name}.png")
    md = quick_run.markdown
    assert "![ratios against their baselines](benchmarks/performance.png)" in md
    assert "![engine](benchmarks/engine.png)" in md
    assert "![hid](benchmarks/hid.png)" in md
    assert "[engine.json](benchmarks/engine.json)" in md


def test_failed_benchmark_is_reported_and_the_others_still_run(failing_run: Run) -> None:
    assert failing_run.returncode == 1
    assert "failed benchmarks: engine" in failing_run.stderr
    md = failing_run.markdown
    assert "**1 of 2 benchmarks ran;" in md
    assert "Failed: engine." in md
    row = next(line for line in md.splitlines() if line.startswith("| engine | **failed**"))
    assert "exit status 1" in row
    assert "NO_SUCHFILE" in row  # the benchmark's own last line names the cause
    assert str(failing_run.out_dir / "no-models" / "yolox_nano_416.onnx") in row
    assert "Last lines of its output:" in md
    summary = {b["name"]: b for b in failing_run.summary["benchmarks"]}
    assert summary["engine"]["ok"] is False
    assert summary["engine"]["figures"] == []
    assert summary["hid"]["ok"] is True
    assert len(summary["hid"]["figures"]) == 4
    assert "| hid | detection summary -> 1 report vs USB HID polling rate |" in md
    _check_png(failing_run.out_dir / "benchmarks" / "performance.png")


def test_benchmark_past_its_timeout_is_stopped_and_reported(
    tmp_path: Path, models_dir: Path, data_dir: Path
) -> None:
    run = run_tool(
        tmp_path, _env(models_dir, data_dir), "--quick", "--only", "engine", "--timeout", "0.5"
    )
    assert run.returncode == 1
    assert "timed out after 0.5 s (--timeout) and was stopped" in run.markdown
    assert "**0 of 1 benchmarks ran;" in run.markdown
    assert not (tmp_path / "benchmarks" / "performance.png").exists()  # nothing to plot


def test_unknown_benchmark_name_is_a_one_line_error(tmp_path: Path) -> None:
    run = run_tool(tmp_path, dict(os.environ), "--only", "engine,gpu")
    assert run.returncode == 2
    assert "unknown benchmark gpu; choose from engine, vision, llm, mqtt, hid" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "performance.md").exists()


def test_help_has_an_example() -> None:
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert "examples:" in proc.stdout
    assert "tools/perf_report.py --quick --only engine,hid --out-dir" in proc.stdout


# -- the figures of the other benchmarks, from the JSON they wrote (docs/benchmarks/) ----------

COMMITTED = ROOT / "docs" / "benchmarks"


def _committed(name: str) -> dict[str, Any]:
    return json.loads((COMMITTED / f"{name}.json").read_text(encoding="utf-8"))


def _figures(name: str, data: dict[str, Any]) -> dict[str, Figure]:
    (bench,) = [b for b in BENCHES if b.name == name]
    figures, notes = bench.figures(data)
    assert notes
    return {f.name: f for f in figures}


def test_vision_ratios_agree_with_the_benchmarks_own_summary() -> None:
    data = _committed("vision")
    figures = _figures("vision", data)
    throughput = figures["(c) pipeline vs (b) serial loop, throughput"]
    assert throughput.value == pytest.approx(data["pipeline_fps_median"])
    assert throughput.baseline == pytest.approx(data["serial_fps_median"])
    assert throughput.ratio == pytest.approx(data["targets"]["throughput_ratio"]["value"])
    assert throughput.met is data["targets"]["throughput_ratio"]["met"]
    agent_parts = figures["(c) pipeline vs (b2) serial loop of the agent's parts"]
    assert agent_parts.ratio == pytest.approx(data["pipeline_over_serial_agent"])
    cpu = figures["preprocess + decode/NMS CPU vs inference time"]
    share = data["targets"]["pre_post_cpu_pct_of_inference"]
    assert cpu.ratio * 100 == pytest.approx(share["value"], rel=1e-3)  # its inputs are rounded
    assert cpu.met is share["met"]
    latest = figures["`latest` @25 FPS end-to-end p99 vs p50"]
    assert latest.ratio == pytest.approx(data["targets"]["latest_e2e_p99_over_p50"]["value"])


def test_llm_ratios_agree_with_the_benchmarks_own_summary() -> None:
    data = _committed("llm")
    summary, met = data["summary"], data["summary"]["targets"]
    figures = _figures("llm", data)
    decode = figures["pipeline decode vs bare llama.cpp"]
    assert decode.ratio == pytest.approx(summary["decode_ratio_pipeline_to_raw"], abs=1e-3)
    assert decode.met is met["decode_ratio>=0.98"]
    ttft = figures["pipeline time to first token vs bare llama.cpp"]
    assert ttft.value - ttft.baseline == pytest.approx(summary["ttft_overhead_ms"], abs=0.01)
    assert ttft.met is met["ttft_overhead<=10ms"]
    cancel = figures["cancel during decode -> request ended, vs one decode step"]
    assert cancel.ratio == pytest.approx(summary["cancel_decode_in_steps"], abs=1e-3)
    assert cancel.met is met["cancel<=1_decode_step"]
    (prefix,) = [f for name, f in figures.items() if name.startswith("TTFT speed-up")]
    assert prefix.ratio == pytest.approx(summary["prefix_speedup"], abs=0.01)
    assert prefix.met is met["prefix_speedup>=5x"]


def test_mqtt_ratios_agree_with_the_benchmarks_own_summary() -> None:
    data = _committed("mqtt")
    figures = _figures("mqtt", data)
    detections = figures["outbox QoS 1, detections (group commit) vs raw paho"]
    assert detections.ratio == pytest.approx(data["ratio_outbox_to_raw"], abs=1e-3)
    assert detections.met is data["meets_target"]
    events = figures["outbox QoS 1, events (committed in publish) vs raw paho"]
    assert events.ratio == pytest.approx(data["ratio_outbox_events_to_raw"], abs=1e-3)
    assert events.met is data["meets_target_events"]


# -- a JSON the report cannot turn into ratios: reported, never a traceback -------------------


def _read(tmp_path: Path, name: str, data: dict[str, Any]) -> Outcome:
    (bench,) = [b for b in BENCHES if b.name == name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    outcome = Outcome(bench, [sys.executable, bench.script])
    _read_figures(outcome, path, started=0.0)
    return outcome


def test_a_zero_baseline_is_a_failed_benchmark_not_a_crash(tmp_path: Path) -> None:
    data = _committed("hid")
    data["usb_reports_per_s"] = 0
    outcome = _read(tmp_path, "hid", data)
    assert outcome.error is not None
    assert outcome.error.startswith(f"{tmp_path / 'hid.json'}: a baseline measured zero (")
    assert outcome.figures == []


def test_a_zero_baseline_judged_on_its_difference_is_reported_without_a_ratio(
    tmp_path: Path,
) -> None:
    data = _committed("engine")
    data["allocations"]["first"]["engine_bytes"] = 0
    outcome = _read(tmp_path, "engine", data)
    assert outcome.ok, outcome.error
    (alloc,) = [f for f in outcome.figures if f.name.startswith("live bytes")]
    assert alloc.as_json()["ratio"] is None
    assert alloc.met is (data["allocations"]["last"]["engine_bytes"] <= 1024)
    assert "| **n/a** |" in _figure_row(alloc)


def test_an_empty_series_is_a_failed_benchmark_not_a_crash(tmp_path: Path) -> None:
    data = _committed("vision")
    data["serial_rounds"] = []
    outcome = _read(tmp_path, "vision", data)
    assert outcome.error is not None
    assert "a series of measurements is empty" in outcome.error


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    run = run_tool(tmp_path, dict(os.environ), "--timeout", "0")
    assert run.returncode == 2
    assert (
        run.stderr.strip().splitlines()[-1].endswith("argument --timeout: '0' must be more than 0")
    )
    assert "Traceback" not in run.stderr


def test_a_pipe_in_a_figure_or_an_error_stays_inside_its_table_cell() -> None:
    row = _figure_row(Figure("a | b", 2.0, "x", 1.0, "y", "ms", note="exit 1: p | q"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 7, row  # six columns
    assert "a \\| b" in row
    assert "exit 1: p \\| q" in row
