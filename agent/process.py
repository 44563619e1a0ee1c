"""The agent process: start in named steps, supervise, stop in reverse with timeouts.

``Agent(config).start()`` runs, in order (the config itself was loaded and validated by the
caller, see ``agent.configfile.load_config``):

1. **pinning** — plan the CPU sets against the allowed set and apply the process-wide part
   (affinity, NUMA memory policy, nice, SCHED_FIFO, mlockall);
2. **state dir** — create/check the writable state directory (``$STATE_DIRECTORY`` under
   systemd);
3. **reporting** — open the configured reporters (JSON Lines; MQTT with its command dispatcher);
4. **watchdog** — start the systemd watchdog pinger (when ``WATCHDOG_USEC`` asks for it);
5. **model store** — open the model store under the state directory;
6. **pipelines** — build and start each pipeline; one that fails is recorded with its reason
   code and the agent runs *degraded* while the others keep going;
7. **ready** — ``READY=1`` to systemd, state ``ready`` (or ``degraded``);
8. **health gate** — only for a bundle version on trial (``EDGE_AGENT_SLOT`` names a pending
   slot, see ``agent.bundles.gate``): a thread self-tests the pipelines and runs the bundle's
   post-install check, then commits the version, or records the failure and restarts (exit 75)
   so the launcher rolls back.

Each completed step leaves an undo action; ``stop()`` runs them in reverse, each bounded by
``stop_timeout_s`` (an overrun is logged and abandoned). A failed step undoes the steps before
it and raises. One ``threading.Event`` is the stop event for every thread of the agent.

``run()`` is the supervisor loop: it beats the watchdog as a critical worker, notices pipelines
that failed or finished, and returns when the stop event is set (SIGTERM/SIGINT, see
``agent.cli.run_cmd``) or a bound (duration, all pipelines finished) is reached.

Status (``Agent.status()``) is written atomically to ``<state_dir>/status.json`` and published
on the ``status`` topic at every state change.

Remote control (MQTT commands, registered in the reporting step before the MQTT runtime starts,
see ``agent.control``): ``start_pipeline`` / ``stop_pipeline`` / ``update_pipeline``,
``load_model`` / ``unload_model`` and ``request_restart``. One control lock serialises them (a
second one meanwhile answers ``busy``/``control_busy``); changes apply to the running agent and
its in-memory config (``config.get``), never to the config file: a restart returns to the file.
``request_restart`` stops the agent gracefully and makes ``run_agent`` exit with
``RESTART_EXIT_STATUS`` (75): a non-zero status, so systemd's ``Restart=on-failure`` starts the
agent again after ``RestartSec``. (A re-exec would keep the PID but would have to re-do the
``Type=notify`` start handshake inside a running unit; a clean exit does not.)

Local broker: with ``local_broker=True`` (``edge-agent run`` on the embedded defaults) and no
``reporting.mqtt``, the reporting step starts a private mosquitto on 127.0.0.1 when the binary
exists (``agent.reporting.local_broker``) and reports to it; it is stopped with the reporting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pydantic import ValidationError

from agent.commands.registry import CommandError, CommandRegistry
from agent.config import AgentConfig
from agent.errors import AgentError, ReportingError, StartupError, StateDirError, reason_code
from agent.health import Watchdog, watchdog_interval_s
from agent.notify import Notifier
from agent.reporting import FanoutSink, open_reporting
from engines.errors import EngineError
from engines.fetch import atomic_write_bytes
from engines.store import DATA_PATH_ENV, ModelStore
from pipelines.base import Pipeline, PipelineContext, ResolvedModel
from pipelines.config import PipelineConfig
from pipelines.errors import PipelineConfigError, PipelineError, SourceOpenError
from pipelines.feed import ResultTee

if TYPE_CHECKING:
    from agent.bundles.gate import HealthGate
    from agent.mqtt_config import MqttConfig
    from agent.pinning import PinningPlan
    from agent.reporting.local_broker import LocalBroker
    from agent.reporting.mqtt_runtime import MqttRuntime

__all__ = [
    "RESTART_EXIT_STATUS",
    "SUPERVISOR_WORKER",
    "Agent",
    "AgentState",
    "AgentStatus",
    "BundleStatus",
    "FailedModel",
    "PipelineEntry",
    "agent_version",
    "resolve_state_dir",
    "run_bounded",
    "stop_on_signals",
]

_log = logging.getLogger(__name__)

AgentState = Literal["starting", "ready", "degraded", "stopping", "stopped"]

SUPERVISOR_WORKER = "agent.supervisor"
"""Name of the agent's own critical worker in the watchdog registry."""

RESTART_EXIT_STATUS = 75
"""Exit status after an ``agent.restart`` command (EX_TEMPFAIL): non-zero, so the unit's
``Restart=on-failure`` starts the agent again."""

Progress = Callable[[float, str], None]
"""``progress(fraction, message)`` of a long command (``CommandContext.progress``)."""

_CONTROL_WAIT_S = 1.0
"""How long a control command waits for another one to finish before answering busy."""

_TERMINAL_PIPELINE_STATES = frozenset({"finished", "failed", "stopped"})
_STATUS_FILE = "status.json"


class PipelineEntry(TypedDict):
    name: str
    type: str
    model: str
    state: str
    reason: str | None
    error: str | None
    status: dict[str, Any]


class FailedModel(TypedDict):
    model: str
    pipeline: str
    reason: str
    error: str


class AgentStatus(TypedDict):
    state: AgentState
    boot_id: str
    version: str
    device_id: str
    pid: int
    started_at: float
    updated_at: float
    state_dir: str | None
    pinning: dict[str, Any] | None
    watchdog: dict[str, Any]
    pipelines: list[PipelineEntry]
    failed_models: list[FailedModel]
    reporters: dict[str, Any]
    bundle: BundleStatus


