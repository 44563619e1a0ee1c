"""The agent's configuration: one TOML file validated by pydantic models.

Every section forbids unknown keys and every field has a description (``edge-agent config
schema`` prints the JSON Schema). Secrets are never inline: they are read from systemd
credentials (``$CREDENTIALS_DIRECTORY``) or from files named here.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictInt

from agent.bundle_config import BundlesConfig
from agent.hid_config import HidConfig
from agent.mqtt_config import MqttConfig
from engines.affinity import MAX_CPU, parse_cpulist
from engines.configbase import StrictModel
from engines.store_config import ModelStoreConfig
from pipelines.config import PipelineConfig

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "CpuSpec",
    "PinningConfig",
    "ReportingConfig",
    "WatchdogConfig",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")


def _check_cpu_spec(spec: str | list[int]) -> str | list[int]:
    """Syntax only (the allowed-set check needs the machine: ``agent.pinning.plan_pinning``)."""
    if isinstance(spec, str):
        if spec == "auto":
            return spec
        if not parse_cpulist(spec):
            msg = 'empty CPU set: write "auto", a list such as "0-3,6", or [0, 1]'
            raise ValueError(msg)
        return spec
    if not spec:
        msg = 'empty CPU list: write "auto", a list such as "0-3,6", or [0, 1]'
        raise ValueError(msg)
    bad = sorted({cpu for cpu in spec if cpu < 0 or cpu > MAX_CPU})
    if bad:
        msg = f"CPU numbers {bad} out of range 0-{MAX_CPU}"
        raise ValueError(msg)
    return spec


CpuSpec = Annotated[str | list[StrictInt], AfterValidator(_check_cpu_spec)]
"""A CPU set: "auto", a list/range string such as "0-3,6", or a list of CPU numbers."""


class StagePinning(StrictModel):
    capture: CpuSpec | None = Field(default=None, description="CPUs of capture threads.")
    preprocess: CpuSpec | None = Field(default=None, description="CPUs of preprocessing threads.")
    inference: CpuSpec | None = Field(
        default=None, description="CPUs of inference threads (ONNX Runtime threads follow it)."
    )
    postprocess: CpuSpec | None = Field(default=None, description="CPUs of decoder/NMS threads.")
    llm: CpuSpec | None = Field(default=None, description="CPUs of llama.cpp threads.")
    reporting: CpuSpec | None = Field(default=None, description="CPUs of reporter threads.")


class PinningConfig(StrictModel):
    process: CpuSpec = Field(
        default="auto",
        description='CPU set of the whole process: "auto" (the allowed set), "0-3,6" or [0, 1].',
    )
    stages: StagePinning = Field(
        default_factory=StagePinning,
        description="CPU set per pipeline stage; unset stages inherit the process set.",
    )
    numa_policy: Literal["none", "bind", "preferred", "interleave"] = Field(
        default="none", description="Memory policy applied through libnuma."
    )
    numa_nodes: list[int] = Field(
        default_factory=list,
        description="NUMA nodes for the memory policy; empty = the nodes that own the process "
        "CPUs ('preferred' takes exactly one node).",
    )
    nice: int | None = Field(
        default=None,
        ge=-20,
        le=19,
        description="Nice value of every agent thread; unset = keep the inherited one "
        "(e.g. systemd Nice=).",
    )
    sched_fifo_priority: int = Field(
        default=0, ge=0, le=99, description="SCHED_FIFO priority of the process; 0 = off."
    )
    mlockall: bool = Field(default=False, description="Lock all current and future pages in RAM.")


class WatchdogConfig(StrictModel):
    default_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="A critical worker that has not beaten for this long stops the systemd "
        "watchdog pings (when the worker declares no interval of its own).",
    )
    test_freeze_file: Path | None = Field(
        default=None,
        description="TEST ONLY: while this file exists the agent's heartbeat worker freezes, to "
        "prove that a frozen worker leads to a watchdog restart.",
    )


class JsonlReporterConfig(StrictModel):
    enabled: bool = Field(default=True, description="Write JSON Lines; false turns it off.")
    path: str = Field(
        default="-", description='File to append JSON Lines to; "-" writes to standard output.'
    )


class ReportingConfig(StrictModel):
    jsonl: JsonlReporterConfig | None = Field(
        default_factory=JsonlReporterConfig,
        description="JSON Lines reporter (stdout or file); `enabled = false` turns it off.",
    )
    mqtt: MqttConfig | None = Field(
        default=None,
        description="MQTT reporter with durable outbox and remote commands; unset: no MQTT.",
    )
    hid: HidConfig | None = Field(
        default=None,
        description="USB HID reporter: gadget mode (/dev/hidgN) or host mode (pyusb), with an "
        "optional keyboard wedge; unset: no HID.",
    )


class AgentConfig(StrictModel):
    device_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Device identity used in topics and reports; default: the host name.",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/edge-agent"),
        description="Writable state (model store, outbox, slots); $STATE_DIRECTORY overrides "
        "the default under systemd.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level."
    )
    stop_timeout_s: float = Field(
        default=10.0, gt=0, description="Time each stop step may take before it is abandoned."
    )
    load_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Time granted to each long start step (building a pipeline: model fetch, "
        "engine load or plan build); sent to systemd as EXTEND_TIMEOUT_USEC before the step.",
    )
    pinning: PinningConfig = Field(
        default_factory=PinningConfig, description="CPU, NUMA and scheduling settings."
    )
    watchdog: WatchdogConfig = Field(
        default_factory=WatchdogConfig, description="Worker liveness and systemd watchdog."
    )
    models: ModelStoreConfig = Field(
        default_factory=ModelStoreConfig, description="Model store and search path."
    )
    reporting: ReportingConfig = Field(
        default_factory=ReportingConfig, description="Where results and status go."
    )
    pipelines: list[PipelineConfig] = Field(
        default_factory=list, description="Pipelines to run, each selected by its `type`."
    )
    bundles: BundlesConfig = Field(
        default_factory=BundlesConfig,
        description="Firmware bundles: trusted signing keys, A/B slots and the health gate.",
    )
