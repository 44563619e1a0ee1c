"""Gadget mode against a real FIFO and a real pty standing in for /dev/hidgN.

A FIFO behaves like a hidg node where it matters: a non-blocking write of one report either
goes in whole or fails with EAGAIN when the reader (the host) is not taking data, POLLOUT says
when it may go on, and a reader that leaves makes writes fail (EPIPE). The pty is a byte stream
with its own buffer (raw mode, so bytes pass unchanged).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import HidDeviceError
from agent.hid import gadget as gadget_mod
from agent.hid.gadget import GadgetTransport
from agent.hid.protocol import REPORT_SIZE, Encoder, Kind, Reassembler, encode_json
from agent.hid.writer import Outcome, ReportWriter
from agent.hid_config import HidConfig
from agent.reporting.hid import HidSink

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BYTES = 4096  # one page: 64 reports fit before the "host" must read
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A FIFO with a non-blocking reader already attached (the "host")."""
    path = tmp_path / "hidg0"
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(rfd, F_SETPIPE_SZ, PIPE_BYTES)
    try:
        yield path, rfd
    finally:
        os.close(rfd)


def drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def split(data: bytes) -> list[bytes]:
    return [data[i : i + REPORT_SIZE] for i in range(0, len(data), REPORT_SIZE)]


def messages(n: int, size: int = 10) -> list[list[bytes]]:
    enc = Encoder()
    return [enc.encode(Kind.JSON, encode_json("t", {"i": i, "pad": "p" * size})) for i in range(n)]


def test_reports_reach_reader_whole_and_in_order(fifo: tuple[Path, int]) -> None:
    path, rfd = fifo
    t = GadgetTransport(path, REPORT_SIZE)
    msgs = messages(20, size=120)  # 3 reports each
    for m in msgs:
        for r in m:
            assert t.write(r, deadline=float("inf")) is Outcome.OK
    got = Reassembler().feed_all(split(drain(rfd)))
    assert [m.payload for m in got] == [
        Reassembler().feed_all(m)[0].payload for m in msgs
    ]  # each reassembles to what was sent
    t.close()


def test_reader_that_stops_reading_never_blocks_writer(fifo: tuple[Path, int]) -> None:
    """The "host" reads 10 reports then stops. The pipeline keeps publishing 400 messages:
    every submit returns at once (queued or counted as dropped), the writer thread gives up
    on each report at its deadline, and close() ends the thread: nothing waits past a deadline.
    Every message is accounted for: written + dropped == submitted."""
    path, rfd = fifo
    writer = ReportWriter(
        GadgetTransport(path, REPORT_SIZE),
        name="test",
        max_queued_reports=16,
        report_timeout_s=0.002,
        max_age_s=60,
    )
    writer.start()
    msgs = messages(400)
    read_reports: list[bytes] = []
    accepted = 0
    for burst in range(20):  # 20 bursts of 20 messages; the queue holds 16 reports
        accepted += sum(writer.submit(m) for m in msgs[burst * 20 : (burst + 1) * 20])
        assert writer.flush(30)  # let the writer thread work through what was queued
        if burst < 2:
            read_reports += split(drain(rfd))  # the host polls ... then stops
    status = writer.status()
    assert writer.close(timeout_s=5)
    assert status["messages_submitted"] == 400
    assert status["messages_written"] + status["messages_dropped"] == 400
    assert status["dropped"]["timeout"] > 0  # reports the stalled host never took
    assert status["dropped"]["queue_full"] > 0  # submits refused at once, not waited on
    assert status["dropped"]["queue_full"] == 400 - accepted
    # the pipe holds at most 64 reports beyond what the host read
    assert status["reports_written"] <= len(read_reports) + PIPE_BYTES // REPORT_SIZE
    assert status["transport"]["timeouts"] == status["dropped"]["timeout"]
    # the host resumes: everything it gets is whole and decodes
    backlog = split(drain(rfd))
    reasm = Reassembler()
    got = reasm.feed_all(read_reports + backlog)
    assert len(got) == status["messages_written"]
    assert reasm.stats.corrupt == 0
    assert reasm.stats.lost > 0  # the drops show up as sequence gaps on the host side


