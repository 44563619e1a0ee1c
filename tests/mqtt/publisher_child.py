"""A separate agent-like process for the kill tests: publishes a numbered stream of critical
events through the MQTT reporter (``stream``), or only drains its outbox (``drain``).

    python publisher_child.py stream|drain PORT DEVICE PASSWORD OUTBOX

``stream`` prints the index of every 50th event after ``publish`` returned (so it is durable).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.reporting.mqtt import MqttReporter, MqttSettings  # noqa: E402
from agent.reporting.outbox import Outbox  # noqa: E402


def main() -> int:
    mode, port, device, password, outbox = sys.argv[1:6]
    settings = MqttSettings(
        host="127.0.0.1",
        port=int(port),
        device_id=device,
        client_id=device,
        prefix=f"edge/{device}",
        username=device,
        password=password,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        keepalive_s=5,
    )
    rep = MqttReporter(settings, Outbox(outbox), version="child")
    rep.start()
    if not rep.wait_connected(10):
        print("no connection", rep.stats(), flush=True)
        return 1
    print("connected", rep.boot_id, flush=True)
    if mode == "drain":
        ok = rep.flush(30)
        print("drained" if ok else f"not drained {rep.stats()}", flush=True)
        rep.stop()
        rep.outbox.close()
        return 0 if ok else 1
    i = 0
    while True:  # until SIGKILLed
        rep.publish("vision/stream/events", {"i": i})
        if i % 50 == 0:
            print(i, flush=True)
        i += 1


if __name__ == "__main__":
    raise SystemExit(main())
