"""The live view of ``edge-agent run`` (``agent.cli.live_view``): real runs with the local
mosquitto, the real detector on the street video and SmolLM2's narrator; the view is an MQTT
client of that broker, so what it prints has come over MQTT. Ctrl-C is a real one: the byte
0x03 typed into the agent's terminal, turned into SIGINT by the kernel's tty driver."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from agent_process_support import ROOT, AgentProcess, base_env
from child_support import process_alive
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import configfile
from agent.cli.live_view import LiveView, format_telemetry, start_live_view
from agent.errors import ReportingError
from agent.reporting.local_broker import LocalBroker
from agent.reporting.messages import (
    OutboxTelemetry,
    StatusMessage,
    SystemTelemetry,
    TelemetryMessage,
    ThermalZone,
)
from agent.reporting.telemetry import SystemSampler

STATUS_LINE = re.compile(
    r"^\d\d:\d\d:\d\d street (\d+\.\d) fps (\d+) det/s \[[^\]]*\] \| (.*) \| (\d+) msg/s$"
)
HEADER = re.compile(r"live view: subscribed to edge/[^/]+/# on MQTT 127\.0\.0\.1:(\d+)")
BROKER_LOG = re.compile(r"local MQTT broker on 127\.0\.0\.1:(\d+)")
TELEMETRY = re.compile(r"temp (n/a|\d+\.\d°C), load \d+\.\d\d, agent \d+% CPU \d+ MB")
NARRATOR = re.compile(r"^\d\d:\d\d:\d\d narrator \(assistant\): \S")


def _wait_lines(
    lines: Callable[[], list[str]], done: Callable[[list[str]], bool], timeout_s: float
) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = lines()
        if done(seen):
            return seen
        time.sleep(0.1)
    return lines()


# -- the figures of a telemetry message ------------------------------------------------------


def _zone(sys_root: Path, index: int, kind: str, milli_c: int, passive_at: int) -> None:
    zone = sys_root / "class" / "thermal" / f"thermal_zone{index}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(f"{kind}\n")
    (zone / "temp").write_text(f"{milli_c}\n")
    (zone / "trip_point_0_type").write_text("passive\n")
    (zone / "trip_point_0_temp").write_text(f"{passive_at}\n")


def test_telemetry_shows_the_cpu_zone_load_agent_cpu_and_throttling(tmp_path: Path) -> None:
    # a Jetson-like pair of zones (the GPU one hotter and past its passive trip point) and a
    # Raspberry Pi firmware report (under-voltage now, throttling has occurred), read by the
    # agent's own sampler from sysfs-shaped files
    _zone(tmp_path, 0, "GPU-therm", 60500, passive_at=60000)
    _zone(tmp_path, 1, "CPU-therm", 51250, passive_at=95000)
    firmware = tmp_path / "devices/platform/soc/soc:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("0x40001\n")
    system = SystemSampler(sys_root=tmp_path).sample()
    text = format_telemetry(system)
    assert text.startswith("temp 51.2°C, load "), text
    assert re.fullmatch(TELEMETRY.pattern + r", throttling: .*", text), text
    assert text.endswith(
        ", throttling: under_voltage, throttling_occurred, thermal_zone0 passive"
    ), text

    bare = SystemTelemetry(rss_bytes=0, cpu_percent=0, load_avg_1m=0.5)
    assert format_telemetry(bare) == "temp n/a, load 0.50, agent 0% CPU 0 MB"


# -- the view's MQTT client on a real broker ---------------------------------------------------


class _Out(io.StringIO):
    """The terminal: written by the view's threads, read by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            return super().write(text)

    def lines(self) -> list[str]:
        with self.lock:
            return self.getvalue().splitlines()


def _stamp(seq: int) -> dict[str, object]:
    return {"device_id": "dev1", "boot_id": "b1", "seq": seq, "ts": time.time()}


def _agent_client(broker: LocalBroker) -> paho.Client:
    """An MQTT client with the agent's own credentials on its local broker (anonymous clients
    may only read there)."""
    mqtt = broker.mqtt_config()
    assert mqtt.password_file is not None
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="agent-dev1", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(mqtt.username, mqtt.password_file.read_text().strip())
    connected = threading.Event()
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.set() if not rc.is_failure else None
    client.connect(mqtt.host, mqtt.port, 30)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        pytest.fail("the agent's credentials were not accepted by the local broker")
    return client


