"""``python -m agent ...`` as a real child process for the tests: stdout and stderr read line
by line by threads (a chatty agent never blocks on a full pipe), and an environment without
the systemd variables of whoever runs the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from wait_support import wait_for

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY")


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without the systemd variables, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class AgentProcess:
    """``python -m agent ...`` with stdout/stderr collected line by line by threads."""

    def __init__(self, args: list[str], env: Mapping[str, str], **popen: Any) -> None:
        self.proc = subprocess.Popen(
            [*popen.pop("prefix", []), sys.executable, "-m", "agent", *args],
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, into: list[str]) -> None:
        into.extend(line.rstrip("\n") for line in stream)

    def wait_stderr(self, text: str, timeout_s: float = 60) -> None:
        wait_for(lambda: any(text in line for line in self.stderr), f"stderr {text!r}", timeout_s)

    def wait_stderr_match(self, pattern: str, timeout_s: float = 90) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails at once if the process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            exited = self.proc.poll() is not None
            if exited:  # read to the end of the pipe before the last look
                for t in self._threads:
                    t.join(10)
            for line in list(self.stderr):
                found = re.search(pattern, line)
                if found:
                    return found
            if exited or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        pytest.fail(f"no stderr line matching {pattern!r}: {self.stderr[-5:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        code = self.proc.wait(timeout_s)
        for t in self._threads:
            t.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
