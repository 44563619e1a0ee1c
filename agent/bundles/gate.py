"""The health gate: a version on trial commits only after it proved itself.

The agent of a pending slot (``EDGE_AGENT_SLOT`` set, that slot pending in state.json) starts a
``HealthGate`` after READY. Its thread repeats the self-test until it passes or the health time
is up (``bundles.health_timeout_s`` counted from the version's first boot, so a reboot does not
start the clock again):

1. every configured pipeline is running (a failed one fails the gate at once) and each has a
   worker whose heartbeat is recent (``self_test`` returns the problems; [] = healthy);
2. then ``files/hooks/post-install`` (if the bundle has one) exits 0 within
   ``bundles.hook_timeout_s``.

Pass -> ``boot.commit`` (committed = slot, previous = the old committed, pending = null).
Fail -> ``boot.mark_failed`` (pending.failed = reason) and ``on_failed(reason)``: the agent
exits 75, systemd restarts it, and the launcher rolls back to the previous slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.bundle_config import BundlesConfig
from agent.bundles.boot import commit, mark_failed
from agent.bundles.install import run_hook
from agent.bundles.slots import SlotName, SlotStore
from agent.errors import AgentError, BundleError, reason_code

__all__ = ["GateResult", "HealthGate"]

_log = logging.getLogger(__name__)

_POLL_S = 0.5


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str | None


class HealthGate:
    """Decides whether the version on trial in ``slot`` commits (see the module docstring)."""

    def __init__(
        self,
        store: SlotStore,
        slot: SlotName,
        version: str,
        config: BundlesConfig,
        *,
        self_test: Callable[[], tuple[list[str], bool]],
        # self_test() -> (problems, fatal): [] when healthy; fatal: waiting cannot help
        on_committed: Callable[[], None],
        on_failed: Callable[[str], None],
        first_boot_at: float | None,
    ) -> None:
        self.store = store
        self.slot = slot
        self.version = version
        self.config = config
        self._self_test = self_test
        self._on_committed = on_committed
        self._on_failed = on_failed
        started = time.time() if first_boot_at is None else first_boot_at
        self._deadline_wall = started + config.health_timeout_s
        self._thread: threading.Thread | None = None
        self.result: GateResult | None = None

    def start(self, stop_event: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(stop_event,), name="bundle-gate", daemon=True
        )
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the gate thread; False if it is still running."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self, stop_event: threading.Event) -> None:
        try:
            result = self.check(stop_event)
        except Exception as exc:  # noqa: BLE001 - a gate bug must not leave the trial open
            _log.exception("health gate of version %s crashed", self.version)
            result = GateResult(
                passed=False, reason=f"health gate error: {type(exc).__name__}: {exc}"
            )
        if result is None:  # the agent is stopping: the next boot decides
            return
        self.result = result
        if result.passed:
            self._on_committed()
        else:
            self._on_failed(result.reason or "health gate failed")

    def check(self, stop_event: threading.Event) -> GateResult | None:
        """Run the gate; None when ``stop_event`` ends it first (nothing recorded)."""
        problems: list[str] = ["self-test not run yet"]
        while not stop_event.is_set():
            problems, fatal = self._self_test()
            if not problems:
                break
            if fatal:
                return self._fail(f"self-test failed: {'; '.join(problems)}")
            if time.time() >= self._deadline_wall:
                return self._fail(
                    f"self-test not passed within bundles.health_timeout_s "
                    f"({self.config.health_timeout_s:g} s): {'; '.join(problems)}"
                )
            stop_event.wait(_POLL_S)
        if stop_event.is_set():
            return None
        hook = self.store.files_dir(self.slot) / "hooks" / "post-install"
        if hook.is_file():
            remaining = max(1.0, self._deadline_wall - time.time())
            try:
                run_hook(
                    hook,
                    self.store.slot_dir(self.slot),
                    self.version,
                    min(self.config.hook_timeout_s, remaining),
                )
            except BundleError as exc:
                return self._fail(f"post-install check failed: {exc}")
        try:
            commit(self.store, self.slot, self.version)
        except AgentError as exc:
            _log.error("version %s: commit failed [%s]: %s", self.version, reason_code(exc), exc)
            return GateResult(passed=False, reason=f"commit failed: {exc}")
        return GateResult(passed=True, reason=None)

    def _fail(self, reason: str) -> GateResult:
        _log.error("version %s failed its health gate: %s", self.version, reason)
        try:
            mark_failed(self.store, self.slot, reason)
        except AgentError as exc:
            _log.error("could not record the failure of version %s: %s", self.version, exc)
        return GateResult(passed=False, reason=reason)
