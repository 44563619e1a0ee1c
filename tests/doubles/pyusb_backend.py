"""A faithful double of a pyusb backend (``usb.backend.IBackend``) with USB HID devices on it.

No USB bus exists on CI, so host mode is tested by handing this backend to the real
``usb.core.find(backend=...)``: pyusb's own ``Device``/``Configuration``/``Interface``/
``Endpoint`` classes, ``usb.util.claim_interface``/``find_descriptor``/``dispose_resources``
and ``Device.write``/``ctrl_transfer`` drive it, exactly as they drive libusb1's backend.

It mirrors ``usb/backend/libusb1.py`` (pyusb 1.3) where behaviour matters:

- descriptors carry every field pyusb's ``_set_attr`` copies (device: ``bus``, ``address``,
  ``port_number``, ``port_numbers``, ``speed``; each: ``extra_descriptors``); an interface or
  alternate setting out of range raises ``IndexError`` (pyusb's ``Configuration.__iter__``
  relies on that to stop);
- errors are the real ``usb.core.USBError(strerror, error_code, errno)`` with libusb's codes and
  the errno pyusb maps them to: unplugged -> ``LIBUSB_ERROR_NO_DEVICE`` (-4, ``ENODEV``) or,
  mid-transfer on some host controllers, ``LIBUSB_ERROR_IO`` (-1, ``EIO``); claiming an
  interface a kernel driver holds -> ``LIBUSB_ERROR_BUSY`` (-6, ``EBUSY``); a transfer the
  device does not take in time -> ``usb.core.USBTimeoutError`` (-7, ``ETIMEDOUT``);
- a handle belongs to one attachment: after unplug and replug the old handle keeps failing with
  ``ENODEV`` (libusb: the device was re-enumerated, a new ``libusb_device``), so the code under
  test must find and open the device again;
- ``intr_write``/``ctrl_transfer`` get ``array.array`` data and return the byte count.

``FakeHidDevice`` is one device with a HID interface (class 3) and, optionally, an interrupt
OUT endpoint; ``received`` records ``(transfer, endpoint_or_setup, bytes)`` per transfer.
"""

from __future__ import annotations

import array
import errno
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import usb.backend
import usb.core

__all__ = ["FakeHidDevice", "FakeUsbBackend"]

LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_NOT_FOUND = -5

_STRERROR = {
    LIBUSB_ERROR_IO: "Input/output error",
    LIBUSB_ERROR_NO_DEVICE: "No such device (it may have been disconnected)",
    LIBUSB_ERROR_BUSY: "Resource busy",
    LIBUSB_ERROR_TIMEOUT: "Operation timed out",
    LIBUSB_ERROR_NOT_FOUND: "Entity not found",
}
_ERRNO = {
    LIBUSB_ERROR_IO: errno.EIO,
    LIBUSB_ERROR_NO_DEVICE: errno.ENODEV,
    LIBUSB_ERROR_BUSY: errno.EBUSY,
    LIBUSB_ERROR_TIMEOUT: errno.ETIMEDOUT,
    LIBUSB_ERROR_NOT_FOUND: errno.ENOENT,
}


def usb_error(code: int) -> usb.core.USBError:
    """The exception libusb1's ``_check`` raises for ``code``."""
    if code == LIBUSB_ERROR_TIMEOUT:
        return usb.core.USBTimeoutError(_STRERROR[code], code, _ERRNO[code])
    return usb.core.USBError(_STRERROR[code], code, _ERRNO[code])


