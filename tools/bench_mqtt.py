"""Benchmark: durable-outbox QoS 1 publish rate vs raw paho QoS 1 to the same real mosquitto.

Both sides publish the same JSON messages (a detection-sized payload) as fast as they can and
the clock stops at the last PUBACK. "raw" is a plain paho client (its own loop_start thread,
in-flight window 20); "outbox" is ``MqttReporter.publish`` with the same window: stamp, SQLite
WAL insert committed before the owner thread publishes it, delete on PUBACK. Two outbox series:

- detections (droppable class): group commit, one transaction per owner-loop batch;
- events (critical class): one committed transaction inside every ``publish`` call.

Runs alternate raw/detections/events ``--rounds`` times; the ratios quoted are of the medians
measured in this one run. The 0.7x target applies to the detections path (the high-rate one).

    .venv/bin/python tools/bench_mqtt.py            # writes docs/benchmarks/mqtt.{json,png}

It starts its own mosquitto (auth + the deploy ACL, like the tests) on a free local port.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "mqtt"))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

from agent.reporting.mqtt import MqttReporter, MqttSettings  # noqa: E402
from agent.reporting.outbox import Outbox  # noqa: E402

TOPIC = "vision/bench/detections"
EVENTS = "vision/bench/events"


def _payload(i: int) -> dict[str, Any]:
    return {
        "pipeline": "bench",
        "frame": i,
        "detections": [
            {"class_id": 2, "label": "car", "score": 0.87, "box_xyxy": [10.5, 20.25, 110.0, 96.5]},
            {"class_id": 0, "label": "person", "score": 0.66, "box_xyxy": [200, 40, 240, 160]},
        ],
    }


def bench_raw(port: int, device: str, password: str, n: int, window: int) -> float:
    done = threading.Event()
    acked = 0

    def on_publish(*_a: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=device, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(device, password)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    topic = f"edge/{device}/{TOPIC}"
    time.sleep(0.2)
    t0 = time.perf_counter()
    for i in range(n):
        client.publish(topic, json.dumps(_payload(i), separators=(",", ":")), qos=1)
    if not done.wait(120):
        raise RuntimeError(f"raw paho: only {acked}/{n} PUBACKs")
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return n / elapsed


def bench_outbox(  # noqa: PLR0917
    port: int, device: str, password: str, n: int, window: int, folder: Path, topic: str = TOPIC
) -> float:
    settings = MqttSettings(
        host="127.0.0.1",
        port=port,
        device_id=device,
        client_id=device,
        prefix=f"edge/{device}",
        username=device,
        password=password,
        max_inflight=window,
    )
    path = folder / f"outbox-{time.monotonic_ns()}.sqlite"
    reporter = MqttReporter(settings, Outbox(path), version="bench")
    reporter.start()
    if not reporter.wait_connected(10):
        raise RuntimeError(f"outbox reporter did not connect: {reporter.stats()}")
    time.sleep(0.2)
    t0 = time.perf_counter()
    for i in range(n):
        reporter.publish(topic, _payload(i))
    if not reporter.flush(120):
        raise RuntimeError(f"outbox: not drained: {reporter.stats()}")
    elapsed = time.perf_counter() - t0
    reporter.stop()
    reporter.outbox.close()
    return n / elapsed


def main() -> int:
    from broker_support import PASSWORD, running_broker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=20, help="QoS 1 in-flight window")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "mqtt")
    args = parser.parse_args()

    raw: list[float] = []
    outbox: list[float] = []
    events: list[float] = []
    with running_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            raw.append(bench_raw(broker.port, "dev000", PASSWORD, args.messages, args.window))
            folder = Path(tmp)
            outbox.append(
                bench_outbox(broker.port, "dev001", PASSWORD, args.messages, args.window, folder)
            )
            events.append(
                bench_outbox(
                    broker.port, "dev002", PASSWORD, args.messages, args.window, folder, EVENTS
                )
            )
            print(
                f"round {r + 1}: raw {raw[-1]:.0f} msg/s, outbox detections {outbox[-1]:.0f} "
                f"msg/s, outbox events {events[-1]:.0f} msg/s"
            )
    ratio = statistics.median(outbox) / statistics.median(raw)
    ratio_events = statistics.median(events) / statistics.median(raw)
    result = {
        "benchmark": "mqtt_qos1_publish_rate",
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "window": args.window,
        "payload_bytes": len(json.dumps(_payload(0), separators=(",", ":"))),
        "raw_paho_msg_per_s": [round(x, 1) for x in raw],
        "outbox_msg_per_s": [round(x, 1) for x in outbox],
        "outbox_events_msg_per_s": [round(x, 1) for x in events],
        "raw_median": round(statistics.median(raw), 1),
        "outbox_median": round(statistics.median(outbox), 1),
        "outbox_events_median": round(statistics.median(events), 1),
        "ratio_outbox_to_raw": round(ratio, 3),
        "ratio_outbox_events_to_raw": round(ratio_events, 3),
        "target_ratio": 0.7,
        "meets_target": ratio >= 0.7,
        "notes": "outbox = detections (droppable, group commit); outbox_events = critical "
        "class, committed inside publish(). Same broker, same window, same payload.",
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "broker": "mosquitto (local, auth + ACL)",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["raw paho", "outbox\ndetections", "outbox\nevents (sync)"]
    medians = [result["raw_median"], result["outbox_median"], result["outbox_events_median"]]
    ax.bar(labels, medians, color=["#888888", "#3070b0", "#70a0d0"])
    keys = ("raw_paho_msg_per_s", "outbox_msg_per_s", "outbox_events_msg_per_s")
    for i, key in enumerate(keys):
        ax.scatter([i] * len(result[key]), result[key], color="black", s=12, zorder=3)
    ax.set_ylabel("messages / s (to last PUBACK)")
    ax.set_title(
        f"MQTT QoS 1 publish rate, {result['messages_per_round']} msgs x {result['rounds']}\n"
        f"detections/raw = {result['ratio_outbox_to_raw']:.2f} (target >= 0.7), "
        f"events/raw = {result['ratio_outbox_events_to_raw']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
