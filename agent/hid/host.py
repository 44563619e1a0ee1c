"""Host mode: this board is the USB host and sends output reports to a HID device (pyusb).

The device is found by vendor/product ID (and serial number, when several are plugged in);
its HID interface is claimed, after detaching the kernel's driver (usbhid) when one is bound —
re-attached on close. Reports go out on the interface's interrupt OUT endpoint, or, when it has
none (the HID spec lets output reports use the control pipe) or ``transfer = "set_report"``,
as a class SET_REPORT control request::

    bmRequestType 0x21 (host to device, class, interface)   bRequest 0x09 (SET_REPORT)
    wValue (0x02 << 8) | report_id  (report type Output)     wIndex interface number

Unplug: a transfer failing with ``ENODEV``/``EIO``/``ENOENT``/``EPIPE``-on-a-gone-device
(pyusb's ``USBError`` carries the errno libusb mapped) releases the device; every later report
is ``Outcome.NO_HOST`` (dropped, counted) while the device is looked for again at most every
``reconnect_interval_s``. When it is back, it is claimed again and reports flow: the agent
survives unplug/replug without a restart.

``backend`` is handed to ``usb.core.find`` (``None``: pyusb picks libusb1/openusb/libusb0).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import usb.core
import usb.util

from agent.errors import HidDeviceError
from agent.hid.writer import Outcome

__all__ = ["SET_REPORT", "UsbHostTransport"]

_log = logging.getLogger(__name__)

SET_REPORT = 0x09
REPORT_TYPE_OUTPUT = 0x02
HID_CLASS = 0x03
REQUEST_TYPE_OUT_CLASS_INTERFACE = 0x21  # usb.util.build_request_type(OUT, CLASS, INTERFACE)

_GONE = {errno.ENODEV, errno.EIO, errno.ENOENT, errno.ESHUTDOWN, errno.EPIPE}


class UsbHostTransport:
    """``ReportTransport`` sending reports to a USB HID device's interface through pyusb."""

    def __init__(
        self,
        vendor_id: int,
        product_id: int,
        *,
        interface: int = 0,
        serial: str | None = None,
        transfer: Literal["auto", "interrupt", "set_report"] = "auto",
        report_id: int = 0,
        detach_kernel_driver: bool = True,
        reconnect_interval_s: float = 1.0,
        wait_for_device: bool = False,
        backend: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vendor_id = vendor_id
        self.product_id = product_id
        self.interface = interface
        self.serial = serial
        self.transfer = transfer
        self.report_id = report_id
        self._detach = detach_kernel_driver
        self._interval = reconnect_interval_s
        self._backend = backend
        self._clock = clock
        self._lock = threading.Lock()
        self._dev: Any = None
        self._ep_out: int | None = None
        self._detached = False
        self._next_try = 0.0
        self.mode: str | None = None
        self.state = "disconnected"
        self.last_error: str | None = None
        self.counters = {"connects": 0, "disconnects": 0, "no_host": 0, "timeouts": 0}
        try:
            self._connect()
        except HidDeviceError as exc:
            if not wait_for_device:
                raise
            self._next_try = self._clock() + self._interval
            self.last_error = str(exc)
            _log.warning("%s; reports are dropped until it is plugged in", exc)

    @property
    def target(self) -> str:
        return f"usb {self.vendor_id:04x}:{self.product_id:04x} interface {self.interface}"

    # -- connection --------------------------------------------------------------------------

    def _match(self, dev: Any) -> bool:
        if self.serial is None:
            return True
        try:
            return bool(usb.util.get_string(dev, dev.iSerialNumber) == self.serial)
        except (usb.core.USBError, ValueError) as exc:
            _log.debug("serial number of %s unreadable: %s", dev, exc)
            return False

    def _connect(self) -> None:
        try:
            dev = usb.core.find(
                idVendor=self.vendor_id,
                idProduct=self.product_id,
                custom_match=self._match,
                backend=self._backend,
            )
        except usb.core.NoBackendError as exc:
            raise HidDeviceError(
                "no libusb found for reporting.hid host mode — install libusb-1.0-0"
            ) from exc
        if dev is None:
            serial = f" serial {self.serial!r}" if self.serial else ""
            raise HidDeviceError(
                f"USB device {self.vendor_id:04x}:{self.product_id:04x}{serial} not found — plug "
                "it in or fix reporting.hid.host vendor_id/product_id"
            )
        try:
            self._claim(dev)
        except usb.core.USBError as exc:
            usb.util.dispose_resources(dev)
            raise HidDeviceError(f"{self.target}: cannot claim the interface: {exc}") from exc
        except HidDeviceError:
            usb.util.dispose_resources(dev)
            raise
        self._dev = dev
        self.counters["connects"] += 1
        self.state = "connected"
        _log.info("HID host: %s connected (%s)", self.target, self.mode)

    def _claim(self, dev: Any) -> None:
        try:
            cfg = dev.get_active_configuration()
        except usb.core.USBError:
            dev.set_configuration()
            cfg = dev.get_active_configuration()
        intf = usb.util.find_descriptor(cfg, bInterfaceNumber=self.interface)
        if intf is None:
            raise HidDeviceError(
                f"{self.target}: the device has no interface {self.interface} — fix "
                "reporting.hid.host.interface"
            )
        if intf.bInterfaceClass != HID_CLASS:
            raise HidDeviceError(
                f"{self.target} is not a HID interface (class {intf.bInterfaceClass:#04x})"
            )
        self._detached = False
        try:
            active = bool(dev.is_kernel_driver_active(self.interface))
        except NotImplementedError:  # backends/OSes without the call
            active = False
        if active:
            if not self._detach:
                raise HidDeviceError(
                    f"{self.target} is bound to a kernel driver — set "
                    "reporting.hid.host.detach_kernel_driver = true"
                )
            dev.detach_kernel_driver(self.interface)
            self._detached = True
        usb.util.claim_interface(dev, self.interface)
        ep = usb.util.find_descriptor(
            intf,
            custom_match=lambda e: (
                usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_OUT
                and usb.util.endpoint_type(e.bmAttributes) == usb.util.ENDPOINT_TYPE_INTR
            ),
        )
        self._ep_out = None if ep is None else int(ep.bEndpointAddress)
        if self.transfer == "interrupt" and self._ep_out is None:
            raise HidDeviceError(
                f"{self.target} has no interrupt OUT endpoint — use transfer = 'set_report'"
            )
        use_interrupt = self.transfer != "set_report" and self._ep_out is not None
        self.mode = "interrupt" if use_interrupt else "set_report"

    def _release(self) -> None:
        dev, self._dev = self._dev, None
        if dev is None:
            return
        try:
            usb.util.release_interface(dev, self.interface)
            if self._detached:
                dev.attach_kernel_driver(self.interface)
        except usb.core.USBError as exc:  # gone already: nothing left to hand back
            _log.debug("%s: release after disconnect: %s", self.target, exc)
        finally:
            self._detached = False
            usb.util.dispose_resources(dev)

    # -- transport ---------------------------------------------------------------------------

    def write(self, report: bytes, deadline: float) -> Outcome:
        with self._lock:
            if self._dev is None:
                now = self._clock()
                if now < self._next_try:
                    self.counters["no_host"] += 1
                    return Outcome.NO_HOST
                try:
                    self._connect()
                except HidDeviceError as exc:
                    self._next_try = now + self._interval
                    self.last_error = str(exc)
                    self.counters["no_host"] += 1
                    return Outcome.NO_HOST
            return self._send(report, deadline)

    def _send(self, report: bytes, deadline: float) -> Outcome:
        data = bytes([self.report_id]) + report if self.report_id else report
        timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            if self.mode == "interrupt" and self._ep_out is not None:
                sent = self._dev.write(self._ep_out, data, timeout_ms)
            else:
                sent = self._dev.ctrl_transfer(
                    REQUEST_TYPE_OUT_CLASS_INTERFACE,
                    SET_REPORT,
                    (REPORT_TYPE_OUTPUT << 8) | self.report_id,
                    self.interface,
                    data,
                    timeout_ms,
                )
        except usb.core.USBTimeoutError:
            self.counters["timeouts"] += 1
            self.last_error = "the device did not take the report before its deadline"
            return Outcome.TIMEOUT
        except usb.core.USBError as exc:
            if exc.errno in _GONE:
                self.counters["disconnects"] += 1
                self.counters["no_host"] += 1
                self.last_error = f"device gone: {exc}"
                self.state = "disconnected"
                _log.warning("HID host: %s disconnected (%s); reconnecting", self.target, exc)
                self._release()
                self._next_try = self._clock()  # look again at the next report
                return Outcome.NO_HOST
            self.last_error = f"transfer failed: {exc}"
            _log.error("HID host: %s transfer failed: %s", self.target, exc)
            return Outcome.ERROR
        if sent != len(data):
            self.last_error = f"short transfer: {sent} of {len(data)} bytes"
            _log.error("HID host: %s %s", self.target, self.last_error)
            return Outcome.ERROR
        return Outcome.OK

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "device": self.target,
                "state": self.state,
                "mode": self.mode,
                "kernel_driver_detached": self._detached,
                **self.counters,
                "last_error": self.last_error,
            }

    def close(self) -> None:
        with self._lock:
            self._release()
            self.state = "closed"