@dataclass
class FakeHidDevice:
    """One USB HID device: configuration 1, HID interface ``interface`` (+ an IN endpoint)."""

    vendor_id: int
    product_id: int
    interface: int = 0
    interrupt_out: bool = True
    serial: str = "0001"
    kernel_driver: bool = True
    #: errno code the next transfer fails with (then cleared); e.g. LIBUSB_ERROR_TIMEOUT
    fail_next: int | None = None
    received: list[tuple[str, Any, bytes]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)
    configured: int = 1

    def device_descriptor(self, address: int) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0, bDeviceSubClass=0,
            bDeviceProtocol=0, bMaxPacketSize0=64, idVendor=self.vendor_id,
            idProduct=self.product_id, bcdDevice=0x0100, iManufacturer=1, iProduct=2,
            iSerialNumber=3, bNumConfigurations=1, address=address, bus=1, port_number=1,
            port_numbers=(1,), speed=3,
        )  # fmt: skip

    def config_descriptor(self) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=9, bDescriptorType=2, wTotalLength=41, bNumInterfaces=self.interface + 1,
            bConfigurationValue=1, iConfiguration=0, bmAttributes=0x80, bMaxPower=50,
            extra_descriptors=[],
        )  # fmt: skip

    def interface_descriptor(self, intf: int) -> SimpleNamespace:
        hid_class = intf == self.interface
        endpoints = [self.endpoint_descriptor(0x81)]
        if hid_class and self.interrupt_out:
            endpoints.append(self.endpoint_descriptor(0x01))
        # HID class descriptor (0x21): bcdHID 1.11, report descriptor (0x22) of 31 bytes
        hid_desc = [9, 0x21, 0x11, 0x01, 0, 1, 0x22, 31, 0]
        return SimpleNamespace(
            bLength=9, bDescriptorType=4, bInterfaceNumber=intf, bAlternateSetting=0,
            bNumEndpoints=len(endpoints), bInterfaceClass=3 if hid_class else 0xFF,
            bInterfaceSubClass=0, bInterfaceProtocol=0, iInterface=0,
            extra_descriptors=hid_desc if hid_class else [], endpoints=endpoints,
        )  # fmt: skip

    @staticmethod
    def endpoint_descriptor(address: int) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=7, bDescriptorType=5, bEndpointAddress=address, bmAttributes=0x03,
            wMaxPacketSize=64, bInterval=1, bRefresh=0, bSynchAddress=0, extra_descriptors=[],
        )  # fmt: skip


@dataclass
class _Attachment:
    device: FakeHidDevice
    address: int
    plugged: bool = True


@dataclass
class _Handle:
    attachment: _Attachment