def _view_threads() -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if "edge-agent-view" in t.name or t.name == "live-view"
    ]


def test_view_shows_what_the_agent_publishes_and_skips_what_it_cannot_read(
    mosquitto: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.cli.live_view")
    broker = LocalBroker(mosquitto, device_id="dev1", state_dir=tmp_path)
    broker.start()
    out = _Out()
    view = None
    agent = None
    try:
        view = start_live_view(broker, "dev1", out)
        assert view is not None
        assert view.prefix == "edge/dev1"  # the prefix the agent reports under on that broker
        agent = _agent_client(broker)

        def publish(relative: str, payload: object) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            agent.publish(f"edge/dev1/{relative}", data, qos=1).wait_for_publish(10)

        # unreadable messages first: each is skipped, and paho's thread lives on
        publish("vision/street/detections", b"not json")
        publish("vision/street/detections", [1, 2])
        publish("vision/street/detections", {"detections": 5, "counts": {}})
        publish("telemetry", {"system": "hot"})
        publish("status", {"state": "on fire"})
        system = SystemTelemetry(
            rss_bytes=312_000_000,
            cpu_percent=92,
            load_avg_1m=1.43,
            thermal=[ThermalZone(name="thermal_zone0", type="cpu-thermal", temp_c=51.25)],
            throttling={"rpi_flags": ["under_voltage"]},
        )
        outbox = OutboxTelemetry(
            depth=0, bytes=0, critical=0, inflight=0, dropped=0, refused=0, expired=0,
            dead_letters=0, connected=True,
        )  # fmt: skip
        publish(
            "telemetry",
            TelemetryMessage(**_stamp(1), system=system, outbox=outbox).model_dump(mode="json"),
        )
        online = StatusMessage(
            **_stamp(2), state="online", version="0", agent_state="ready", started_at=0,
            pipelines={"street": "running"},
        )  # fmt: skip
        publish("status", online.model_dump(mode="json"))
        publish("status", online.model_copy(update={"seq": 3}).model_dump(mode="json"))
        narrated = {"source": "narrator", "pipeline": "assistant", "status": "completed"}
        publish("llm/r1/result", {**_stamp(4), **narrated, "text": "Two people\n  crossed."})
        for seq in range(5, 8):
            publish("vision/street/detections",
                    {**_stamp(seq), "detections": [{}, {}], "counts": {"person": 2}})  # fmt: skip

        def shown(lines: list[str]) -> bool:
            return any("street" in line and "fps" in line and "person 2" in line for line in lines)

        lines = _wait_lines(out.lines, shown, 15)
        assert shown(lines), lines
    finally:
        if agent is not None:
            agent.disconnect()
            agent.loop_stop()
        if view is not None:
            view.close()
        broker.stop()
    lines = out.lines()
    status = [line for line in lines if " status: " in line]
    assert len(status) == 1, lines  # the same status twice is one line
    assert status[0].endswith("status: online (agent ready; street running)")
    assert any(line.endswith(" narrator (assistant): Two people crossed.") for line in lines)
    street = next(line for line in lines if " street " in line and "[person 2]" in line)
    assert re.search(r" street \d+\.\d fps \d+ det/s \[person 2\] \| ", street), street
    assert (
        "| temp 51.2°C, load 1.43, agent 92% CPU 312 MB, throttling: under_voltage |" in street
    ), street
    # each unreadable message logged with its topic: a warning for the first of its kind
    skipped = [r for r in caplog.records if " not shown: " in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(" not shown")[0]) for r in skipped] == [
        ("WARNING", "live view: edge/dev1/vision/street/detections"),
        ("DEBUG", "live view: edge/dev1/vision/street/detections"),
        ("DEBUG", "live view: edge/dev1/vision/street/detections"),
        ("WARNING", "live view: edge/dev1/telemetry"),
        ("WARNING", "live view: edge/dev1/status"),
    ]
    # close() stopped the printing thread and paho's network thread
    assert not _view_threads(), _view_threads()


