"""`edge-agent run` as a real process: signals, the notify socket, the watchdog, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from agent_process_support import ROOT, AgentProcess, base_env
from notify_support import NotifyListener
from wait_support import wait_for

from agent import configfile
from agent.cli import main
from agent.pinning import allowed_cpus


def write_config(folder: Path, text: str = "", *, state: Path | None = None) -> Path:
    state_dir = state if state is not None else folder / "state"
    path = folder / "agent.toml"
    path.write_text(f'state_dir = "{state_dir}"\n{text}', encoding="utf-8")
    return path


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    yield notify
    notify.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()


def start(
    agents: list[AgentProcess], args: list[str], env: Mapping[str, str], **kw: Any
) -> AgentProcess:
    agent = AgentProcess(args, env, **kw)
    agents.append(agent)
    return agent


def assert_one_error_line(agent: AgentProcess, reason: str, *needles: str) -> str:
    """Exit 78 (EX_CONFIG) for config/pinning errors, else 1; no traceback, exactly one error
    line (the last), with ``reason`` and needles (the cause and what to do)."""
    config_problem = reason.startswith("config_") or reason == "pinning_invalid"
    assert agent.wait() == (78 if config_problem else 1)
    assert not any("Traceback" in line for line in agent.stderr), agent.stderr
    errors = [line for line in agent.stderr if line.startswith("edge-agent: error")]
    assert errors == [agent.stderr[-1]], agent.stderr
    line = errors[0]
    assert line.startswith(f"edge-agent: error [{reason}]: "), line
    for needle in needles:
        assert needle in line, line
    return line


# -- signals and the notify protocol ---------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_exit_0(
    sig: int, tmp_path: Path, listener: NotifyListener, agents: list[AgentProcess]
) -> None:
    config = write_config(tmp_path)
    agent = start(
        agents, ["run", "--config", str(config)], base_env(NOTIFY_SOCKET=listener.address)
    )
    messages = listener.take("READY=1")
    assert messages[0] == ["STATUS=starting"]
    assert messages[-1] == ["READY=1", "STATUS=ready: 0 pipeline(s) running"]
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["state"] == "ready"
    assert status["pid"] == agent.proc.pid

    agent.signal(sig)
    assert listener.take("STOPPING=1") == [["STOPPING=1", "STATUS=stopping"]]
    assert agent.wait() == 0
    assert not any("Traceback" in line for line in agent.stderr)
    final = json.loads((tmp_path / "state" / "status.json").read_text())
    assert final["state"] == "stopped"
    assert final["boot_id"] == status["boot_id"]
    published = [json.loads(line) for line in agent.stdout]
    assert [(m["topic"], m["state"]) for m in published] == [
        ("status", "ready"),
        ("status", "stopping"),
    ]


def test_abstract_notify_socket(agents: list[AgentProcess], tmp_path: Path) -> None:
    listener = NotifyListener(f"@edge-agent-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        config = write_config(tmp_path)
        agent = start(
            agents, ["run", "--config", str(config)], base_env(NOTIFY_SOCKET=listener.address)
        )
        assert listener.take("READY=1")[-1][0] == "READY=1"
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        listener.close()


def test_watchdog_pings_stop_while_frozen_and_resume(
    tmp_path: Path, listener: NotifyListener, agents: list[AgentProcess]
) -> None:
    freeze = tmp_path / "freeze"
    config = write_config(
        tmp_path, f'[watchdog]\ndefault_interval_s = 0.6\ntest_freeze_file = "{freeze}"\n'
    )
    env = base_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")  # ping every 0.2 s
    agent = start(agents, ["run", "--config", str(config)], env)
    listener.take("READY=1")
    listener.take("WATCHDOG=1")
    listener.take("WATCHDOG=1")

    freeze.touch()
    agent.wait_stderr("agent.supervisor missed their heartbeat")
    time.sleep(0.3)  # let a ping sent just before the warning arrive, then forget it
    listener.take_all()
    time.sleep(1.2)  # six ping periods
    frozen = listener.take_all()
    assert ["WATCHDOG=1"] not in frozen
    assert agent.proc.poll() is None  # still running: systemd decides the restart

    freeze.unlink()
    listener.take("WATCHDOG=1")
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0


def test_notify_socket_pointing_nowhere_keeps_running(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    config = write_config(tmp_path)
    env = base_env(NOTIFY_SOCKET=str(tmp_path / "nobody-listens"))
    agent = start(agents, ["run", "--config", str(config)], env)
    status_file = tmp_path / "state" / "status.json"
    wait_for(
        lambda: status_file.exists() and json.loads(status_file.read_text())["state"] == "ready",
        "status ready",
        timeout_s=60,
    )
    assert agent.proc.poll() is None
    warnings = [line for line in agent.stderr if "NOTIFY_SOCKET" in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0]
    assert "keeps running" in warnings[0]
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0


# -- bounded runs with a real pipeline -------------------------------------------------------


def test_frames_bound_runs_real_pipeline(
    tmp_path: Path, models_dir: Path, data_dir: Path, agents: list[AgentProcess]
) -> None:
    config = write_config(
        tmp_path,
        '[[pipelines]]\ntype = "vision"\nname = "street"\nmodel = "yolox_nano_416"\n'
        'engine = { type = "onnxruntime" }\nsources = [{ type = "file", path = "bikes-video" }]\n',
    )
    env = base_env(EDGE_AGENT_MODEL_PATH=str(models_dir), EDGE_AGENT_DATA_PATH=str(data_dir))
    agent = start(agents, ["run", "--config", str(config), "--frames", "4"], env)
    assert agent.wait(120) == 0, agent.stderr
    messages = [json.loads(line) for line in agent.stdout]
    detections = [m for m in messages if m["topic"] == "vision/street/detections"]
    assert len(detections) == 4
    states = [m["state"] for m in messages if m["topic"] == "status"]
    assert states[0] == "ready"
    assert states[-1] == "stopping"


def test_frames_bound_with_a_failed_pipeline_exits_1(
    tmp_path: Path, models_dir: Path, agents: list[AgentProcess]
) -> None:
    """A bounded run whose pipeline cannot get to its end fails (exit 1, one line naming it),
    so a script or test running `--frames N` does not take a dead pipeline for success."""
    missing = tmp_path / "no-such-video.mp4"
    config = write_config(
        tmp_path,
        '[[pipelines]]\ntype = "vision"\nname = "street"\nmodel = "yolox_nano_416"\n'
        'engine = { type = "onnxruntime" }\n'
        f'sources = [{{ type = "file", path = "{missing}" }}]\n',
    )
    env = base_env(EDGE_AGENT_MODEL_PATH=str(models_dir))
    agent = start(agents, ["run", "--config", str(config), "--frames", "4"], env)
    assert_one_error_line(agent, "pipeline_failed", "street [source_open_failed]")


def test_duration_bound(tmp_path: Path, agents: list[AgentProcess]) -> None:
    agent = start(
        agents, ["run", "--config", str(write_config(tmp_path)), "--duration", "0.5"], base_env()
    )
    assert agent.wait() == 0
    assert "run duration of 0.5 s reached" in "\n".join(agent.stderr)


def test_help_teaches_with_examples() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for needle in ("--config FILE", "--frames N", "--duration S", "Examples:", "SIGTERM"):
        assert needle in out


# -- bad input: one clear error line, no traceback -------------------------------------------


def test_unknown_key(tmp_path: Path, agents: list[AgentProcess]) -> None:
    config = write_config(tmp_path, "[pinning]\nproccess = 1\n")
    agent = start(agents, ["run", "--config", str(config)], base_env())
    assert_one_error_line(
        agent, "config_invalid", "line 3: pinning.proccess", "did you mean 'process'"
    )


def test_wrong_type(tmp_path: Path, agents: list[AgentProcess]) -> None:
    config = write_config(tmp_path, 'stop_timeout_s = "later"\n')
    agent = start(agents, ["run", "--config", str(config)], base_env())
    assert_one_error_line(
        agent, "config_invalid", "line 2: stop_timeout_s", "valid number", "fix them"
    )


def test_cpu_outside_allowed_set(tmp_path: Path, agents: list[AgentProcess]) -> None:
    outside = max(allowed_cpus()) + 1
    config = write_config(tmp_path, f"[pinning]\nprocess = [{outside}]\n")
    agent = start(agents, ["run", "--config", str(config)], base_env())
    assert_one_error_line(
        agent, "pinning_invalid", "pinning.process", str(outside), "use CPUs from"
    )
    assert not (tmp_path / "state").exists()  # failed before the state dir step


def test_missing_config_file(tmp_path: Path, agents: list[AgentProcess]) -> None:
    agent = start(agents, ["run", "--config", str(tmp_path / "nope.toml")], base_env())
    assert_one_error_line(agent, "config_unreadable", "does not exist", "create it")


def test_state_dir_under_a_file(tmp_path: Path, agents: list[AgentProcess]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = write_config(tmp_path, state=blocker / "state")
    agent = start(agents, ["run", "--config", str(config)], base_env())
    assert_one_error_line(agent, "state_dir_unusable", str(blocker / "state"), "set state_dir")


def test_debug_shows_traceback(tmp_path: Path, agents: list[AgentProcess]) -> None:
    agent = start(agents, ["--debug", "run", "--config", str(tmp_path / "nope.toml")], base_env())
    assert agent.wait() == 1
    assert any("Traceback" in line for line in agent.stderr)


def unprivileged() -> list[str]:
    """A command prefix that makes file modes count: as root, a new user namespace without
    mappings keeps our uid on files but drops the capabilities that override their modes."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed to drop root's file override"
    return [unshare, "--user", "--"]


