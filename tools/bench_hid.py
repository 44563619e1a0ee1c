"""Benchmark: HID report encoding and the reporter's path through a FIFO, against USB's own rate.

A HID gadget's interrupt IN endpoint moves one report per polling interval: f_hid asks for
1 ms (full speed bInterval 1, high speed bInterval 4 = 8 microframes), so the wire carries at
most 1000 reports/s = 64 KB/s. The question this answers: how much of that interval does the
agent's side take? Measured, each as reports per second (median of ``--rounds`` runs):

- ``encode_detections``: a real-sized vision result (12 detections, 3 classes) to its one
  report (``encode_detections`` + framing + CRC), what ``HidSink.publish`` does per frame;
- ``encode_text``: a 2 KB LLM answer split into 42 reports;
- ``reassemble``: the receiving side (CRC check, sequence tracking, reassembly) of the text;
- ``sink_fifo``: ``HidSink.publish`` of detection results through the writer thread into a
  FIFO drained by a reader thread (publish to bytes in the reader), reports/s end to end.

Ratios quoted are of medians from this one run, against 1000 reports/s.

    .venv/bin/python tools/bench_hid.py          # writes docs/benchmarks/hid.{json,png}
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.hid.protocol import (  # noqa: E402
    REPORT_SIZE,
    Encoder,
    Kind,
    Reassembler,
    encode_detections,
    encode_text,
)
from agent.hid_config import HidConfig  # noqa: E402
from agent.reporting.hid import HidSink  # noqa: E402

USB_REPORTS_PER_S = 1000.0
OUT = ROOT / "docs" / "benchmarks" / "hid"


def detections_message(frame: int) -> dict[str, Any]:
    dets = [
        {
            "class_id": (0, 0, 1, 2)[i % 4],
            "label": ("person", "person", "bicycle", "car")[i % 4],
            "score": 0.9 - i * 0.03,
            "box_xyxy": [10.0 * i, 20.0, 10.0 * i + 50, 200.0],
            "box_norm": [i / 64, 20 / 272, (i + 5) / 64, 200 / 272],
        }
        for i in range(12)
    ]
    return {
        "schema": "edge-agent.vision.detections",
        "pipeline": "street",
        "frame_index": frame,
        "detections": dets,
    }


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Reports per second of ``fn`` (which returns how many reports it handled)."""
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += fn()
    return done / elapsed


def bench_encode_detections(seconds: float) -> float:
    enc = Encoder()
    msg = detections_message(0)
    dets = msg["detections"]

    def one() -> int:
        payload = encode_detections(stream=0, frame_index=1, detections=dets)
        return len(enc.encode(Kind.DETECTIONS, payload))

    return rate(one, seconds)


TEXT = ("Two cyclists cross from the left while a car waits at the light. " * 32)[:2048]


def bench_encode_text(seconds: float) -> float:
    enc = Encoder()
    return rate(lambda: len(enc.encode(Kind.TEXT, encode_text("llm/r/result", TEXT))), seconds)


def bench_reassemble(seconds: float) -> float:
    enc = Encoder()
    batches = [enc.encode(Kind.TEXT, encode_text("llm/r/result", TEXT)) for _ in range(64)]
    reports = [r for b in batches for r in b]
    reasm = Reassembler()

    def one() -> int:
        reasm.feed_all(reports)
        return len(reports)

    result = rate(one, seconds)
    if reasm.stats.corrupt or reasm.stats.incomplete:
        raise RuntimeError(f"reassembly lost data: {reasm.stats}")
    return result


def bench_sink_fifo(messages: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hidg0"
        os.mkfifo(path)
        rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(rfd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 16)
        cfg = HidConfig.model_validate(
            {"gadget": {"device": str(path)}, "queue_reports": 65536, "max_age_ms": 600_000}
        )
        sink = HidSink(cfg)
        got = [0]
        stop = threading.Event()

        def reader() -> None:
            os.set_blocking(rfd, True)
            while not stop.is_set():
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    return
                got[0] += len(chunk)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        msgs = [detections_message(i) for i in range(messages)]
        start = time.perf_counter()
        for m in msgs:
            sink.publish("vision/street/detections", m)
        if not sink.flush(120):
            raise RuntimeError("HID sink did not drain in 120 s")
        elapsed = time.perf_counter() - start
        status = sink.status()
        sink.close()  # EOF for the reader
        thread.join(10)
        stop.set()
        os.close(rfd)
        if status["dropped_total"]:
            raise RuntimeError(f"drops in the FIFO benchmark: {status}")
        return got[0] / REPORT_SIZE / elapsed


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["reports_per_s"])
    values = [result["reports_per_s"][n] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, values, color="#4878a8")
    ax.axvline(USB_REPORTS_PER_S, color="#c03030", linestyle="--", label="USB HID: 1000 reports/s")
    ax.set_xscale("log")
    ax.set_xlabel("reports per second (median, log scale)")
    ax.set_title("edge-agent HID: agent side vs the USB polling rate")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f} ({v / USB_REPORTS_PER_S:.0f}x)", va="center", fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one encode run")
    parser.add_argument("--messages", type=int, default=5000, help="messages per FIFO run")
    parser.add_argument("--out", type=Path, default=OUT, help="output path without suffix")
    args = parser.parse_args()
    series: dict[str, list[float]] = {
        "encode_detections": [],
        "encode_text": [],
        "reassemble": [],
        "sink_fifo": [],
    }
    for _ in range(args.rounds):
        series["encode_detections"].append(bench_encode_detections(args.seconds))
        series["encode_text"].append(bench_encode_text(args.seconds))
        series["reassemble"].append(bench_reassemble(args.seconds))
        series["sink_fifo"].append(bench_sink_fifo(args.messages))
    medians = {k: round(statistics.median(v), 1) for k, v in series.items()}
    result = {
        "benchmark": "hid",
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "rounds": args.rounds,
        "usb_reports_per_s": USB_REPORTS_PER_S,
        "reports_per_s": medians,
        "runs": {k: [round(x, 1) for x in v] for k, v in series.items()},
        "ratio_to_usb": {k: round(v / USB_REPORTS_PER_S, 1) for k, v in medians.items()},
        "us_per_report": {k: round(1e6 / v, 2) for k, v in medians.items()},
        "text_bytes": len(TEXT),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
