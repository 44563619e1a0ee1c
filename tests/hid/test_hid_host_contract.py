"""Host mode (pyusb) against ``tests/doubles/pyusb_backend.py``: no USB bus exists here, so the
real ``usb.core``/``usb.util`` drive a faithful ``usb.backend.IBackend`` double."""

from __future__ import annotations

import inspect

import pytest
import usb.backend
import usb.core
from doubles.pyusb_backend import (
    LIBUSB_ERROR_IO,
    LIBUSB_ERROR_NO_DEVICE,
    LIBUSB_ERROR_TIMEOUT,
    FakeHidDevice,
    FakeUsbBackend,
)

from agent.errors import HidDeviceError
from agent.hid.host import UsbHostTransport
from agent.hid.protocol import REPORT_SIZE, Encoder, Kind, Reassembler, encode_text
from agent.hid.writer import Outcome
from agent.hid_config import HidConfig
from agent.reporting.hid import HidSink

VID, PID = 0x1D6B, 0x0104
FAR = 1e12  # a deadline that never passes: transfers here never wait


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def backend() -> FakeUsbBackend:
    return FakeUsbBackend()


def reports(n: int = 1) -> list[bytes]:
    text = "x" * (50 * n - 1 - len("t"))
    return Encoder().encode(Kind.TEXT, encode_text("t", text))


def test_double_matches_ibackend_signatures_contract() -> None:
    """Every method the double overrides has IBackend's exact parameter names."""
    for name, member in inspect.getmembers(usb.backend.IBackend, inspect.isfunction):
        if name.startswith("_") or name not in FakeUsbBackend.__dict__:
            continue
        want = list(inspect.signature(member).parameters)
        have = list(inspect.signature(getattr(FakeUsbBackend, name)).parameters)
        assert have == want, f"{name}: {have} != {want}"


def test_pyusb_finds_device_through_double_contract(backend: FakeUsbBackend) -> None:
    dev = FakeHidDevice(VID, PID)
    backend.plug(FakeHidDevice(0x1234, 0x5678))
    backend.plug(dev)
    found = usb.core.find(idVendor=VID, idProduct=PID, backend=backend)
    assert found is not None
    assert (found.idVendor, found.idProduct) == (VID, PID)
    intf = found.get_active_configuration()[(0, 0)]
    assert intf.bInterfaceClass == 3
    assert [e.bEndpointAddress for e in intf] == [0x81, 0x01]
    assert usb.core.find(idVendor=0xDEAD, idProduct=PID, backend=backend) is None


def test_find_detach_claim_and_interrupt_out_contract(backend: FakeUsbBackend) -> None:
    dev = FakeHidDevice(VID, PID)
    backend.plug(dev)
    t = UsbHostTransport(VID, PID, backend=backend)
    assert t.mode == "interrupt"
    assert dev.calls[:3] == ["open", "detach 0", "claim 0"]
    sent = reports(3)
    assert all(t.write(r, FAR) is Outcome.OK for r in sent)
    assert [(k, ep) for k, ep, _ in dev.received] == [("interrupt", 0x01)] * 3
    assert Reassembler().feed_all(d for _, _, d in dev.received)[0].kind == Kind.TEXT
    t.close()
    assert dev.calls[-3:] == ["release 0", "attach 0", "close"]
    assert dev.kernel_driver


def test_set_report_when_no_interrupt_out_contract(backend: FakeUsbBackend) -> None:
    dev = FakeHidDevice(VID, PID, interrupt_out=False)
    backend.plug(dev)
    t = UsbHostTransport(VID, PID, backend=backend)
    assert t.mode == "set_report"
    report = reports()[0]
    assert t.write(report, FAR) is Outcome.OK
    kind, setup, data = dev.received[0]
    assert kind == "control"
    assert setup == (0x21, 0x09, 0x0200, 0)  # class OUT to interface, SET_REPORT, Output id 0
    assert data == report
    t.close()


def test_set_report_forced_and_report_id_prefix_contract(backend: FakeUsbBackend) -> None:
    dev = FakeHidDevice(VID, PID, interface=1)
    backend.plug(dev)
    t = UsbHostTransport(VID, PID, interface=1, transfer="set_report", report_id=5, backend=backend)
    report = reports()[0]
    assert t.write(report, FAR) is Outcome.OK
    _, setup, data = dev.received[0]
    assert setup == (0x21, 0x09, 0x0205, 1)
    assert data == bytes([5]) + report
    t.close()


def test_interrupt_required_but_missing_contract(backend: FakeUsbBackend) -> None:
    backend.plug(FakeHidDevice(VID, PID, interrupt_out=False))
    with pytest.raises(HidDeviceError, match="no interrupt OUT endpoint"):
        UsbHostTransport(VID, PID, transfer="interrupt", backend=backend)


def test_kernel_driver_kept_means_clear_error_contract(backend: FakeUsbBackend) -> None:
    backend.plug(FakeHidDevice(VID, PID))
    with pytest.raises(HidDeviceError, match="detach_kernel_driver = true"):
        UsbHostTransport(VID, PID, detach_kernel_driver=False, backend=backend)