class _FakeBroker:
    """A TCP listener on 127.0.0.1 that answers each packet it reads with the next of
    ``replies``, then only reads."""

    def __init__(self, replies: list[bytes]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.replies = replies
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the sockets closed by close()
            conn, _ = self.server.accept()
            self.conns.append(conn)
            for reply in self.replies:
                conn.recv(1024)
                conn.sendall(reply)
            while conn.recv(1024):
                pass

    def close(self) -> None:
        self.server.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):  # the view may have closed its end already
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.thread.join(5)


CONNACK_OK = b"\x20\x03\x00\x00\x00"  # MQTT 5 CONNACK: no session, success, no properties
CONNACK_NOT_AUTHORIZED = b"\x20\x03\x00\x87\x00"
SUBACK_NOT_AUTHORIZED = b"\x90\x04\x00\x01\x00\x87"  # packet id 1, no properties, 0x87


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ([CONNACK_NOT_AUTHORIZED], "MQTT 127.0.0.1:{port} refused: Not authorized"),
        (
            [CONNACK_OK, SUBACK_NOT_AUTHORIZED],
            "MQTT 127.0.0.1:{port} refused: the subscription to edge/dev1/#: Not authorized",
        ),
        ([], "no answer from MQTT 127.0.0.1:{port} in 0.5 s"),
    ],
    ids=["connack-refused", "suback-refused", "silent"],
)
def test_view_start_failure_is_one_line_and_frees_the_client(
    replies: list[bytes], message: str
) -> None:
    fake = _FakeBroker(replies)
    try:
        view = LiveView("127.0.0.1", fake.port, "edge/dev1", _Out())
        with pytest.raises(ReportingError) as caught:
            view.start(timeout_s=0.5)
        view.close()
    finally:
        fake.close()
    assert str(caught.value) == "live view: " + message.format(port=fake.port)
    assert not _view_threads()


def test_view_start_without_a_listener_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    view = LiveView("127.0.0.1", port, "edge/dev1", _Out())
    with pytest.raises(
        ReportingError, match=rf"^live view: cannot connect to MQTT 127\.0\.0\.1:{port}: "
    ):
        view.start()
    view.close()
    assert not _view_threads()


# -- a real run: detections, narrator and telemetry arriving over MQTT -----------------------


def _config(folder: Path) -> Path:
    path = folder / "agent.toml"
    path.write_text(
        f'state_dir = "{folder / "state"}"\n'
        "[[pipelines]]\n"
        'type = "vision"\nname = "street"\nmodel = "yolox_nano_416"\n'
        'engine = { type = "onnxruntime", intra_op_threads = 1 }\n'
        'sources = [{ type = "file", path = "bikes-video", loop = true, realtime = true }]\n'
        "[[pipelines]]\n"
        'type = "llm"\nname = "assistant"\nmodel = "smollm2-135m-instruct-q4_1"\n'
        "engine = { n_ctx = 1024, threads = 1, batch_threads = 1 }\n"
        'narrator = { interval_s = 1, pipelines = ["street"], max_tokens = 24 }\n',
        encoding="utf-8",
    )
    return path


