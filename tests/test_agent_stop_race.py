"""SIGTERM must stop the agent whatever its main thread is doing when the signal lands.

Python runs a signal handler in the main thread between two bytecodes. ``Agent.run()`` spends
its life in ``stop_event.wait(tick)``, which holds the event's internal lock for a few
bytecodes per tick; a handler that called ``stop_event.set()`` there (as ``edge-agent run``
once did) waited for that lock forever — the agent reached READY, then ignored SIGTERM until
it was SIGKILLed (seen once under load in tests/bundles/test_crash_points.py). The window is
microseconds wide, so these tests make the main thread hold the lock on purpose when the
signal is delivered (a real ``kill``) instead of hoping to hit it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from agent_process_support import base_env

ROOT = Path(__file__).resolve().parents[1]

# The child: the agent's own stop event and stop_on_signals (what `edge-agent run` uses).
_CHILD = textwrap.dedent(
    """
    import logging, os, signal, sys, threading
    from agent.config import AgentConfig
    from agent.process import Agent, stop_on_signals

    logging.basicConfig(level=logging.INFO)
    sig = signal.Signals[sys.argv[1]]
    agent = Agent(AgentConfig(), environ={})
    before = signal.getsignal(sig)
    with stop_on_signals(agent.request_stop):
        # the main thread inside Event.wait()'s critical section, as in Agent.run()
        with agent.stop_event._cond:
            os.kill(os.getpid(), sig)
            for _ in range(100_000):  # eval-breaker checks: the Python handler runs in here
                pass
        stopped = agent.stop_event.wait(30)
    restored = signal.getsignal(sig) is before
    relays = [t.name for t in threading.enumerate() if t.name == "signal-relay"]
    print(f"stopped={stopped} restored={restored} relays={relays}", flush=True)
    """
)


def _run_child(sig: signal.Signals) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, sig.name],
        cwd=ROOT,
        env=base_env(PYTHONFAULTHANDLER="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # the deadlock: SIGABRT makes faulthandler dump stacks
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{sig.name} did not stop the agent; its stacks:\n{err[-4000:]}")
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_while_main_thread_holds_the_stop_event_lock(sig: signal.Signals) -> None:
    code, out, err = _run_child(sig)
    assert code == 0, err[-2000:]
    assert out.strip() == "stopped=True restored=True relays=[]", err[-2000:]
    assert f"{sig.name} received; stopping" in err


def test_outside_the_main_thread_it_installs_nothing() -> None:
    """A thread cannot install signal handlers: the context manager then leaves them alone."""
    code = textwrap.dedent(
        """
        import signal, threading
        from agent.process import stop_on_signals
        before = signal.getsignal(signal.SIGTERM)
        seen = []
        def body():
            with stop_on_signals(lambda: None):
                seen.append(signal.getsignal(signal.SIGTERM) is before)
        t = threading.Thread(target=body)
        t.start()
        t.join()
        print(seen)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[True]"
