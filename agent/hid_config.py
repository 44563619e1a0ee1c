"""``[reporting.hid]``: results over USB HID, as a gadget (``/dev/hidgN``) or a host (pyusb).

Example (agent.toml)::

    [reporting.hid]
    mode = "gadget"                       # the board is a USB HID device on its OTG port
    [reporting.hid.gadget]
    device = "/dev/hidg0"                 # made by deploy/usb-gadget/edge-agent-gadget.sh
    [reporting.hid.keyboard]              # optional keyboard wedge on the second function
    device = "/dev/hidg1"
    layout = "de"
    template = "{label} {count}\\n"

    # or, the board is the USB host of a HID device that takes 64-byte output reports:
    # mode = "host"
    # [reporting.hid.host]
    # vendor_id = 0x1d6b
    # product_id = 0x0104
    # interface = 0

Topic filters use MQTT syntax on the relative topic: ``+`` matches one level, a final ``#``
any number of levels (``vision/+/detections``, ``llm/#``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from agent.hid.filters import check_filter
from agent.hid.keyboard import check_template
from agent.hid.protocol import MAX_MESSAGE_BYTES
from engines.configbase import StrictModel

__all__ = [
    "HidConfig",
    "HidGadgetConfig",
    "HidHostConfig",
    "HidKeyboardConfig",
]


TopicFilter = Annotated[str, AfterValidator(check_filter)]
"""An MQTT-style filter on relative topics: ``+`` one level, final ``#`` any levels."""


def _check_template(template: str) -> str:
    check_template(template)
    return template


class HidGadgetConfig(StrictModel):
    device: Path = Field(
        default=Path("/dev/hidg0"),
        description="The vendor HID function's device node (64-byte reports), made by "
        "deploy/usb-gadget/edge-agent-gadget.sh.",
    )
    wait_for_device: bool = Field(
        default=False,
        description="Start even when the device node does not exist yet (reports are dropped "
        "and counted until it appears); false: a missing node fails the start.",
    )


class HidHostConfig(StrictModel):
    vendor_id: int = Field(ge=0, le=0xFFFF, description="USB vendor ID of the target device.")
    product_id: int = Field(ge=0, le=0xFFFF, description="USB product ID of the target device.")
    serial: str | None = Field(
        default=None, description="Serial number to pick one of several identical devices."
    )
    interface: int = Field(
        default=0, ge=0, le=255, description="bInterfaceNumber of the HID interface to write to."
    )
    transfer: Literal["auto", "interrupt", "set_report"] = Field(
        default="auto",
        description="How output reports go out: the interrupt OUT endpoint, a SET_REPORT "
        "control transfer, or auto (interrupt OUT when the interface has one, else SET_REPORT).",
    )
    report_id: int = Field(
        default=0,
        ge=0,
        le=255,
        description="Report ID the device's descriptor gives the output report; 0 = none "
        "(edge-agent's own descriptor uses none).",
    )
    detach_kernel_driver: bool = Field(
        default=True,
        description="Detach the kernel's HID driver from the interface when it is bound (and "
        "re-attach it on close); false: fail instead.",
    )
    reconnect_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="After an unplug (or while the device is absent) look for it again at most "
        "this often; reports meanwhile are dropped and counted.",
    )
    wait_for_device: bool = Field(
        default=False,
        description="Start even when the device is not plugged in (reports are dropped and "
        "counted until it appears); false: an absent device fails the start.",
    )


class HidKeyboardConfig(StrictModel):
    # The template's whitespace is what gets typed (a trailing "\n" is the Enter key).
    model_config = ConfigDict(str_strip_whitespace=False)

    device: Path = Field(
        default=Path("/dev/hidg1"),
        description="The keyboard function's device node (8-byte boot keyboard reports).",
    )
    layout: Literal["us", "de"] = Field(
        default="us",
        description="Keyboard layout the host is set to: characters are mapped to the keys "
        "that produce them there.",
    )
    template: Annotated[str, AfterValidator(_check_template)] = Field(
        default="{label} {count}\n",
        description="Text typed per message. Fields: {topic} {pipeline} {source} {frame_index} "
        "{total} {text}; with any of {label} {class_id} {count} it is typed once per class.",
    )
    topics: list[TopicFilter] = Field(
        default_factory=lambda: ["vision/+/detections"],
        description="Topics whose messages are typed (MQTT filter syntax).",
    )
    chars_per_s: float = Field(
        default=40.0,
        gt=0,
        description="Rate limit: characters typed per second on average; a message that does "
        "not fit the budget is dropped whole and counted.",
    )
    burst_chars: int = Field(
        default=200,
        ge=1,
        description="Rate limit: most characters typed at once; longer messages are dropped.",
    )
    wait_for_device: bool = Field(
        default=False,
        description="Start even when the keyboard node does not exist yet (text is dropped "
        "and counted until it appears).",
    )


class HidConfig(StrictModel):
    mode: Literal["gadget", "host"] = Field(
        default="gadget",
        description="gadget: this board is a USB HID device (writes /dev/hidgN); host: it "
        "writes output reports to an attached HID device through pyusb.",
    )
    gadget: HidGadgetConfig = Field(
        default_factory=HidGadgetConfig, description="Gadget-mode device (mode = gadget)."
    )
    host: HidHostConfig | None = Field(
        default=None, description="Target device (required with mode = host)."
    )
    detection_topics: list[TopicFilter] = Field(
        default_factory=lambda: ["vision/+/detections"],
        description="Topics sent as one-report detection summaries (class counts, top boxes).",
    )
    text_topics: list[TopicFilter] = Field(
        default_factory=lambda: ["llm/+/result"],
        description="Topics whose `text_field` is sent as text, split across reports.",
    )
    text_field: str = Field(
        default="text", min_length=1, description="Message field holding the text to send."
    )
    json_topics: list[TopicFilter] = Field(
        default_factory=list,
        description="Topics sent whole as compact JSON, split across reports.",
    )
    max_message_bytes: int = Field(
        default=4096,
        ge=1,
        le=MAX_MESSAGE_BYTES,
        description="Longest text/JSON payload sent; longer ones are dropped and counted "
        f"(the protocol's limit is {MAX_MESSAGE_BYTES}).",
    )
    report_timeout_ms: float = Field(
        default=50.0,
        gt=0,
        description="Deadline for the host to take one report; past it the report (and the "
        "rest of its message) is dropped and counted.",
    )
    max_age_ms: float = Field(
        default=2000.0,
        gt=0,
        description="Queued messages older than this are dropped (counted) instead of sent.",
    )
    queue_reports: int = Field(
        default=512,
        ge=1,
        le=65536,
        description="Reports that may wait for the host; a message that does not fit is "
        "dropped whole and counted (publish never blocks).",
    )
    announce_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often each stream's announce report (topic, class labels) is repeated "
        "for readers that started late.",
    )
    keyboard: HidKeyboardConfig | None = Field(
        default=None,
        description="Keyboard wedge (gadget mode): types a template as keystrokes; unset: off.",
    )

    @model_validator(mode="after")
    def _host_with_mode(self) -> HidConfig:
        if self.mode == "host" and self.host is None:
            raise ValueError("mode = 'host' needs a [reporting.hid.host] section (vendor_id, …)")
        if self.mode == "host" and self.keyboard is not None:
            raise ValueError("the keyboard wedge needs mode = 'gadget' (it types as a device)")
        return self