def test_unreadable_config(tmp_path: Path, agents: list[AgentProcess]) -> None:
    config = write_config(tmp_path)
    config.chmod(0)
    agent = start(agents, ["run", "--config", str(config)], base_env(), prefix=unprivileged())
    assert_one_error_line(
        agent, "config_unreadable", "cannot be read", "Permission denied", "make it readable"
    )


def test_state_dir_without_permission(tmp_path: Path, agents: list[AgentProcess]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    config = write_config(tmp_path, state=locked / "state")
    agent = start(agents, ["run", "--config", str(config)], base_env(), prefix=unprivileged())
    assert_one_error_line(agent, "state_dir_unusable", "Permission denied", "set state_dir")


def test_embedded_defaults_run_the_street_pipeline(
    tmp_path: Path,
    model_search_path: str,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # in-process, so the default config path can point at a file that does not exist
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("EDGE_AGENT_MODEL_PATH", model_search_path)  # detectors + SmolLM2
    monkeypatch.setenv("EDGE_AGENT_DATA_PATH", str(data_dir))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert main(["run", "--frames", "2"]) == 0  # the LLM pipeline does not hold a bounded run
    messages = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    detections = [m for m in messages if m["topic"] == "vision/street/detections"]
    assert len(detections) == 2
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert [p["model"] for p in status["pipelines"]] == [
        "yolox_nano_416",
        "smollm2-135m-instruct-q4_1",
    ]
