"""Nothing lost: the broker restarted 10 times under a steady stream, and the publishing
process SIGKILLed mid-stream and restarted. Duplicates are allowed only as exact repeats of
the same (boot_id, seq)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from broker_support import (
    PASSWORD,
    MosquittoBroker,
    Received,
    close_monitor,
    device_settings,
    open_monitor,
)

from agent.reporting.mqtt import MqttReporter
from agent.reporting.outbox import Outbox

CHILD = Path(__file__).with_name("publisher_child.py")


def _check_no_loss_and_clean_duplicates(got: list[Received], expected: set[tuple[str, int]]) -> int:
    """Every expected (kind, i) arrived; any repeat is the same (boot_id, seq) and payload."""
    by_key: dict[tuple[str, int], set[tuple[str, int]]] = defaultdict(set)
    by_stamp: dict[tuple[str, int], set[bytes]] = defaultdict(set)
    for m in got:
        msg = json.loads(m.payload)
        kind = m.topic.rsplit("/", 1)[1]
        by_key[(kind, msg["i"])].add((msg["boot_id"], msg["seq"]))
        by_stamp[(msg["boot_id"], msg["seq"])].add(m.payload)
    missing = expected - set(by_key)
    assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"
    assert all(len(stamps) == 1 for stamps in by_key.values()), "one message, two stamps"
    assert all(len(p) == 1 for p in by_stamp.values()), "one stamp, two payloads"
    return len(got) - len(by_key)


def _wait_for_connects(rep: MqttReporter, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while rep.stats()["connects"] < count:
        if time.monotonic() > deadline:
            pytest.fail(f"reporter did not reconnect ({count}): {rep.stats()}")
        time.sleep(0.01)


@pytest.mark.slow
def test_broker_restarted_ten_times_during_a_stream_loses_nothing(
    own_broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    mon = open_monitor(own_broker, f"edge/{device}/vision/#", persistent=True)
    rep = MqttReporter(
        device_settings(own_broker, device), Outbox(tmp_path / "o.sqlite"), version="t"
    )
    rep.start()
    assert rep.wait_connected(10)
    stop = threading.Event()
    published: list[tuple[str, int]] = []

    def stream() -> None:
        i = 0
        while not stop.is_set():
            rep.publish("vision/line/events", {"i": i})
            rep.publish("vision/line/detections", {"i": i})
            published.extend([("events", i), ("detections", i)])
            i += 1
            time.sleep(0.001)

    producer = threading.Thread(target=stream)
    producer.start()
    try:
        for n in range(10):
            _wait_for_connects(rep, n + 1)  # streaming over a live connection...
            time.sleep(0.2)
            own_broker.kill(signal.SIGTERM)  # ...when the broker goes away
            time.sleep(0.15)
            own_broker.start()
        _wait_for_connects(rep, 11)
        time.sleep(0.2)
    finally:
        stop.set()
        producer.join()
    try:
        assert rep.flush(30), rep.stats()
        got = mon.wait_count(lambda _m: True, len(published), timeout=30)
        assert len(got) >= len(published), (len(got), len(published), own_broker.log_tail())
    finally:
        rep.stop()
        rep.outbox.close()
        close_monitor(mon)
    assert own_broker.starts == 11
    dups = _check_no_loss_and_clean_duplicates(got, set(published))
    print(f"{len(published)} published, {len(got)} received, {dups} duplicates")


@pytest.mark.slow
def test_publisher_sigkilled_mid_stream_loses_nothing(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    mon = open_monitor(broker, f"edge/{device}/#")
    outbox = tmp_path / "outbox.sqlite"
    args = [str(broker.port), device, PASSWORD, str(outbox)]
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "stream", *args], stdout=subprocess.PIPE, text=True
    )
    last = -1
    try:
        assert child.stdout is not None
        first_line = child.stdout.readline()
        assert first_line.startswith("connected"), first_line
        boot_id = first_line.split()[1]
        for line in child.stdout:
            last = int(line)
            if last >= 2000:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    # the broker saw the connection die: the Last Will marks the device offline (retained)
    will = mon.wait_for(lambda m: m.topic.endswith("/status") and b'"offline"' in m.payload)
    assert json.loads(will[0].payload)["reason"] == "connection_lost"
    assert json.loads(will[0].payload)["boot_id"] == boot_id
    with Outbox(outbox) as left:
        stored = [json.loads(r.payload)["i"] for r in left.pending(limit=1_000_000)]
    drain = subprocess.run(
        [sys.executable, str(CHILD), "drain", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert drain.returncode == 0, drain.stdout + drain.stderr
    try:
        expected = max([last, *stored]) + 1
        got = mon.wait_count(lambda m: m.topic.endswith("/vision/stream/events"), expected)
    finally:
        close_monitor(mon)
    assert {json.loads(m.payload)["boot_id"] for m in got} == {boot_id}
    _check_no_loss_and_clean_duplicates(got, {("events", i) for i in range(expected)})
    print(f"killed after {last}; {len(stored)} replayed from the outbox; {len(got)} received")