def test_live_view_shows_mqtt_detections_narrator_and_telemetry(
    mosquitto: Path, tmp_path: Path, model_search_path: str, data_dir: Path
) -> None:
    del mosquitto  # required: --view live starts the local broker
    env = base_env(EDGE_AGENT_MODEL_PATH=model_search_path, EDGE_AGENT_DATA_PATH=str(data_dir))
    agent = AgentProcess(["run", "--config", str(_config(tmp_path)), "--view", "live"], env)
    try:

        def complete(lines: list[str]) -> bool:
            status = [m for m in map(STATUS_LINE.match, lines) if m]
            return any(float(m[1]) > 0 and TELEMETRY.fullmatch(m[3]) for m in status) and any(
                NARRATOR.match(line) for line in lines
            )

        lines = _wait_lines(lambda: list(agent.stdout), complete, 120)
        assert complete(lines), (lines[-5:], agent.stderr[-5:])
        record = json.loads((tmp_path / "state" / "local-broker.json").read_text())
        agent.signal(signal.SIGINT)
        assert agent.wait() == 0
    finally:
        agent.kill()
    assert not any("Traceback" in line for line in agent.stderr), agent.stderr
    # the view read the agent's own broker ...
    header = next(m for m in map(HEADER.search, agent.stdout) if m)
    broker = next(m for m in map(BROKER_LOG.search, agent.stderr) if m)
    assert header[1] == broker[1]
    # ... and nothing else wrote to stdout: no JSON Lines reporter, every line the view's
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in agent.stdout), agent.stdout[:3]
    detected = [m for m in map(STATUS_LINE.match, agent.stdout) if m and int(m[2]) > 0]
    assert detected, agent.stdout[-5:]
    assert any(
        "status: online (agent ready; street running, assistant running)" in line
        for line in agent.stdout
    )
    assert "offline" in next(line for line in reversed(agent.stdout) if " status: " in line)
    # the broker went with the agent
    assert not process_alive(int(record["pid"]))


def test_live_view_without_the_local_broker_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[reporting.mqtt]\nhost = "mqtt.example.org"\nport = 8883\n',
        encoding="utf-8",
    )
    for args, needle in (
        (["--config", str(config)], "reports to MQTT mqtt.example.org:8883"),
        (["--no-local-broker"], "drop --no-local-broker"),
    ):
        agent = AgentProcess(["run", *args, "--view", "live"], base_env())
        assert agent.wait() == 2
        assert agent.stderr == [agent.stderr[-1]]
        assert agent.stderr[-1].startswith("edge-agent run: --view live: "), agent.stderr
        assert needle in agent.stderr[-1]
    assert not (tmp_path / "state").exists()


# -- Ctrl-C in a terminal, on the embedded defaults (the README's run command) ---------------


class Terminal:
    """``python -m agent ...`` on a fresh pseudo-terminal that is its controlling terminal
    (its own session, like a login shell's foreground job)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.output = b""

        def make_controlling_tty() -> None:  # in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", *args],
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=make_controlling_tty,  # noqa: PLW1509 - nothing else runs in the child
        )
        os.close(slave)

    def read(self, timeout_s: float = 0.2) -> str:
        """What the terminal has shown so far (reads what is waiting)."""
        while select.select([self.master], [], [], timeout_s)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            self.output += data
            timeout_s = 0.0
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read()
        self.read(0.0)
        return self.proc.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terminal_env(tmp_path: Path, model_search_path: str, data_dir: Path) -> dict[str, str]:
    if configfile.DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{configfile.DEFAULT_CONFIG_PATH} exists: `run` would not use the defaults")
    return base_env(
        STATE_DIRECTORY=str(tmp_path / "state"),
        EDGE_AGENT_MODEL_PATH=model_search_path,
        EDGE_AGENT_DATA_PATH=str(data_dir),
    )


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def test_ctrl_c_in_a_terminal_stops_the_whole_product_with_exit_0(
    mosquitto: Path, terminal_env: dict[str, str], tmp_path: Path, terminals: list[Terminal]
) -> None:
    del mosquitto
    term = Terminal(["run"], terminal_env)
    terminals.append(term)

    def shows_detections(text: str) -> bool:
        return any((m := STATUS_LINE.match(line)) and float(m[1]) > 0 for line in text.split("\n"))

    deadline = time.monotonic() + 90
    while not shows_detections(term.read()) and time.monotonic() < deadline:
        assert term.proc.poll() is None, term.read()[-2000:]
    screen = term.read()
    assert shows_detections(screen), screen[-2000:]
    # a terminal gets the live view, not JSON Lines
    assert not any(line.startswith("{") for line in screen.split("\n")), screen[-2000:]
    record = json.loads((tmp_path / "state" / "local-broker.json").read_text())

    term.type(b"\x03")  # Ctrl-C
    assert term.wait(60) == 0, term.read()[-2000:]
    screen = term.read()
    assert "Traceback" not in screen, screen
    assert "agent.process: agent stopped" in screen
    assert not process_alive(int(record["pid"]))
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["state"] == "stopped"