def test_wrong_interface_and_absent_device_contract(backend: FakeUsbBackend) -> None:
    with pytest.raises(HidDeviceError, match="1d6b:0104 not found"):
        UsbHostTransport(VID, PID, backend=backend)
    backend.plug(FakeHidDevice(VID, PID))
    with pytest.raises(HidDeviceError, match="no interface 3"):
        UsbHostTransport(VID, PID, interface=3, backend=backend)


def test_serial_picks_one_of_two_contract(backend: FakeUsbBackend) -> None:
    a, b = FakeHidDevice(VID, PID, serial="A1"), FakeHidDevice(VID, PID, serial="B2")
    backend.plug(a)
    backend.plug(b)
    t = UsbHostTransport(VID, PID, serial="B2", backend=backend)
    assert t.write(reports()[0], FAR) is Outcome.OK
    assert (len(a.received), len(b.received)) == (0, 1)
    t.close()


@pytest.mark.parametrize("code", [LIBUSB_ERROR_NO_DEVICE, LIBUSB_ERROR_IO])
def test_unplug_then_replug_reconnects_contract(backend: FakeUsbBackend, code: int) -> None:
    """Unplug mid-stream (ENODEV or EIO from the transfer), reports dropped as no_host while the
    device is away, looked for again at most every reconnect interval, then back on replug."""
    clock = Clock()
    dev = FakeHidDevice(VID, PID)
    backend.plug(dev)
    t = UsbHostTransport(VID, PID, reconnect_interval_s=1.0, backend=backend, clock=clock)
    sent = reports(4)
    assert t.write(sent[0], FAR) is Outcome.OK
    dev.fail_next = code  # the cable comes out during this transfer
    assert t.write(sent[1], FAR) is Outcome.NO_HOST
    assert t.status()["state"] == "disconnected"
    assert t.status()["disconnects"] == 1
    opened = backend.opened
    assert t.write(sent[2], FAR) is Outcome.NO_HOST  # looks once right away: not there
    assert backend.opened == opened
    for _ in range(5):  # within the interval: no new search at all
        assert t.write(sent[2], FAR) is Outcome.NO_HOST
    backend.plug(dev)  # replugged: new address, usbhid bound again
    assert t.write(sent[2], FAR) is Outcome.NO_HOST  # interval not over yet
    clock.t += 1.0
    assert t.write(sent[3], FAR) is Outcome.OK
    st = t.status()
    assert st["connects"] == 2
    assert st["state"] == "connected"
    assert dev.calls.count("detach 0") == 2
    assert [d for _, _, d in dev.received] == [sent[0], sent[3]]
    t.close()


def test_timeout_is_reported_not_fatal_contract(backend: FakeUsbBackend) -> None:
    dev = FakeHidDevice(VID, PID)
    backend.plug(dev)
    t = UsbHostTransport(VID, PID, backend=backend)
    dev.fail_next = LIBUSB_ERROR_TIMEOUT
    assert t.write(reports()[0], FAR) is Outcome.TIMEOUT
    assert t.write(reports()[0], FAR) is Outcome.OK
    assert t.status()["timeouts"] == 1
    t.close()


def test_wait_for_device_starts_without_it_contract(backend: FakeUsbBackend) -> None:
    clock = Clock()
    t = UsbHostTransport(VID, PID, wait_for_device=True, backend=backend, clock=clock)
    assert t.write(reports()[0], FAR) is Outcome.NO_HOST
    dev = FakeHidDevice(VID, PID)
    backend.plug(dev)
    clock.t += 1.0
    assert t.write(reports()[0], FAR) is Outcome.OK
    t.close()


def test_sink_in_host_mode_survives_replug_contract(backend: FakeUsbBackend) -> None:
    """The whole reporter in host mode: results reach the device, an unplug loses only the
    reports sent while it was away (a seq gap the reader sees), publish never raises."""
    dev = FakeHidDevice(VID, PID)
    backend.plug(dev)
    cfg = HidConfig.model_validate(
        {
            "mode": "host",
            "host": {"vendor_id": VID, "product_id": PID, "reconnect_interval_s": 0.001},
            "json_topics": ["events/#"],
        }
    )
    sink = HidSink(cfg, usb_backend=backend)
    try:
        sink.publish("events/a", {"n": 1})
        assert sink.flush(5)
        backend.unplug(dev)
        sink.publish("events/a", {"n": 2})
        assert sink.flush(5)
        backend.plug(dev)
        for n in range(3, 50):  # until the reconnect happens (interval 1 ms)
            sink.publish("events/a", {"n": n})
            assert sink.flush(5)
            if sink.status()["vendor"]["transport"]["connects"] == 2:
                break
        status = sink.status()
    finally:
        sink.close()
    assert status["vendor"]["transport"]["connects"] == 2
    assert status["vendor"]["dropped"]["no_host"] >= 1
    reasm = Reassembler()
    got = reasm.feed_all(d for _, _, d in dev.received)
    assert all(len(d) == REPORT_SIZE for _, _, d in dev.received)
    numbers = [int(m.payload.decode().split('"n":')[1].rstrip("}")) for m in got]
    assert numbers[0] == 1
    assert 2 not in numbers
    assert numbers[-1] == n
    assert reasm.stats.lost >= 1  # the reader sees the reports lost during the unplug