class FakeUsbBackend(usb.backend.IBackend):  # type: ignore[misc]
    """``IBackend`` over a set of plugged ``FakeHidDevice``s (``plug``/``unplug``)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._attached: list[_Attachment] = []
        self._next_address = 1
        self.opened = 0
        self.closed = 0

    # -- test controls (not part of IBackend) ------------------------------------------------

    def plug(self, device: FakeHidDevice) -> None:
        """Attach (or re-attach) ``device``: a new address, kernel driver bound again."""
        with self._lock:
            device.kernel_driver = True
            device.claimed.clear()
            self._attached.append(_Attachment(device, self._next_address))
            self._next_address += 1

    def unplug(self, device: FakeHidDevice) -> None:
        with self._lock:
            for att in self._attached:
                if att.device is device and att.plugged:
                    att.plugged = False
            self._attached = [a for a in self._attached if a.plugged]

    # -- IBackend ----------------------------------------------------------------------------

    def _alive(self, att: _Attachment) -> None:
        if not att.plugged:
            raise usb_error(LIBUSB_ERROR_NO_DEVICE)

    def enumerate_devices(self) -> Any:
        with self._lock:
            return list(self._attached)

    def get_parent(self, dev: _Attachment) -> None:
        return None

    def get_device_descriptor(self, dev: _Attachment) -> SimpleNamespace:
        return dev.device.device_descriptor(dev.address)

    def get_configuration_descriptor(self, dev: _Attachment, config: int) -> SimpleNamespace:
        if config != 0:
            raise IndexError(f"Invalid configuration index {config}")
        return dev.device.config_descriptor()

    def get_interface_descriptor(
        self, dev: _Attachment, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        cfg = self.get_configuration_descriptor(dev, config)
        if intf >= cfg.bNumInterfaces:
            raise IndexError("Invalid interface index " + str(intf))
        if alt >= 1:
            raise IndexError("Invalid alternate setting index " + str(alt))
        return dev.device.interface_descriptor(intf)

    def get_endpoint_descriptor(
        self, dev: _Attachment, ep: int, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        i = self.get_interface_descriptor(dev, intf, alt, config)
        if ep >= i.bNumEndpoints:
            raise IndexError("Invalid endpoint index " + str(ep))
        return i.endpoints[ep]  # type: ignore[no-any-return]

    def open_device(self, dev: _Attachment) -> _Handle:
        self._alive(dev)
        self.opened += 1
        dev.device.calls.append("open")
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        self.closed += 1
        dev_handle.attachment.device.calls.append("close")

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        self._alive(dev_handle.attachment)
        dev_handle.attachment.device.configured = config_value

    def get_configuration(self, dev_handle: _Handle) -> int:
        self._alive(dev_handle.attachment)
        return dev_handle.attachment.device.configured

    def set_interface_altsetting(self, dev_handle: _Handle, intf: int, altsetting: int) -> None:
        self._alive(dev_handle.attachment)

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        att = dev_handle.attachment
        self._alive(att)
        if att.device.kernel_driver and intf == att.device.interface:
            raise usb_error(LIBUSB_ERROR_BUSY)
        att.device.claimed.add(intf)
        att.device.calls.append(f"claim {intf}")

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        att = dev_handle.attachment
        self._alive(att)
        att.device.claimed.discard(intf)
        att.device.calls.append(f"release {intf}")

    def _transfer_check(self, att: _Attachment, intf: int) -> None:
        self._alive(att)
        code, att.device.fail_next = att.device.fail_next, None
        if code is not None:
            if code in (LIBUSB_ERROR_IO, LIBUSB_ERROR_NO_DEVICE):
                self.unplug(att.device)
            raise usb_error(code)
        if intf not in att.device.claimed:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)

    def intr_write(
        self, dev_handle: _Handle, ep: int, intf: int, data: array.array[int], timeout: int
    ) -> int:
        att = dev_handle.attachment
        if not isinstance(data, array.array):
            raise TypeError("pyusb hands the backend an array.array")
        self._transfer_check(att, intf)
        if ep & 0x80 or not att.device.interrupt_out:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        att.device.received.append(("interrupt", ep, data.tobytes()))
        return len(data) * data.itemsize

    def ctrl_transfer(  # noqa: PLR0917 - IBackend's signature
        self,
        dev_handle: _Handle,
        bmRequestType: int,  # noqa: N803 - pyusb's parameter names
        bRequest: int,  # noqa: N803
        wValue: int,  # noqa: N803
        wIndex: int,  # noqa: N803
        data: array.array[int],
        timeout: int,
    ) -> int:
        att = dev_handle.attachment
        if bmRequestType == 0x80 and bRequest == 0x06:  # standard GET_DESCRIPTOR, to the device
            self._alive(att)
            return self._get_descriptor(att.device, wValue, data)
        self._transfer_check(att, wIndex & 0xFF)
        setup = (bmRequestType, bRequest, wValue, wIndex)
        att.device.received.append(("control", setup, data.tobytes()))
        return len(data) * data.itemsize

    @staticmethod
    def _get_descriptor(device: FakeHidDevice, w_value: int, data: array.array[int]) -> int:
        kind, index = w_value >> 8, w_value & 0xFF
        if kind != 0x03:  # only string descriptors are asked for this way
            raise usb_error(LIBUSB_ERROR_IO)
        if index == 0:
            raw = bytes([4, 3, 0x09, 0x04])  # LANGID en-US
        else:
            text = {1: "edge-agent", 2: "fake HID", 3: device.serial}.get(index, "")
            body = text.encode("utf-16-le")
            raw = bytes([2 + len(body), 3]) + body
        n = min(len(raw), len(data))
        data[:n] = array.array("B", raw[:n])
        return n

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        att = dev_handle.attachment
        self._alive(att)
        return att.device.kernel_driver and intf == att.device.interface

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        att = dev_handle.attachment
        self._alive(att)
        if not (att.device.kernel_driver and intf == att.device.interface):
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        att.device.kernel_driver = False
        att.device.calls.append(f"detach {intf}")

    def attach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        att = dev_handle.attachment
        self._alive(att)
        att.device.kernel_driver = True
        att.device.calls.append(f"attach {intf}")
