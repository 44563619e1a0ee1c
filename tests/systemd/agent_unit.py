"""The agent's unit inside the test container: the test config, the CI drop-in, and a handle
that reads systemd's view of the unit and the journal since the test began."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from nspawn_harness import AGENT_UNIT, Container, HarnessError, wait_until

__all__ = [
    "CI_DROPIN",
    "CONFIG",
    "CONFIG_PATH",
    "FREEZE_FILE",
    "REPORTS_FILE",
    "RESTART_SEC",
    "START_LIMIT_BURST",
    "UNIT_PROPS",
    "WATCHDOG_SEC",
    "WORKER_INTERVAL_S",
    "AgentUnit",
]

CONFIG_PATH = "/etc/edge-agent/agent.toml"
FREEZE_FILE = "/run/edge-agent/freeze"
REPORTS_FILE = "/var/lib/edge-agent/reports.jsonl"
WORKER_INTERVAL_S = 2.0
WATCHDOG_SEC = 3.0
RESTART_SEC = 1.0
START_LIMIT_BURST = 5
CONFIG = f"""\
# edge-agent config of the real-systemd tests
device_id = "nspawn-ci"
pipelines = []

[watchdog]
default_interval_s = {WORKER_INTERVAL_S}
test_freeze_file = "{FREEZE_FILE}"

[reporting.jsonl]
path = "{REPORTS_FILE}"
"""
# Only what makes the scenarios quick; everything else is the shipped unit as it is.
CI_DROPIN = f"""\
[Service]
WatchdogSec={WATCHDOG_SEC:g}s
RestartSec={RESTART_SEC:g}s
"""
UNIT_PROPS = (
    "ActiveState",
    "SubState",
    "Result",
    "NRestarts",
    "ExecMainStatus",
    "ExecMainCode",
    "ExecMainExitTimestampMonotonic",
    "MainPID",
    "StatusText",
)


@dataclass
class AgentUnit:
    """edge-agent.service inside the container, with the journal since the test began."""

    container: Container
    cursor: str

    def state(self) -> dict[str, str]:
        return self.container.show(AGENT_UNIT, *UNIT_PROPS)

    def start(self) -> float:
        """``systemctl start`` (returns once READY=1 arrived, Type=notify); its wall time."""
        started = time.monotonic()
        self.container.run(["systemctl", "start", AGENT_UNIT], timeout=120)
        return time.monotonic() - started

    def stop(self) -> None:
        self.container.run(["systemctl", "stop", AGENT_UNIT], timeout=120)

    def wait(
        self, done: Callable[[dict[str, str]], bool], *, timeout: float
    ) -> tuple[dict[str, str], float]:
        try:
            return wait_until(self.state, done, timeout=timeout)
        except HarnessError as exc:
            raise AssertionError(f"{exc}\njournal:\n{self.journal_text()}") from exc

    def journal(self) -> list[dict[str, str]]:
        return self.container.journal(AGENT_UNIT, self.cursor)

    def messages(self, identifier: str | None = None) -> list[str]:
        return [
            e["MESSAGE"]
            for e in self.journal()
            if identifier is None or e.get("SYSLOG_IDENTIFIER") == identifier
        ]

    def journal_text(self) -> str:
        return "\n".join(self.messages())

    def reports(self) -> list[dict[str, object]]:
        """The JSON Lines the agent wrote to its state directory."""
        text = self.container.run(["cat", REPORTS_FILE], check=False).stdout
        return [json.loads(line) for line in text.splitlines() if line.strip()]