class BundleStatus(TypedDict):
    slot: str | None
    """The bundle slot this agent runs from (None: the factory install)."""
    version: str | None
    pending: bool
    """The version is on trial: its health gate has not committed it yet."""


def agent_version() -> str:
    """The installed package version (``0+unknown`` when running from an uninstalled tree)."""
    try:
        return metadata.version("edge-agent")
    except metadata.PackageNotFoundError:
        _log.debug("package metadata of edge-agent not found; version unknown")
        return "0+unknown"


def resolve_state_dir(config: AgentConfig, environ: Mapping[str, str]) -> Path:
    """The state directory: ``state_dir`` when set in the config, else systemd's
    ``$STATE_DIRECTORY`` (first entry), else the config default."""
    if "state_dir" not in config.model_fields_set:
        from_systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
        if from_systemd:
            return Path(from_systemd)
    return config.state_dir


@dataclass
class _PipelineSlot:
    config: PipelineConfig
    pipeline: Pipeline | None = None
    error: BaseException | None = None
    last_state: str = "starting"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Failed to build/start (``error``) or reported failed at run time."""
        return self.error is not None or self.last_state == "failed"


class Agent:
    """The running agent. Not reusable: one ``start()``/``stop()`` cycle per instance."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        environ: Mapping[str, str] | None = None,
        notifier: Notifier | None = None,
        local_broker: bool = False,
    ) -> None:
        self.config = config
        self._env: Mapping[str, str] = dict(os.environ if environ is None else environ)
        self.stop_event = threading.Event()
        self._notifier = notifier if notifier is not None else Notifier.from_env(self._env)
        self.watchdog = Watchdog(self._notifier, watchdog_interval_s(self._env))
        self.boot_id = str(uuid.uuid4())
        self.version = agent_version()
        self._lock = threading.RLock()
        self._state: AgentState = "starting"
        self._started_at = time.time()
        self._undo: list[tuple[str, Callable[[], None], float]] = []
        self._pinning_status: dict[str, Any] | None = None
        self._pinning_plan: PinningPlan | None = None
        self._state_dir: Path | None = None
        self._sink: FanoutSink | None = None
        self.mqtt: MqttRuntime | None = None
        """The MQTT runtime when ``reporting.mqtt`` is configured: the agent registers its
        commands in ``mqtt.registry`` (pipeline.*, model.*, agent.restart)."""
        self._store: ModelStore | None = None
        self._slots: list[_PipelineSlot] = []
        self._stopped = False
        self._frozen_logged = False
        self.exit_status = 0
        """What ``run_agent`` exits with: 0, or ``RESTART_EXIT_STATUS`` after agent.restart."""
        self._local_broker_wanted = local_broker
        self.local_broker: LocalBroker | None = None
        """The private mosquitto started for this run (``local_broker=True``), if any."""
        self._command_hooks: list[Callable[[CommandRegistry], None]] = []
        self._control = threading.Lock()
        self._control_closed = False
        self._results: ResultTee | None = None
        """Put in front of the sink for pipelines: their results also feed other pipelines
        (the LLM narrator watches the vision detections)."""
        self.add_command_hook(self._register_llm_commands)
        self._bundle = BundleStatus(slot=None, version=None, pending=False)
        self._gate: HealthGate | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def state_dir(self) -> Path | None:
        return self._state_dir

    @property
    def sink(self) -> FanoutSink | None:
        return self._sink

    def start(self) -> None:
        """Run the start steps in order; on failure undo the completed ones and raise."""
        self._set_state("starting", "starting")
        self._step("pinning", self._apply_pinning)
        self._step("state dir", self._open_state_dir)
        self._step("reporting", self._open_reporting)
        self._step("watchdog", self._start_watchdog)
        self._step("model store", self._open_model_store)
        self._step("pipelines", self._start_pipelines)
        self._become_ready()
        if self._bundle["pending"]:  # a bundle version on trial
            self._step("health gate", self._start_health_gate)

    def request_stop(self) -> None:
        """Ask the agent to stop: set the stop event. NOT for a signal handler: setting a
        ``threading.Event`` takes its lock, which the interrupted main thread may hold (in
        ``stop_event.wait``) — a deadlock; use ``stop_on_signals`` there."""
        self.stop_event.set()

    def stop(self) -> None:
        """Undo the completed start steps in reverse, each within ``stop_timeout_s``."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._set_state("stopping", "stopping")
        self.stop_event.set()
        self._undo_all()
        self._set_state("stopped", "stopped")
        self._notifier.close()

    def run(self, *, duration_s: float | None = None, until_finished: bool = False) -> None:
        """Supervise until the stop event is set, ``duration_s`` passed, or (``until_finished``)
        every pipeline reached a final state. Beats the watchdog as a critical worker."""
        interval = self.config.watchdog.default_interval_s
        tick = min(1.0, interval / 4)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        self.watchdog.register(SUPERVISOR_WORKER, interval, critical=True)
        try:
            while not self.stop_event.is_set():
                if self._frozen_by_test_switch():
                    self.stop_event.wait(tick)
                    continue
                self.watchdog.beat(SUPERVISOR_WORKER)
                self._supervise_pipelines()
                if deadline is not None and time.monotonic() >= deadline:
                    _log.info("run duration of %.1f s reached; stopping", duration_s)
                    return
                if until_finished and self._pipelines_done():
                    _log.info("every pipeline finished; stopping")
                    return
                wait = tick if deadline is None else min(tick, deadline - time.monotonic())
                self.stop_event.wait(max(0.0, wait))
        finally:
            self.watchdog.unregister(SUPERVISOR_WORKER)

    # ------------------------------------------------------------------ start steps
    def _step(
        self, name: str, action: Callable[[], tuple[Callable[[], None], float] | None]
    ) -> None:
        if self.stop_event.is_set():
            _log.info("stop requested during start; skipping step %r", name)
            return
        _log.debug("start step: %s", name)
        self._notifier.status(f"starting: {name}")
        try:
            undo = action()
        except Exception as exc:
            _log.debug("start step %r failed", name, exc_info=True)
            self._notifier.status(f"failed: {name}: [{reason_code(exc)}] {exc}")
            self.stop_event.set()
            self._undo_all()
            if isinstance(exc, (AgentError, EngineError, PipelineError)):
                raise
            raise StartupError(
                f"start step {name!r} failed: {type(exc).__name__}: {exc} — rerun with --debug "
                "for the traceback and report it"
            ) from exc
        if undo is not None:
            self._undo.append((name, *undo))

    def _apply_pinning(self) -> tuple[Callable[[], None], float] | None:
        from agent.pinning import apply_process_pinning, plan_pinning  # noqa: PLC0415

        plan = plan_pinning(self.config.pinning)
        report = apply_process_pinning(plan)
        self._pinning_plan = plan
        self._pinning_status = report.to_status()
        for warning in report.warnings:
            _log.warning("pinning: %s", warning)
        return None

    def _open_state_dir(self) -> tuple[Callable[[], None], float] | None:
        path = resolve_state_dir(self.config, self._env)
        hint = "set state_dir in the config to a writable folder, or create it for this user"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirError(
                f"state directory {path} cannot be created: {exc.strerror} — {hint}"
            ) from exc
        if not path.is_dir():
            raise StateDirError(f"state directory {path} is not a directory — {hint}")
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise StateDirError(
                f"state directory {path} is not writable: {exc.strerror} — {hint}"
            ) from exc
        self._state_dir = path
        self._bundle = self._read_bundle_slot(path)
        self._write_status_file(self.status())
        return None

    def _read_bundle_slot(self, state_dir: Path) -> BundleStatus:
        """The bundle slot this agent was started from (``EDGE_AGENT_SLOT``) and its version."""
        from agent.bundles.boot import SLOT_ENV  # noqa: PLC0415
        from agent.bundles.slots import SlotStore, parse_slot  # noqa: PLC0415

        slot = self._env.get(SLOT_ENV)
        if not slot:
            return BundleStatus(slot=None, version=None, pending=False)
        name = parse_slot(slot)
        if name is None:
            raise StartupError(f"{SLOT_ENV}={slot!r} is not a bundle slot (a or b)")
        store = SlotStore(state_dir)
        record = store.installed(name)
        pending = store.read_state().pending
        return BundleStatus(
            slot=slot,
            version=None if record is None else record.version,
            pending=pending is not None and pending.slot == slot,
        )

    def _start_health_gate(self) -> tuple[Callable[[], None], float] | None:
        """For a bundle version on trial: the health gate thread (see ``agent.bundles.gate``)."""
        bundle = self._bundle
        if not bundle["pending"] or self._state_dir is None or bundle["slot"] is None:
            return None
        from agent.bundles.gate import HealthGate  # noqa: PLC0415
        from agent.bundles.slots import SlotStore  # noqa: PLC0415

        store = SlotStore(self._state_dir)
        pending = store.read_state().pending
        if pending is None or pending.slot != bundle["slot"]:
            return None
        gate = HealthGate(
            store,
            pending.slot,
            pending.version,
            self.config.bundles,
            self_test=self._bundle_self_test,
            on_committed=self._bundle_committed,
            on_failed=self._bundle_failed,
            first_boot_at=pending.first_boot_at,
        )
        gate.start(self.stop_event)
        self._gate = gate

        def join() -> None:
            if not gate.join(self.config.stop_timeout_s):
                _log.warning("health gate did not end within %.1f s", self.config.stop_timeout_s)

        return join, self.config.stop_timeout_s

    def _bundle_self_test(self) -> tuple[list[str], bool]:
        """The gate's self-test: (problems, fatal); every pipeline running with a recent
        heartbeat (one that finished its bounded input passes), none failed."""
        workers: dict[str, dict[str, Any]] = self.watchdog.status()["workers"]
        problems: list[str] = []
        fatal = False
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            name = slot.config.name
            if slot.failed:
                why = reason_code(slot.error) if slot.error is not None else "failed at run time"
                problems.append(f"pipeline {name} failed [{why}]")
                fatal = True
            elif slot.last_state == "finished":
                continue
            elif slot.last_state != "running":
                problems.append(f"pipeline {name} is {slot.last_state}")
            elif not any(
                w["beats"] > 0 and w["age_s"] <= w["interval_s"]
                for n, w in workers.items()
                if n.startswith(f"{name}/")
            ):
                problems.append(f"pipeline {name} has no recent heartbeat")
        return problems, fatal

    def _bundle_committed(self) -> None:
        with self._lock:
            self._bundle = BundleStatus(
                slot=self._bundle["slot"], version=self._bundle["version"], pending=False
            )
        self._refresh_state(f"bundle version {self._bundle['version']} committed")

    def _bundle_failed(self, reason: str) -> None:
        """The gate recorded the failure: exit 75 so the launcher rolls back."""
        try:
            self.request_restart(f"bundle version {self._bundle['version']} failed: {reason}")
        except CommandError:  # already stopping: the next start rolls back all the same
            _log.warning("health gate failed while the agent was stopping: %s", reason)

    def add_command_hook(self, hook: Callable[[CommandRegistry], None]) -> None:
        """More MQTT commands (e.g. ``llm.*``): ``hook(registry)`` runs in the reporting step,
        after the agent's own commands are registered and before the MQTT runtime starts, so
        no command ever meets a registry without them. Call before ``start()``."""
        if self._sink is not None or self._stopped:
            raise StartupError("add_command_hook() must be called before Agent.start()")
        self._command_hooks.append(hook)

    def _open_reporting(self) -> tuple[Callable[[], None], float] | None:
        sink = open_reporting(self.config.reporting)
        broker: LocalBroker | None = None
        try:
            mqtt = self.config.reporting.mqtt
            if mqtt is None and self._local_broker_wanted:
                broker = self._start_local_broker()
                if broker is not None:
                    mqtt = broker.mqtt_config()
                    reporting = self.config.reporting.model_copy(update={"mqtt": mqtt})
                    self.config = self.config.model_copy(update={"reporting": reporting})
            if mqtt is not None:
                sink = FanoutSink([*sink.sinks, self._open_mqtt(mqtt)])
        except BaseException:
            sink.close()
            if broker is not None:
                broker.stop()
            raise
        self._sink = sink

        def close() -> None:
            self._sink = None
            try:
                sink.close()
            finally:
                if broker is not None:
                    broker.stop()

        return close, self.config.stop_timeout_s

    def _start_local_broker(self) -> LocalBroker | None:
        """A private mosquitto on 127.0.0.1 when the binary exists; None (logged) if not."""
        from agent.reporting.local_broker import LocalBroker, find_mosquitto  # noqa: PLC0415

        binary = find_mosquitto(self._env)
        if binary is None:
            _log.info(
                "no mosquitto binary found: no local MQTT broker (install mosquitto to see the "
                "results on one); results go to the other reporters only"
            )
            return None
        if self._state_dir is None:
            raise StartupError("local broker started before the state directory — a bug")
        broker = LocalBroker(binary, device_id=self.config.device_id, state_dir=self._state_dir)
        try:
            broker.start()
        except ReportingError as exc:
            _log.warning("local MQTT broker not started: %s; MQTT reporting off", exc)
            return None
        self.local_broker = broker
        return broker

    def _open_mqtt(self, cfg: MqttConfig) -> MqttRuntime:
        """MQTT reporter + command dispatcher (durable outbox under the state directory); it
        joins the fan-out sink, and ``publish("status", ...)`` keeps its retained status."""
        from agent.reporting.mqtt_runtime import open_mqtt  # noqa: PLC0415

        if self._state_dir is None:
            raise StartupError("MQTT opened before the state directory — a bug")
        runtime = open_mqtt(
            cfg,
            device_id=self.config.device_id,
            state_dir=self._state_dir,
            version=self.version,
            boot_id=self.boot_id,
            status=self.status,
            config=lambda: self.config,
            telemetry=self.telemetry,
            environ=self._env,
        )
        try:
            from agent.control import register_agent_commands  # noqa: PLC0415

            register_agent_commands(runtime.registry, self)
            for hook in self._command_hooks:
                hook(runtime.registry)
        except BaseException:
            runtime.close()
            raise
        runtime.start()
        self.mqtt = runtime
        return runtime

    def _start_watchdog(self) -> tuple[Callable[[], None], float] | None:
        self.watchdog.start(self.stop_event)

        def join() -> None:
            if not self.watchdog.join(self.config.stop_timeout_s):
                _log.warning(
                    "watchdog pinger did not end within %.1f s", self.config.stop_timeout_s
                )

        return join, self.config.stop_timeout_s

    def _open_model_store(self) -> tuple[Callable[[], None], float] | None:
        if self._state_dir is None:
            raise StartupError("model store opened before the state directory — a bug")
        self._store = ModelStore(self.config.models, self._state_dir, env=self._env)
        return None

    def _start_pipelines(self) -> tuple[Callable[[], None], float] | None:
        self._slots = [_PipelineSlot(cfg) for cfg in self.config.pipelines]
        if not self._slots:
            _log.warning("no pipelines configured; the agent only reports its status")
        for slot in self._slots:
            if self.stop_event.is_set():
                break
            self._start_one_pipeline(slot)
        return self._stop_pipelines, self._pipelines_stop_budget_s()

    def _start_one_pipeline(self, slot: _PipelineSlot) -> None:
        name = slot.config.name
        self._notifier.extend_timeout(self.config.load_timeout_s)
        self._notifier.status(f"starting: pipeline {name} (model {slot.config.model})")
        try:
            pipeline = self._build(slot.config)
            slot.pipeline = pipeline
            pipeline.start(self.stop_event)
        except (AgentError, EngineError, PipelineError) as exc:
            self._record_pipeline_failure(slot, exc)
        except Exception as exc:  # noqa: BLE001 - an unexpected bug in one pipeline degrades
            _log.exception("pipeline %s failed to start with an unexpected error", name)
            self._record_pipeline_failure(slot, exc)
        else:
            slot.last_state = "running"
            _log.info("pipeline %s started", name)

    def _record_pipeline_failure(self, slot: _PipelineSlot, exc: BaseException) -> None:
        slot.error = exc
        slot.last_state = "failed"
        _log.error(
            "pipeline %s failed to start [%s]: %s; the agent keeps running degraded",
            slot.config.name,
            reason_code(exc),
            exc,
        )
        if slot.pipeline is not None:
            # built but failed to start: release what the build acquired
            self._stop_pipeline(slot, self.config.stop_timeout_s)
            slot.pipeline = None

    def _pipeline_context(self) -> PipelineContext:
        if self._sink is None:
            raise StartupError("pipelines built before reporting — a bug")
        if self._pinning_plan is None:
            raise StartupError("pipelines built before pinning — a bug")
        if self._results is None:
            self._results = ResultTee(self._sink)
        return PipelineContext(
            sink=self._results,
            heartbeats=self.watchdog,
            resolve_model=self._resolve_model,
            resolve_data=self._resolve_data,
            process_cpus=self._pinning_plan.process_cpus,
            stage_cpus=self._pinning_plan.stage_cpus,
            results=self._results,
        )

    def _register_llm_commands(self, registry: CommandRegistry) -> None:
        """``llm.generate`` / ``llm.cancel`` / ``llm.session.drop`` on the running LLM
        pipelines (see ``agent.commands.llm``)."""
        from agent.commands.llm import register_llm_commands  # noqa: PLC0415
        from pipelines.llm.pipeline import LlmPipeline  # noqa: PLC0415

        def running() -> list[LlmPipeline]:
            with self._lock:
                slots = list(self._slots)
            return [s.pipeline for s in slots if isinstance(s.pipeline, LlmPipeline)]

        register_llm_commands(registry, running)

    def _model_store(self) -> ModelStore:
        if self._store is None:
            raise StartupError("model store used before it was opened — a bug")
        return self._store

    def _resolve_model(self, name: str) -> ResolvedModel:
        """A model manifest name -> its checked local file (pulled if allowed) and labels."""
        store = self._model_store()
        manifest = store.manifest(name)
        path = store.resolve(name)
        return ResolvedModel(manifest=manifest, path=path, labels=store.labels(manifest))

    def _resolve_data(self, name: str) -> Path:
        """A data name -> a local file: an existing path as is, a data manifest name through
        the model store, else a relative path under ``$EDGE_AGENT_DATA_PATH``."""
        candidate = Path(name).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate
        store = self._model_store()
        if name in {m.name for m in store.manifests()}:
            return store.resolve(name)
        data_dirs = [Path(p) for p in self._env.get(DATA_PATH_ENV, "").split(os.pathsep) if p]
        for folder in data_dirs:
            if (folder / candidate).exists():
                return folder / candidate
        searched = ", ".join(map(str, data_dirs)) or f"no ${DATA_PATH_ENV} set"
        raise SourceOpenError(
            f"data {name!r} is neither a file, a data manifest nor under the data path "
            f"({searched}) — give an absolute path or set ${DATA_PATH_ENV}"
        )

    def _become_ready(self) -> None:
        if self.stop_event.is_set():
            return
        failed = self._failed_slots()
        running = len(self._slots) - len(failed)
        if failed:
            detail = ", ".join(
                f"{s.config.name} [{reason_code(s.error)}]" for s in failed if s.error
            )
            text = f"degraded: {running} pipeline(s) running, failed: {detail}"
            self._set_state("degraded", text, ready=True)
        else:
            self._set_state("ready", f"ready: {running} pipeline(s) running", ready=True)
        self._publish_discovery()

    def _failed_slots(self) -> list[_PipelineSlot]:
        return [s for s in self._slots if s.failed]

    def failed_pipelines(self) -> list[str]:
        """The pipelines that failed to start or failed while running, as ``name [reason]``."""
        with self._lock:
            return [
                f"{s.config.name} [{reason_code(s.error) if s.error else 'pipeline_failed'}]"
                for s in self._failed_slots()
            ]

    # ------------------------------------------------------------------ stop
    def _pipelines_stop_budget_s(self) -> float:
        """Time to stop every pipeline: ``stop_timeout_s`` each (at least one)."""
        return self.config.stop_timeout_s * max(1, len(self._slots))

    def _undo_all(self) -> None:
        while self._undo:
            name, undo, timeout = self._undo.pop()
            run_bounded(name, undo, timeout)

    def _stop_pipelines(self) -> None:
        deadline = time.monotonic() + self._pipelines_stop_budget_s()
        # no control command may start a pipeline any more; wait for a running one to end
        locked = self._control.acquire(timeout=self.config.stop_timeout_s)
        self._control_closed = True
        if locked:
            self._control.release()
        else:
            _log.warning("a pipeline/model command is still running; stopping pipelines anyway")
        for slot in reversed(self._slots):
            if slot.pipeline is not None:
                self._stop_pipeline(slot, max(0.1, deadline - time.monotonic()))

    def _stop_pipeline(self, slot: _PipelineSlot, timeout_s: float) -> None:
        if slot.pipeline is None:
            return
        try:
            if not slot.pipeline.stop(timeout_s):
                _log.warning(
                    "pipeline %s did not stop within %.1f s; abandoning its threads",
                    slot.config.name,
                    timeout_s,
                )
        except Exception:  # noqa: BLE001 - logged; the other pipelines must still stop
            _log.exception("pipeline %s failed while stopping", slot.config.name)

    # ------------------------------------------------------------------ supervision
    def _frozen_by_test_switch(self) -> bool:
        freeze = self.config.watchdog.test_freeze_file
        frozen = freeze is not None and freeze.exists()
        if frozen and not self._frozen_logged:
            _log.warning(
                "test switch %s exists: the supervisor stops beating (simulated freeze)", freeze
            )
        elif not frozen and self._frozen_logged:
            _log.warning("test switch removed: the supervisor beats again")
        self._frozen_logged = frozen
        return frozen

    def _supervise_pipelines(self) -> None:
        changed = False
        for slot in self._slots:
            with self._lock:  # control commands swap slot.pipeline under this lock
                if slot.pipeline is None:
                    continue
                state = str(self._pipeline_status(slot).get("state", "unknown"))
                if state != slot.last_state:
                    _log.info("pipeline %s: %s -> %s", slot.config.name, slot.last_state, state)
                    slot.last_state = state
                    changed = True
        if not changed or self._state not in ("ready", "degraded"):
            return
        failed = [s.config.name for s in self._failed_slots()]
        if failed:
            self._set_state("degraded", f"degraded: pipeline(s) failed: {', '.join(failed)}")
        else:
            self._set_state(self._state, f"{self._state}: pipeline state changed")

    def _pipelines_done(self) -> bool:
        """Every bounded pipeline reached a final state (an LLM pipeline serves requests until
        it is stopped: it never finishes by itself, so a bounded run does not wait for it)."""
        return all(
            slot.pipeline is None
            or slot.last_state in _TERMINAL_PIPELINE_STATES
            or slot.config.type == "llm"
            for slot in self._slots
        )

    def _pipeline_status(self, slot: _PipelineSlot) -> dict[str, Any]:
        if slot.pipeline is None:
            return {}
        try:
            return slot.pipeline.status()
        except Exception as exc:  # noqa: BLE001 - status of one pipeline must not break others
            _log.warning("status of pipeline %s failed: %s", slot.config.name, exc)
            return {"state": "unknown", "status_error": str(exc)}

    # ------------------------------------------------------------------ control (commands)
    @contextlib.contextmanager
    def _controlling(self, what: str) -> Iterator[None]:
        if not self._control.acquire(timeout=_CONTROL_WAIT_S):
            raise CommandError(
                "control_busy",
                f"another pipeline/model command is running; retry {what} later with a new "
                "command_id",
                status="busy",
            )
        try:
            self._check_not_stopping(what)
            yield
        finally:
            self._control.release()

    def _check_not_stopping(self, what: str) -> None:
        if self._control_closed or self.stop_event.is_set():
            raise CommandError("agent_stopping", f"the agent is stopping: {what} not done")

    def _slot(self, name: str) -> _PipelineSlot:
        for slot in self._slots:
            if slot.config.name == name:
                return slot
        known = ", ".join(s.config.name for s in self._slots) or "none configured"
        raise CommandError("pipeline_unknown", f"no pipeline {name!r} (pipelines: {known})")

    def _running(self, slot: _PipelineSlot) -> bool:
        return slot.pipeline is not None and slot.last_state not in _TERMINAL_PIPELINE_STATES

    def _set_pipeline_config(self, slot: _PipelineSlot, config: PipelineConfig) -> None:
        """Keep ``slot.config`` and the agent's in-memory config (``config.get``) in step."""
        with self._lock:
            slot.config = config
            self.config = self.config.model_copy(
                update={"pipelines": [s.config for s in self._slots]}
            )
        self._publish_discovery()

    def _publish_discovery(self) -> None:
        """Home Assistant discovery configs for the configured pipelines (when enabled)."""
        discovery = self.mqtt.discovery if self.mqtt is not None else None
        if discovery is None:
            return
        pipelines: dict[str, list[str]] = {}
        for slot in self._slots:
            labels: tuple[str, ...] = ()
            try:
                store = self._model_store()
                labels = store.labels(store.manifest(slot.config.model))
            except (EngineError, StartupError) as exc:
                _log.warning("no class sensors for pipeline %s: %s", slot.config.name, exc)
            allow = getattr(slot.config, "classes", None)
            names = None
            if allow is not None:
                names = [
                    labels[c] if isinstance(c, int) and 0 <= c < len(labels) else str(c)
                    for c in allow
                ]
            pipelines[slot.config.name] = discovery.labels_for(names, labels)
        discovery.update(pipelines)

    def _refresh_state(self, text: str) -> None:
        """Publish the status after a control change (ready <-> degraded)."""
        with self._lock:
            if self._state not in ("ready", "degraded"):
                return
            failed = bool(self._failed_slots())
        self._set_state("degraded" if failed else "ready", text)

    def _build(self, config: PipelineConfig) -> Pipeline:
        from pipelines.factory import build_pipeline  # noqa: PLC0415

        return build_pipeline(config, self._pipeline_context())

    def _launch(self, slot: _PipelineSlot, pipeline: Pipeline, config: PipelineConfig) -> None:
        """Start a built ``pipeline`` in ``slot``; on failure record it in the slot (the agent
        runs degraded), release the pipeline and raise."""
        try:
            self._check_not_stopping(f"pipeline {config.name} start")
        except CommandError:
            pipeline.stop(self.config.stop_timeout_s)
            raise
        with self._lock:
            slot.pipeline, slot.error, slot.last_state = pipeline, None, "starting"
        self._set_pipeline_config(slot, config)
        try:
            pipeline.start(self.stop_event)
        except Exception as exc:
            self._record_pipeline_failure(slot, exc)
            raise
        with self._lock:
            slot.last_state = "running"
        _log.info("pipeline %s started (model %s)", config.name, config.model)

    def _halt(self, slot: _PipelineSlot) -> None:
        """Stop the slot's pipeline (its engine is released) and mark it stopped."""
        self._stop_pipeline(slot, self.config.stop_timeout_s)
        with self._lock:
            slot.pipeline, slot.error, slot.last_state = None, None, "stopped"

    def start_pipeline(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        """``pipeline.start``: build (load the model) and start a stopped or failed pipeline;
        a running one is left alone (``changed: false``)."""
        with self._controlling(f"pipeline.start {name}"):
            slot = self._slot(name)
            if self._running(slot):
                return {"pipeline": name, "state": slot.last_state, "changed": False}
            if slot.pipeline is not None:  # finished or failed at run time: release it first
                self._halt(slot)
            if progress is not None:
                progress(0.1, f"building pipeline {name} (model {slot.config.model})")
            try:
                pipeline = self._build(slot.config)
            except Exception as exc:
                with self._lock:
                    slot.error, slot.last_state = exc, "failed"
                self._refresh_state(f"pipeline {name} failed to start")
                raise
            if progress is not None:
                progress(0.8, f"pipeline {name} built; starting")
            try:
                self._launch(slot, pipeline, slot.config)
            finally:
                self._refresh_state(f"pipeline {name} start")
        return {"pipeline": name, "state": "running", "changed": True}

    def stop_pipeline(self, name: str) -> dict[str, Any]:
        """``pipeline.stop``: stop a pipeline and release its engine (``changed: false`` when
        it was not running)."""
        with self._controlling(f"pipeline.stop {name}"):
            slot = self._slot(name)
            changed = slot.pipeline is not None
            if changed:
                self._halt(slot)
        if changed:
            self._refresh_state(f"pipeline {name} stopped")
        return {"pipeline": name, "state": slot.last_state, "changed": changed}

    def update_pipeline(self, name: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """``pipeline.set``: change settings (score_threshold, nms_iou, classes, fps_cap) of a
        running pipeline at once; of a stopped one for its next start."""
        with self._controlling(f"pipeline.set {name}"):
            slot = self._slot(name)
            pipeline = slot.pipeline
            update = getattr(pipeline, "update", None) if self._running(slot) else None
            if update is not None and pipeline is not None:
                settings: dict[str, Any] = update(**changes)
                config = getattr(pipeline, "config", slot.config)
                self._set_pipeline_config(slot, config)
                return {"pipeline": name, "applied": "now", "settings": settings}
            if self._running(slot):
                raise CommandError(
                    "not_supported", f"pipeline {name} cannot change settings while running"
                )
            config = _with_settings(slot.config, changes)
            self._set_pipeline_config(slot, config)
            return {"pipeline": name, "applied": "next_start", "settings": dict(changes)}

    def load_model(
        self, model: str, pipeline: str | None = None, progress: Progress | None = None
    ) -> dict[str, Any]:
        """``model.load``: fetch/verify ``model`` in the store; with ``pipeline``, run that
        pipeline on it: the new pipeline is built (engine loaded) while the old one still
        runs, then the old one stops and the new one starts. A build failure leaves the old
        pipeline running."""
        with self._controlling(f"model.load {model}"):
            store = self._model_store()
            if progress is not None:
                progress(0.05, f"resolving model {model}")
            manifest = store.manifest(model)
            path = store.resolve(model)
            result: dict[str, Any] = {"model": model, "path": str(path), "sha256": manifest.sha256}
            if pipeline is None:
                return {**result, "pipeline": None, "changed": False}
            slot = self._slot(pipeline)
            if slot.config.model == model and self._running(slot):
                return {**result, "pipeline": pipeline, "state": slot.last_state, "changed": False}
            config = _with_settings(slot.config, {"model": model})
            if progress is not None:
                progress(0.3, f"model {model} verified; building pipeline {pipeline}")
            new = self._build(config)
            if progress is not None:
                progress(0.8, f"engine for {model} loaded; swapping pipeline {pipeline}")
            if slot.pipeline is not None:
                self._stop_pipeline(slot, self.config.stop_timeout_s)
            try:
                self._launch(slot, new, config)
            finally:
                self._refresh_state(f"pipeline {pipeline} now runs model {model}")
        return {**result, "pipeline": pipeline, "state": "running", "changed": True}

    def unload_model(self, model: str) -> dict[str, Any]:
        """``model.unload``: stop every pipeline running ``model`` (their engines are closed)."""
        with self._controlling(f"model.unload {model}"):
            slots = [s for s in self._slots if s.config.model == model and s.pipeline is not None]
            if not slots:
                loaded = sorted({s.config.model for s in self._slots if s.pipeline is not None})
                raise CommandError(
                    "model_not_loaded",
                    f"model {model!r} is not loaded by any pipeline (loaded: "
                    f"{', '.join(loaded) or 'none'})",
                )
            for slot in slots:
                self._halt(slot)
        names = [s.config.name for s in slots]
        self._refresh_state(f"model {model} unloaded (pipelines {', '.join(names)} stopped)")
        return {"model": model, "pipelines": names, "state": "stopped"}

    def request_restart(self, reason: str | None = None) -> dict[str, Any]:
        """``agent.restart``: stop gracefully, then exit with ``RESTART_EXIT_STATUS``. The
        command's reply is queued before the reporting closes (the dispatcher finishes its
        command before the MQTT runtime stops, and the runtime flushes on close)."""
        self._check_not_stopping("agent.restart")
        _log.warning(
            "agent.restart%s: stopping, then exiting with status %d for the service manager to "
            "start the agent again",
            f" ({reason})" if reason else "",
            RESTART_EXIT_STATUS,
        )
        self.exit_status = RESTART_EXIT_STATUS
        self.request_stop()
        return {"exit_status": RESTART_EXIT_STATUS, "stopping": True}

    def telemetry(self) -> dict[str, dict[str, Any]]:
        """Per-pipeline figures for the MQTT ``telemetry`` message: state, frame rates,
        stage latency percentiles (ms), drops, frame counters and queue depths."""
        out: dict[str, dict[str, Any]] = {}
        for entry in self.status()["pipelines"]:
            figures: dict[str, Any] = {"state": entry["state"], "model": entry["model"]}
            if entry["reason"] is not None:
                figures["reason"] = entry["reason"]
            status = entry["status"]
            for key in ("uptime_s", "fps", "latency_ms", "drops", "frames", "queues"):
                if key in status:
                    figures[key] = status[key]
            out[entry["name"]] = figures
        return out

    # ------------------------------------------------------------------ status
    def status(self) -> AgentStatus:
        """A JSON-serialisable snapshot of the agent."""
        with self._lock:
            pipelines: list[PipelineEntry] = []
            failed_models: list[FailedModel] = []
            for slot in self._slots:
                err = slot.error
                pipelines.append(
                    PipelineEntry(
                        name=slot.config.name,
                        type=slot.config.type,
                        model=slot.config.model,
                        state="failed" if slot.failed else slot.last_state,
                        reason=reason_code(err) if err is not None else None,
                        error=str(err) if err is not None else None,
                        status=self._pipeline_status(slot),
                    )
                )
                if err is not None and isinstance(err, EngineError):
                    failed_models.append(
                        FailedModel(
                            model=slot.config.model,
                            pipeline=slot.config.name,
                            reason=reason_code(err),
                            error=str(err),
                        )
                    )
            return AgentStatus(
                state=self._state,
                boot_id=self.boot_id,
                version=self.version,
                device_id=self.config.device_id,
                pid=os.getpid(),
                started_at=self._started_at,
                updated_at=time.time(),
                state_dir=str(self._state_dir) if self._state_dir else None,
                pinning=self._pinning_status,
                watchdog=self.watchdog.status(),
                pipelines=pipelines,
                failed_models=failed_models,
                reporters=self._sink.reporter_status() if self._sink is not None else {},
                bundle=BundleStatus(**self._bundle),
            )

    def _set_state(self, state: AgentState, text: str, *, ready: bool = False) -> None:
        with self._lock:
            self._state = state
            snapshot = self.status()
        _log.info("agent %s", text)
        # status.json and the status topic first: whoever sees READY=1 finds them up to date
        self._write_status_file(snapshot)
        sink = self._sink
        if sink is not None:
            try:
                sink.publish("status", dict(snapshot))
            except PipelineError as exc:
                _log.warning("could not publish status: %s", exc)
        if ready:
            self._notifier.ready(text)
        elif state == "stopping":
            self._notifier.stopping(text)
        else:
            self._notifier.status(text)

    def _write_status_file(self, snapshot: AgentStatus) -> None:
        if self._state_dir is None:
            return
        target = self._state_dir / _STATUS_FILE
        text = json.dumps(snapshot, indent=2, sort_keys=True) + "\n"
        try:
            atomic_write_bytes(target, text.encode("utf-8"), prefix=".status-")
        except OSError as exc:  # the temporary file is already removed
            _log.warning("could not write %s: %s", target, exc)


def _with_settings(config: PipelineConfig, changes: Mapping[str, Any]) -> PipelineConfig:
    """``config`` with ``changes`` (``fps_cap`` applies to every source), validated by the
    config's own rules (``PipelineConfigError`` naming the field)."""
    data = config.model_dump()
    for key, value in changes.items():
        if key == "fps_cap":
            data["sources"] = [{**src, "fps_cap": value} for src in data["sources"]]
        else:
            data[key] = value
    try:
        return type(config).model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise PipelineConfigError(
            f"pipeline {config.name}: {where}: {err.get('msg', 'invalid')}"
        ) from exc


def run_bounded(name: str, action: Callable[[], None], timeout_s: float) -> None:
    """Run one stop step in a helper thread; log it if it raised or overran ``timeout_s``."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - reported below, the other steps still run
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=target, name=f"stop:{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _log.warning(
            "stop step %r overran its %.1f s timeout; abandoning it and continuing", name, timeout_s
        )
        return
    if errors:
        _log.error("stop step %r failed: %s", name, errors[0], exc_info=errors[0])
    else:
        _log.debug("stop step %r done in %.3f s", name, time.monotonic() - started)


@contextlib.contextmanager
def stop_on_signals(
    request_stop: Callable[[], None],
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[None]:
    """While inside, each of ``signals`` calls ``request_stop()`` — from a relay thread, never
    from the signal handler itself. Python runs a handler in the main thread between two
    bytecodes, so it can interrupt the main thread while it holds a lock; a handler that
    took that lock (``threading.Event.set()`` takes the event's, which the agent's main
    thread holds inside ``stop_event.wait()``) would wait for itself forever: the agent
    ignores SIGTERM until systemd SIGKILLs it. The handler here only writes the signal
    number to a non-blocking pipe (no lock); the ``signal-relay`` thread reads it and calls
    ``request_stop()``. The previous handlers are restored on exit. Main thread only (where
    Python runs signal handlers); elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_fd, False)

    def on_signal(signum: int, _frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # full pipe: a stop is already queued
            os.write(write_fd, bytes((signum,)))

    def relay() -> None:
        while True:
            data = os.read(read_fd, 64)  # ended by the 0 byte written on exit
            for signum in data:
                if signum == 0:
                    return
                _log.info("%s received; stopping", signal.Signals(signum).name)
                try:
                    request_stop()
                except Exception:  # noqa: BLE001 - logged; the relay must pass on the next signal
                    _log.exception("stop request after signal %d failed", signum)

    thread = threading.Thread(target=relay, name="signal-relay", daemon=True)
    thread.start()
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.write(write_fd, b"\0")  # room: the relay keeps the pipe drained
        thread.join(10.0)
        if thread.is_alive():  # leave the fds to the daemon thread: closing them under it races
            _log.warning("signal relay thread did not end within 10 s")
        else:
            os.close(read_fd)
            os.close(write_fd)
