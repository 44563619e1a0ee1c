"""The command dispatcher in-process (real SQLite replay store, real audit file, real Ed25519):
every decision path, exactly one terminal reply, and a hypothesis fuzz of >= 10,000 payloads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from commands_support import (
    Recorder,
    envelope,
    inbound,
    make_dispatcher,
    make_keys,
    signed,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands.dispatcher import DispatchSettings
from agent.commands.signing import TrustedKeys
from agent.errors import TrustedKeyError
from agent.reporting.messages import TERMINAL_STATUSES, AuditRecord


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def _terminal(rec: Recorder) -> list[Any]:
    return [body for _, body in rec.replies if body.terminal]


def test_status_get_succeeds_with_the_agent_status(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec)
    decision = d.handle(inbound("status.get", envelope()))
    assert (decision.status, decision.reason) == ("succeeded", "ok")
    (body,) = _terminal(rec)
    assert body.result == {"state": "running", "pipelines": {"street": "running"}}


def test_config_get_redacts_secrets(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec)
    d.handle(inbound("config.get", envelope()))
    (body,) = _terminal(rec)
    mqtt = body.result["reporting"]["mqtt"]
    assert mqtt == {"host": "h", "password": "***", "password_file": None}
    assert "hunter2" not in json.dumps(body.result)


@pytest.mark.parametrize(
    ("command", "payload", "status", "reason"),
    [
        ("status.get", b"{not json", "rejected", "bad_json"),
        ("status.get", b"\xff\xfe", "rejected", "bad_json"),
        ("status.get", b'{"command_id": "a", "issued_at": NaN}', "rejected", "bad_json"),
        ("status.get", b"[1, 2]", "rejected", "schema_invalid"),
        ("status.get", b'{"command_id": "x1"}', "rejected", "schema_invalid"),
        ("no.such", None, "rejected", "unknown_command"),
        ("status.get", {"args": {"unexpected": 1}}, "rejected", "args_invalid"),
        ("model.load", {"args": {"name": "yolox"}}, "rejected", "signature_required"),
        ("test.explode", None, "failed", "internal_error"),
    ],
)
def test_bad_commands_get_one_terminal_reply_with_a_stable_reason(  # noqa: PLR0917
    tmp_path: Path,
    rec: Recorder,
    command: str,
    payload: bytes | dict[str, Any] | None,
    status: str,
    reason: str,
) -> None:
    d = make_dispatcher(tmp_path, rec)
    if payload is None or isinstance(payload, dict):
        payload = envelope(**(payload or {}))
    decision = d.handle(inbound(command, payload))
    assert (decision.status, decision.reason) == (status, reason)
    (body,) = _terminal(rec)
    assert (body.status, body.reason) == (status, reason)
    assert body.message


def test_payload_over_the_limit_is_rejected_unread(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec, settings=DispatchSettings(max_payload_bytes=300))
    decision = d.handle(inbound("status.get", b"{" + b" " * 400 + b"}"))
    assert (decision.status, decision.reason, decision.command_id) == (
        "rejected",
        "payload_too_large",
        None,
    )


def test_expired_and_skewed_and_overlong_commands(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec)
    now = time.time()
    cases = [
        (envelope(issued=now - 120, ttl=60), "expired", "expired"),
        (envelope(issued=now + 600, ttl=60), "rejected", "clock_skew"),
        (envelope(issued=now, ttl=7200), "rejected", "validity_too_long"),
        ({**envelope(), "expires_at": now - 1, "issued_at": now - 0.5}, "expired", "expired"),
    ]
    for env, status, reason in cases:
        decision = d.handle(inbound("status.get", env))
        assert (decision.status, decision.reason) == (status, reason), env


def test_a_replayed_command_id_runs_once_and_gets_no_second_reply(
    tmp_path: Path, rec: Recorder
) -> None:
    key = make_keys(tmp_path / "keys")
    loads: list[str] = []
    d = make_dispatcher(tmp_path, rec, loads=loads)
    env = signed(envelope(args={"name": "yolox"}), "model.load", key)
    first = d.handle(inbound("model.load", env))
    again = d.handle(inbound("model.load", env))
    assert (first.status, again.status, again.reason, again.replied) == (
        "succeeded",
        "rejected",
        "replayed",
        False,
    )
    assert loads == ["yolox"]
    assert len(_terminal(rec)) == 1
    # the replay is audited, in the file and on the event publisher
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(x["decision"], x["reason"], x["replied"]) for x in lines] == [
        ("succeeded", "ok", True),
        ("rejected", "replayed", False),
    ]


def test_replay_memory_survives_a_restart(tmp_path: Path, rec: Recorder) -> None:
    env = envelope()
    make_dispatcher(tmp_path, rec).handle(inbound("status.get", env))
    again = make_dispatcher(tmp_path, rec).handle(inbound("status.get", env))
    assert again.reason == "replayed"


def test_signatures(tmp_path: Path, rec: Recorder) -> None:
    key = make_keys(tmp_path / "keys")
    other = make_keys(tmp_path / "elsewhere", "rogue")
    d = make_dispatcher(tmp_path, rec)
    good = signed(envelope(args={"name": "a"}), "model.load", key)
    assert d.handle(inbound("model.load", good)).status == "succeeded"
    tampered = signed(envelope(args={"name": "a"}), "model.load", key)
    tampered["args"] = {"name": "b"}
    forged = signed(envelope(args={"name": "a"}), "model.load", other, key_id="ops")
    unknown = signed(envelope(args={"name": "a"}), "model.load", other, key_id="rogue")
    redirected = signed(envelope(args={"name": "a"}), "model.unload", key)
    garbage = {**envelope(args={"name": "a"}), "signature": "!!!not base64!!!"}
    expected = [
        (tampered, "signature_invalid"),
        (forged, "signature_invalid"),
        (unknown, "key_unknown"),
        (redirected, "signature_invalid"),
        (garbage, "signature_malformed"),
    ]
    for env, reason in expected:
        decision = d.handle(inbound("model.load", env))
        assert (decision.status, decision.reason) == ("rejected", reason)
    assert (
        d.handle(
            inbound("model.load", signed(envelope(args={"name": "missing"}), "model.load", key))
        ).reason
        == "model_not_found"
    )


def test_rate_limit_answers_busy(tmp_path: Path, rec: Recorder) -> None:
    t = [0.0]
    s = DispatchSettings(rate_limits={"read": (1.0, 2)})
    d = make_dispatcher(tmp_path, rec, settings=s)
    d._buckets["read"]._clock = lambda: t[0]  # drive the bucket's clock deterministically
    d._buckets["read"]._t = 0.0
    reasons = [d.handle(inbound("status.get", envelope())).reason for _ in range(3)]
    assert reasons == ["ok", "ok", "rate_limited"]
    t[0] = 1.0
    assert d.handle(inbound("status.get", envelope())).reason == "ok"


def test_long_command_sends_accepted_progress_then_one_terminal(
    tmp_path: Path, rec: Recorder
) -> None:
    d = make_dispatcher(tmp_path, rec)
    d.handle(inbound("job.slow", envelope()))
    d.stop()  # joins the long-running thread
    statuses = [body.status for _, body in rec.replies]
    assert statuses == ["accepted", "progress", "progress", "progress", "succeeded"]
    assert [body.progress for _, body in rec.replies][1:4] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_the_same_long_command_again_is_busy(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec, settings=DispatchSettings(max_long_running=2))
    first = d.handle(inbound("job.slow", envelope()))
    second = d.handle(inbound("job.slow", envelope()))
    d.stop()
    assert first.status == "accepted"
    assert (second.status, second.reason) == ("busy", "busy")
    assert second.message == "another job.slow is running"


def test_another_long_command_over_the_limit_is_busy(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec)
    first = d.handle(inbound("job.slow", envelope()))
    second = d.handle(inbound("job.other", envelope()))
    d.stop()
    assert first.status == "accepted"
    assert (second.status, second.reason) == ("busy", "long_command_running")


def test_full_queue_answers_busy(tmp_path: Path, rec: Recorder) -> None:
    d = make_dispatcher(tmp_path, rec, settings=DispatchSettings(queue_size=1))
    d.submit(inbound("status.get", envelope()))  # worker not started: stays queued
    d.submit(inbound("status.get", envelope()))
    (body,) = _terminal(rec)
    assert (body.status, body.reason) == ("busy", "queue_full")
    d.start()
    d.stop()
    assert [b.reason for b in _terminal(rec)] == ["queue_full", "ok"]


def test_bad_trusted_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "broken.pub").write_text("not a key")
    with pytest.raises(TrustedKeyError, match=r"broken\.pub"):
        TrustedKeys(tmp_path / "k")


# --- fuzz -----------------------------------------------------------------------------------

_valid_ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=10).filter(
    lambda x: x[0] != "-"
)
_ids = st.one_of(
    _valid_ids,
    _valid_ids,
    _valid_ids,
    st.sampled_from(["a", "b", "c1", "dup-1"]),
    st.one_of(st.text(max_size=20), st.integers(), st.none()),
)
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


class _Rel(float):
    """A time offset from the clock at test time (strategies must not read the clock)."""


@st.composite
def _envelopes(draw: st.DrawFn) -> dict[str, Any]:
    env: dict[str, Any] = {}
    rare = st.integers(0, 9)  # hypothesis favours 0: the common (valid) case is 0..8
    if draw(rare) < 9:
        env["command_id"] = draw(_ids)
    near = st.floats(-100, 100).map(_Rel)
    wide = st.one_of(st.floats(-5000, 9000).map(_Rel), _json)
    env["issued_at"] = draw(st.one_of(st.just(_Rel(0)), near, wide))
    env["expires_at"] = draw(st.one_of(st.just(_Rel(60)), near.map(lambda r: _Rel(r + 120)), wide))
    if draw(rare) < 7:
        env["args"] = draw(st.sampled_from([{}, {"name": "m"}, {"name": ""}]) | _json)
    if draw(rare) == 9:
        env["signature"] = draw(st.one_of(st.text(max_size=90), st.just("A" * 88)))
    if draw(rare) == 9:
        env[draw(st.text(max_size=6))] = draw(_json)
    return env


def _materialise(payload: bytes | Any, now: float) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, dict):
        payload = {k: (now + v if isinstance(v, _Rel) else v) for k, v in payload.items()}
    return json.dumps(payload).encode()


_payloads = st.one_of(_envelopes(), _envelopes(), _envelopes(), st.binary(max_size=200), _json)
_commands = st.sampled_from(
    [
        "status.get",
        "config.get",
        "model.load",
        "job.slow",
        "test.explode",
        "no.such",
        "BAD name",
        "x" * 200,
    ]
)

FUZZ_BATCHES = 200
FUZZ_BATCH = 50  # 200 x 50 = 10,000 payloads


def check_one_reply_or_documented_drop(rec: Recorder, audits: list[AuditRecord], n: int) -> None:
    """Every message: exactly one terminal reply, or (replayed command_id) none and an audit."""
    terminal = [body for _, body in rec.replies if body.terminal]
    replayed = [a for a in audits if a.reason == "replayed"]
    assert all(not a.replied for a in replayed)
    assert len(terminal) + len(replayed) == n
    assert all(body.status in TERMINAL_STATUSES for body in terminal)


@pytest.mark.slow
@settings(
    max_examples=FUZZ_BATCHES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(st.tuples(_commands, _payloads), min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
def test_fuzz_ten_thousand_payloads_never_crash_and_reply_once(
    tmp_path_factory: pytest.TempPathFactory, batch: list[tuple[str, Any]]
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    make_keys(tmp / "keys")
    rec = Recorder()
    s = DispatchSettings(rate_limits={"read": (1000.0, 1000), "control": (1000.0, 1000)})
    d = make_dispatcher(tmp, rec, settings=s)
    d.audit.set_publisher(None)
    now = time.time()
    decisions = [d.handle(inbound(command, _materialise(p, now))) for command, p in batch]
    d.stop()
    audits = [
        AuditRecord.model_validate_json(x) for x in (tmp / "audit.jsonl").read_text().splitlines()
    ]
    # long-running ones reply accepted + terminal from their thread; all are done after stop()
    assert len(audits) == len(batch)
    check_one_reply_or_documented_drop(rec, audits, len(batch))
    assert all(decision.reason for decision in decisions)
