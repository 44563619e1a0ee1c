"""`edge-agent run`: start the agent and keep it running until SIGTERM/SIGINT (or a bound)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from agent.bundles.boot import SLOT_ENV, exec_slot, mark_failed, select
from agent.bundles.slots import SlotStore, parse_slot
from agent.cli.live_view import (
    LiveView,
    live_view_problem,
    start_live_view,
    wants_live_view,
    without_stdout_jsonl,
)
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig
from agent.configfile import load_config, resolve_config_path
from agent.defaults import default_config
from agent.errors import ConfigError, reason_code
from agent.process import RESTART_EXIT_STATUS, Agent, resolve_state_dir, stop_on_signals
from pipelines.config import VisionPipelineConfig

__all__ = ["register", "run_agent"]

_log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run the agent (pipelines, reporting, systemd notify) until stopped",
        description="Run the agent in the foreground: pin CPUs, open the state directory and "
        "the reporters, load models, start the pipelines, then report readiness to systemd "
        "(Type=notify) and keep the watchdog fed. SIGTERM or Ctrl-C stops it gracefully "
        "(exit 0). A start failure prints one line `edge-agent: error [reason]: cause — what "
        "to do` and exits non-zero.\n\n"
        f"Without --config the agent reads {DEFAULT_CONFIG_PATH} if it exists, else runs on "
        "its embedded defaults (a YOLOX-nano vision pipeline on the sample street video). "
        "Results and status go to standard output as JSON Lines; logs go to standard error. "
        "On the embedded defaults the agent also starts a private mosquitto on 127.0.0.1 (when "
        "the mosquitto binary is installed) and reports to it over MQTT; its port is logged.\n\n"
        "On a terminal (standard output a TTY) with that broker running, the JSON Lines give "
        "way to a live view read back from the broker like any MQTT client: a line a second "
        "with frames/s and detections/s per vision pipeline and the latest telemetry, a line "
        "per LLM narrator report, a line per status change (--view chooses).\n\n"
        "Exit status: 0 after a stop, 75 after an agent.restart command (systemd's "
        "Restart=on-failure then starts the agent again), 1 on a failure.",
        epilog="Examples:\n"
        "  edge-agent run                                   # embedded defaults\n"
        "  edge-agent run --view json | jq .topic           # JSON Lines even on a terminal\n"
        "  edge-agent run --view live --config my.toml      # live view of a config's pipelines\n"
        "  edge-agent run --config /etc/edge-agent/agent.toml\n"
        "  edge-agent run --frames 100 | head               # stop after 100 frames per pipeline\n"
        "  edge-agent run --duration 30 --config my.toml    # stop after 30 s",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if present, else built-in "
        "defaults); check one with `edge-agent config validate FILE`",
    )
    p.add_argument(
        "--no-local-broker",
        action="store_true",
        help="on the embedded defaults, do not start a local mosquitto for MQTT reporting",
    )
    p.add_argument(
        "--view",
        choices=("auto", "live", "json"),
        default="auto",
        help="what standard output shows: json = a JSON line per result; live = the live view "
        "read back from the local MQTT broker (also starts that broker for a --config without "
        "[reporting.mqtt]); auto (default) = live on a terminal when the local broker runs, "
        "else json",
    )
    bound = p.add_mutually_exclusive_group()
    bound.add_argument(
        "--frames",
        type=_positive_int,
        metavar="N",
        help="stop once every vision pipeline has processed N frames (sets each one's "
        "max_frames; handy for tests and demos)",
    )
    bound.add_argument(
        "--duration",
        type=_positive_float,
        metavar="S",
        help="stop after S seconds of running",
    )
    p.set_defaults(func=_run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _run(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    embedded = path is None
    slot = os.environ.get(SLOT_ENV)
    try:
        config = default_config() if embedded else load_config(path)
    except ConfigError as exc:
        # a version on trial whose config cannot load: its failure (exit 75, the launcher rolls
        # back) rather than exit 78, which would stop systemd from ever starting it again
        if slot and path is not None and _pending_config_failed(slot, exc):
            print(f"edge-agent: error [{reason_code(exc)}]: {exc}", file=sys.stderr)
            return RESTART_EXIT_STATUS
        raise
    if not args.debug:
        logging.getLogger().setLevel(config.log_level.upper())
    if not slot:
        _boot_bundle_slot(config, path, args)  # returns only for the factory install
    if args.frames is not None:
        config = _with_max_frames(config, args.frames)
    local_broker = embedded and not args.no_local_broker and config.reporting.mqtt is None
    live = wants_live_view(args.view, local_broker)
    if live:
        problem = live_view_problem(config, args.no_local_broker)
        if problem is not None:
            print(f"edge-agent run: --view live: {problem}", file=sys.stderr)
            return 2
        config = without_stdout_jsonl(config)
    try:
        return run_agent(
            config,
            duration_s=args.duration,
            until_finished=args.frames is not None,
            local_broker=local_broker or live,
            live_view=sys.stdout if live else None,
        )
    except Exception as exc:
        if slot and _pending_start_failed(config, slot, exc):
            print(f"edge-agent: error [{reason_code(exc)}]: {exc}", file=sys.stderr)
            return RESTART_EXIT_STATUS
        raise


def _boot_bundle_slot(config: AgentConfig, path: Path | None, args: argparse.Namespace) -> None:
    """The launcher: pick the bundle slot to boot (``agent.bundles.boot.select``) and exec its
    agent; return when the factory install (this process) is the one to run."""
    state_dir = resolve_state_dir(config, os.environ)
    choice = select(config.bundles, state_dir)
    if choice.slot is None:
        return
    run_args: list[str] = []
    if args.no_local_broker:
        run_args.append("--no-local-broker")
    if args.frames is not None:
        run_args += ["--frames", str(args.frames)]
    if args.duration is not None:
        run_args += ["--duration", str(args.duration)]
    if args.view != "auto":  # only when asked: an older slot agent may not know the option
        run_args += ["--view", args.view]
    exec_slot(
        SlotStore(state_dir),
        choice.slot,
        state_dir=state_dir,
        config_path=path,
        run_args=run_args,
        global_args=["--debug"] if args.debug else [],
    )


def _pending_config_failed(slot: str, exc: ConfigError) -> bool:
    """A bundle config on trial that does not load: recorded as the version's failure (the
    state directory comes from the environment the launcher set: ``$STATE_DIRECTORY``)."""
    return _pending_start_failed(AgentConfig(), slot, exc)


def _pending_start_failed(config: AgentConfig, slot: str, exc: Exception) -> bool:
    """A start failure of a bundle version on trial: recorded as its failure (the next boot
    rolls back); True when it was on trial."""
    name = parse_slot(slot)
    if name is None:
        return False
    store = SlotStore(resolve_state_dir(config, os.environ))
    return mark_failed(store, name, f"start failed [{reason_code(exc)}]: {exc}")


def _with_max_frames(config: AgentConfig, frames: int) -> AgentConfig:
    """``max_frames`` on every vision pipeline (an LLM pipeline has no frames: the bounded run
    ends when the vision pipelines are done)."""
    pipelines = [
        p.model_copy(update={"max_frames": frames}) if isinstance(p, VisionPipelineConfig) else p
        for p in config.pipelines
    ]
    return config.model_copy(update={"pipelines": pipelines})


def run_agent(
    config: AgentConfig,
    *,
    duration_s: float | None = None,
    until_finished: bool = False,
    local_broker: bool = False,
    live_view: TextIO | None = None,
) -> int:
    """Start the agent, supervise until SIGTERM/SIGINT, a bound or agent.restart, stop it; the
    exit status (``agent.process.RESTART_EXIT_STATUS`` after agent.restart). ``local_broker``:
    start a private mosquitto when no MQTT broker is configured (see ``agent.process``).
    ``live_view``: write the live view of that broker there (``agent.cli.live_view``)."""
    agent = Agent(config, local_broker=local_broker)
    view: LiveView | None = None
    failed: list[str] = []
    # SIGTERM/SIGINT -> agent.request_stop() from a relay thread: a handler that set the stop
    # event itself could deadlock on the event's lock held by the interrupted main thread
    with stop_on_signals(agent.request_stop):
        try:
            agent.start()
            if live_view is not None and not agent.stop_event.is_set():
                view = start_live_view(agent.local_broker, agent.config.device_id, live_view)
            agent.run(duration_s=duration_s, until_finished=until_finished)
            failed = agent.failed_pipelines() if until_finished else []
        finally:
            try:
                agent.stop()
            finally:
                if view is not None:  # after the stop: the view shows the last status too
                    view.close()
    if agent.exit_status:  # the agent itself logged "agent stopped"
        _log.info("exit status %d (restart requested)", agent.exit_status)
    elif failed:  # a bounded run (--frames) succeeds only if every pipeline got to its end
        print(
            f"edge-agent: error [pipeline_failed]: pipeline(s) failed: {', '.join(failed)} "
            "(the log above has the cause)",
            file=sys.stderr,
        )
        return 1
    return agent.exit_status