def test_sink_status_reports_drops_when_host_stalls(fifo: tuple[Path, int]) -> None:
    path, _rfd = fifo  # nobody ever reads
    cfg = HidConfig.model_validate(
        {
            "gadget": {"device": str(path)},
            "json_topics": ["x/#"],
            "queue_reports": 8,
            "report_timeout_ms": 1,
        }
    )
    sink = HidSink(cfg)
    try:
        for burst in range(30):
            for i in range(10):
                sink.publish("x/y", {"i": burst * 10 + i})  # returns at once; never raises
            assert sink.flush(30)
        status = sink.status()
    finally:
        sink.close()
    vendor = status["vendor"]
    assert vendor["reports_written"] == PIPE_BYTES // REPORT_SIZE  # the pipe filled, then no more
    assert vendor["messages_dropped"] == 300 - vendor["messages_written"]
    assert status["dropped_total"] == vendor["messages_dropped"]
    assert vendor["dropped"]["timeout"] + vendor["dropped"]["queue_full"] > 0


def test_pty_stands_in_for_hidg(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    os.set_blocking(master, False)
    try:
        t = GadgetTransport(name, REPORT_SIZE)
        msgs = messages(5, size=200)
        for m in msgs:
            for r in m:
                assert t.write(r, deadline=float("inf")) is Outcome.OK
        data = b""
        while len(data) < sum(len(m) for m in msgs) * REPORT_SIZE:
            data += os.read(master, 65536)
        got = Reassembler().feed_all(split(data))
        assert len(got) == 5
        assert t.status()["partial_reports"] == 0
        t.close()
    finally:
        os.close(master)
        os.close(slave)


def test_pty_reader_stops_then_writer_times_out(tmp_path: Path) -> None:
    """Nobody reads the pty master: its buffer fills, writes time out at their deadline."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        t = GadgetTransport(os.ttyname(slave), REPORT_SIZE)
        outcomes = [t.write(bytes(REPORT_SIZE), deadline=0.0) for _ in range(2000)]
        assert Outcome.TIMEOUT in outcomes
        first_timeout = outcomes.index(Outcome.TIMEOUT)
        assert all(o is Outcome.OK for o in outcomes[:first_timeout])
        assert t.status()["timeouts"] == outcomes.count(Outcome.TIMEOUT)
        t.close()
    finally:
        os.close(master)
        os.close(slave)


def test_missing_node_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HidDeviceError, match=r"does not exist — set up the USB gadget"):
        GadgetTransport(tmp_path / "hidg9", REPORT_SIZE)


def test_regular_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "hidg0"
    f.write_bytes(b"")
    with pytest.raises(HidDeviceError, match="regular file, not a HID device node"):
        GadgetTransport(f, REPORT_SIZE)


def test_not_writable_node_is_a_clear_error(tmp_path: Path) -> None:
    """A node the agent's user may not write (as root, checked in a child that drops to nobody)."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o711)  # others may reach the node (as in /dev), not write it
    path = folder / "hidg0"
    os.mkfifo(path, 0o600 if os.geteuid() == 0 else 0o400)  # root: the child is someone else
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from agent.errors import HidDeviceError
        from agent.hid.gadget import GadgetTransport
        if os.geteuid() == 0:  # root may write anything: be the service user's stand-in
            os.setgid(65534); os.setuid(65534)
        try:
            GadgetTransport({str(path)!r}, 64)
        except HidDeviceError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        shutil.rmtree(folder)
    assert proc.returncode == 3, proc.stderr
    assert "is not writable by this user — install deploy/systemd/70-edge-agent.rules" in (
        proc.stdout
    )


def test_wait_for_device_then_node_appears(tmp_path: Path) -> None:
    path = tmp_path / "hidg0"
    now = [0.0]
    t = GadgetTransport(
        path, REPORT_SIZE, wait_for_device=True, reopen_interval_s=1.0, clock=lambda: now[0]
    )
    assert t.status()["state"] == "missing"
    assert t.write(bytes(REPORT_SIZE), deadline=0.0) is Outcome.NO_HOST
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert t.write(bytes(REPORT_SIZE), deadline=0.0) is Outcome.NO_HOST  # not yet retried
        now[0] += 1.0
        assert t.write(bytes(REPORT_SIZE), deadline=0.0) is Outcome.OK
        assert drain(rfd) == bytes(REPORT_SIZE)
        t.close()
    finally:
        os.close(rfd)


def test_reader_leaves_then_returns(fifo: tuple[Path, int]) -> None:
    """The reader closes (the gadget went away: EPIPE): no_host, the node is reopened later."""
    path, rfd = fifo
    now = [0.0]
    t = GadgetTransport(path, REPORT_SIZE, reopen_interval_s=1.0, clock=lambda: now[0])
    os.close(rfd)
    assert t.write(bytes(REPORT_SIZE), deadline=0.0) is Outcome.NO_HOST
    assert t.status()["state"] == "missing"
    rfd2 = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        now[0] += 1.0
        assert t.write(b"\x01" * REPORT_SIZE, deadline=0.0) is Outcome.OK
        assert drain(rfd2) == b"\x01" * REPORT_SIZE
        assert t.status()["opens"] == 2
        t.close()
    finally:
        os.close(rfd2)
        # the fixture closes its fd too: give it a valid one to close
        os.dup2(os.open(os.devnull, os.O_RDONLY), rfd)


def test_eshutdown_host_not_enumerated_contract(
    fifo: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """f_hid's write returns -ESHUTDOWN while no host has enumerated the gadget (the function
    is disabled); a FIFO cannot produce that errno, so ``os.write`` is replaced by one that
    raises it exactly as the syscall would. The report is dropped at once (no waiting)."""
    path, _ = fifo
    t = GadgetTransport(path, REPORT_SIZE)

    def shutdown_write(fd: int, data: object) -> int:
        raise OSError(errno.ESHUTDOWN, os.strerror(errno.ESHUTDOWN))

    monkeypatch.setattr(gadget_mod.os, "write", shutdown_write)
    assert t.write(bytes(REPORT_SIZE), deadline=float("inf")) is Outcome.NO_HOST
    st = t.status()
    assert st["state"] == "no_host"
    assert "ESHUTDOWN" in st["last_error"]
    monkeypatch.undo()
    assert t.write(bytes(REPORT_SIZE), deadline=0.0) is Outcome.OK  # the host enumerated
    t.close()


def test_wrong_report_size_is_an_error_not_a_write(fifo: tuple[Path, int]) -> None:
    path, rfd = fifo
    t = GadgetTransport(path, REPORT_SIZE)
    assert t.write(b"short", deadline=0.0) is Outcome.ERROR
    assert drain(rfd) == b""
    t.close()


def test_stale_messages_are_dropped_not_sent(fifo: tuple[Path, int]) -> None:
    """A host that comes back gets fresh results, not a backlog: messages that waited longer
    than max_age are dropped (counted) when their turn comes."""
    path, rfd = fifo
    now = [0.0]
    writer = ReportWriter(
        GadgetTransport(path, REPORT_SIZE), name="t", max_age_s=2.0, clock=lambda: now[0]
    )
    old = messages(3)
    for m in old:
        assert writer.submit(m)
    now[0] = 5.0  # they waited 5 s before the writer got to them
    fresh = messages(1)[0]
    assert writer.submit(fresh)
    writer.start()
    assert writer.flush(10)
    status = writer.status()
    assert writer.close()
    assert status["dropped"]["stale"] == 3
    assert status["messages_written"] == 1
    assert split(drain(rfd)) == fresh


def test_submit_after_close_is_refused_and_counted(fifo: tuple[Path, int]) -> None:
    path, _ = fifo
    writer = ReportWriter(GadgetTransport(path, REPORT_SIZE), name="t")
    writer.start()
    assert writer.close()
    assert not writer.submit(messages(1)[0])
    assert writer.status()["dropped"]["closed"] == 1
