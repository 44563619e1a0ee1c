"""``llm.generate`` / ``llm.cancel`` round trips through a real mosquitto into the agent with a
real LLM pipeline: the reply names the request, the stream chunks reassemble to the result
text, a cancel replies how far the request got, a full queue replies busy."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mqtt"))

from broker_support import (
    PASSWORD,
    MosquittoBroker,
    close_monitor,
    open_monitor,
    running_broker,
)
from commands_support import envelope
from llm_support import SMOLLM, model_store

from agent.config import AgentConfig
from agent.process import Agent
from agent.reporting.messages import CommandReply

pytestmark = pytest.mark.slow

DEVICE = "dev095"  # one of the broker's device users (this module runs its own broker)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with running_broker() as b:
        yield b


def _config(broker: MosquittoBroker, tmp_path: Path) -> AgentConfig:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    store = model_store()
    return AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "state_dir": str(tmp_path / "state"),
            "models": {
                "store_dir": str(store.store_dir),
                "wheel_cache_dir": str(store.wheel_cache_dir),
            },
            "reporting": {
                "jsonl": {"enabled": False},
                "mqtt": {
                    "port": broker.port,
                    "username": DEVICE,
                    "password_file": str(tmp_path / "pw"),
                    "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.3,
                    "commands": {
                        "trusted_keys_dir": str(tmp_path / "keys"),
                        "rate_limits": {"control": {"rate_per_s": 50, "burst": 50}},
                    },
                },
            },
            "pipelines": [
                {
                    "type": "llm",
                    "name": "assistant",
                    "model": SMOLLM,
                    "engine": {"n_ctx": 1024, "n_batch": 64},
                    "queue_size": 1,
                    "defaults": {"temperature": 0.0, "max_tokens": 24},
                    "stream": {"flush_tokens": 4},
                }
            ],
        }
    )


def _command(mon: Any, name: str, args: dict[str, Any], tag: bytes) -> CommandReply:
    env = envelope(args=args)
    mon.send(
        f"edge/{DEVICE}/cmd/{name}",
        json.dumps(env),
        response_topic=f"edge/{DEVICE}/reply/ctl",
        correlation=tag,
    )
    found = mon.wait_for(lambda m: "/reply/" in m.topic and m.correlation == tag, timeout=60)
    assert found, f"no reply to {name}"
    return CommandReply.model_validate_json(found[-1].payload)


def test_generate_stream_cancel_and_busy_over_mqtt(broker: MosquittoBroker, tmp_path: Path) -> None:
    mon = open_monitor(broker, f"edge/{DEVICE}/#")
    agent = Agent(_config(broker, tmp_path), environ={})
    try:
        agent.start()
        assert agent.state == "ready", agent.status()
        assert agent.mqtt is not None
        assert agent.mqtt.reporter.wait_connected(10)

        reply = _command(
            mon,
            "llm.generate",
            {"messages": [{"role": "user", "content": "Name two colours."}]},
            b"g1",
        )
        assert reply.status == "succeeded", reply
        assert reply.result is not None
        rid = reply.result["request_id"]
        assert reply.result["result_topic"] == f"llm/{rid}/result"
        results = mon.wait_for(lambda m: m.topic == f"edge/{DEVICE}/llm/{rid}/result", 120)
        assert results, "no result message"
        result = json.loads(results[0].payload)
        assert result["status"] == "completed"
        chunks = [
            json.loads(m.payload)
            for m in mon.snapshot()
            if m.topic == f"edge/{DEVICE}/llm/{rid}/stream"
        ]
        chunks.sort(key=lambda c: c["index"])
        assert [c["index"] for c in chunks] == list(range(result["chunks"]))
        assert "".join(c["text"] for c in chunks) == result["text"] != ""
        assert result["source"] == "command"

        # a long request, a queued one, and one more: busy
        long = _command(mon, "llm.generate", {"prompt": COUNTING, "max_tokens": 1500}, b"g2")
        long_id = long.result["request_id"] if long.result else ""
        first = mon.wait_for(lambda m: m.topic == f"edge/{DEVICE}/llm/{long_id}/stream", 120)
        assert first, "the long request never streamed"
        queued = _command(mon, "llm.generate", {"prompt": "Hi"}, b"g3")
        assert queued.status == "succeeded"
        busy = _command(mon, "llm.generate", {"prompt": "Hi again"}, b"g4")
        assert (busy.status, busy.reason) == ("busy", "llm_queue_full")

        cancelled = _command(mon, "llm.cancel", {"request_id": long_id}, b"c1")
        assert cancelled.status == "succeeded", cancelled
        assert cancelled.result is not None
        assert cancelled.result["stage"] == "decode"
        assert cancelled.result["status"] == "cancelled"
        assert cancelled.result["completion_tokens"] > 0
        unknown = _command(mon, "llm.cancel", {"request_id": "nope"}, b"c2")
        assert (unknown.status, unknown.reason) == ("failed", "unknown_request")

        status = _command(mon, "status.get", {}, b"s1")
        assert status.result is not None
        (entry,) = status.result["pipelines"]
        assert (entry["type"], entry["state"]) == ("llm", "running")
        assert entry["status"]["counters"]["busy"] == 1
    finally:
        agent.stop()
        close_monitor(mon)
