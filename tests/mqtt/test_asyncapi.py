"""docs/asyncapi.yaml: regenerated from the pydantic models it must equal the file (drift
fails), every reference resolves, and real messages captured from a broker validate against the
schemas of the channels they arrived on."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from broker_support import MosquittoBroker, close_monitor, open_monitor
from commands_support import envelope, signed
from jsonschema import Draft202012Validator
from test_mqtt_commands import Agentish

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gen_asyncapi  # noqa: E402


def test_document_matches_the_models() -> None:
    """Equal text means an equal document: the file is exactly what the models generate."""
    current = (ROOT / "docs" / "asyncapi.yaml").read_text(encoding="utf-8")
    assert current == gen_asyncapi.render(), "docs/asyncapi.yaml drifted: run tools/gen_asyncapi.py"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return out + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_document_is_asyncapi_3_and_every_reference_resolves() -> None:
    doc = gen_asyncapi.build_document()
    assert doc["asyncapi"].startswith("3.")
    refs = _refs(doc)
    assert len(refs) > 30
    for ref in refs:
        _resolve(doc, ref)  # KeyError names a dangling reference
    for op in doc["operations"].values():
        assert op["action"] in ("send", "receive")
    for channel in doc["channels"].values():
        params = set(re.findall(r"{(\w+)}", channel["address"]))
        assert params == set(channel["parameters"])


def _channel_for(doc: dict[str, Any], topic: str) -> str | None:
    for cid, channel in doc["channels"].items():
        pattern = re.sub(r"\\{\w+\\}", "[^/]+", re.escape(channel["address"]))
        if re.fullmatch(pattern, topic):
            return cid
    return None


def _validator(doc: dict[str, Any], cid: str) -> Draft202012Validator:
    (msg_ref,) = [m["$ref"] for m in doc["channels"][cid]["messages"].values()]
    payload_ref = _resolve(doc, msg_ref)["payload"]["$ref"]
    return Draft202012Validator({"$ref": payload_ref, "components": doc["components"]})


def test_real_messages_validate_against_their_channels(
    broker: MosquittoBroker, device: str, tmp_path: Path
) -> None:
    doc = gen_asyncapi.build_document()
    a = Agentish(broker, device, tmp_path, mqtt={"home_assistant": {}})
    ha = open_monitor(broker, f"homeassistant/sensor/{device}/#")
    try:
        rep = a.rt.reporter
        rep.set_status("degraded", reason="test", models=["yolox"], pipelines={"street": "running"})
        rep.publish(
            "vision/street/detections",
            {"pipeline": "street", "frame": 1, "detections": [{"label": "car", "score": 0.9}]},
        )
        rep.publish("vision/street/events", {"event": "line_crossed", "label": "car"})
        rep.publish("llm/req-1/stream", {"text": "Hel"})
        rep.publish("llm/req-1/result", {"text": "Hello", "tokens": 2})
        rep.publish_telemetry({"street": {"fps": 10.0}})
        assert a.rt.discovery is not None
        assert a.rt.discovery.update({"street": ["car", "person"]}) == 4
        a.send("status.get", envelope(), corr="s")
        a.send(
            "model.load", signed(envelope(args={"name": "m"}), "model.load", a.key, device=device)
        )
        a.replies("s")
        assert rep.flush(10)
        time.sleep(0.3)
        got = a.mon.snapshot() + ha.wait_count(lambda _m: True, 4)
    finally:
        close_monitor(ha)
        a.close()
    seen: dict[str, int] = {}
    for m in got:
        cid = _channel_for(doc, m.topic)  # Response Topics under reply/ match the reply channel
        assert cid is not None, f"{m.topic} is not a documented channel"
        errors = list(_validator(doc, cid).iter_errors(json.loads(m.payload)))
        assert not errors, f"{m.topic}: {errors[0].message}"
        seen[cid] = seen.get(cid, 0) + 1
    assert set(seen) == set(doc["channels"]), (
        f"channels without a real message: {set(doc['channels']) - set(seen)}"
    )


def test_a_message_that_breaks_the_schema_is_caught() -> None:
    doc = gen_asyncapi.build_document()
    bad = {"device_id": "d", "boot_id": "b", "seq": -1, "ts": 0, "state": "sleeping"}
    errors = list(_validator(doc, "status").iter_errors(bad))
    assert len(errors) >= 2  # seq < 0, unknown state, missing fields
    with pytest.raises(KeyError):
        _resolve(doc, "#/components/schemas/NoSuchThing")
