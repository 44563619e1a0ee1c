"""The command dispatcher: decides on every received command, runs it, replies exactly once.

Decision order for one ``cmd/{command}`` message (first match wins; reason code in brackets)::

    payload over max_payload_bytes             -> rejected (payload_too_large)
    not UTF-8 JSON                             -> rejected (bad_json)
    not an envelope (schema)                   -> rejected (schema_invalid)
    command_id already decided                 -> no reply, audited (replayed)    [the drop]
    -- from here the command_id is remembered: whatever follows is its one terminal reply --
    expires_at passed                          -> expired  (expired)
    expires_at <= issued_at                    -> rejected (validity_invalid)
    issued_at ahead of the clock by > skew     -> rejected (clock_skew)
    expires_at - issued_at > max_validity_s    -> rejected (validity_too_long)
    no such command                            -> rejected (unknown_command)
    args do not fit the command's model        -> rejected (args_invalid)
    signature missing / bad (signed classes)   -> rejected (signature_required |
                                                  signature_malformed | signature_invalid |
                                                  key_unknown)
    class token bucket empty                   -> busy     (rate_limited)
    dispatcher queue full                      -> busy     (queue_full)
    the same long-running command still runs   -> busy     (busy)
    a long-running command slot taken          -> busy     (long_command_running)
    handler returns                            -> succeeded (ok)
    handler raises CommandError(status="busy") -> busy     (its reason, e.g. control_busy)
    handler raises                             -> failed   (its reason, or internal_error)

A replayed command_id gets no second reply: its first decision was its one terminal reply (a
QoS 1 redelivery or a replay attack look the same); the drop is audited (decision
``rejected``, reason ``replayed``, ``replied: false``). Retry a command with a new command_id.

Threads: ``submit`` (the MQTT owner thread) only queues; one worker thread decides and runs
short commands; each long-running command runs on its own thread after an ``accepted`` reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agent.commands.audit import AuditLog
from agent.commands.inbound import InboundCommand, ReplyBody, ReplySink
from agent.commands.ratelimit import TokenBucket
from agent.commands.registry import (
    COMMAND_NAME_PATTERN,
    CommandContext,
    CommandError,
    CommandRegistry,
    CommandSpec,
)
from agent.commands.replay import ReplayGuard
from agent.commands.signing import SignatureError, TrustedKeys
from agent.errors import AgentError, ReportingError, reason_code
from agent.reporting.messages import COMMAND_ID_PATTERN, AuditRecord, CommandEnvelope, ReplyStatus
from engines.errors import EngineError
from pipelines.errors import PipelineError

__all__ = ["CommandDispatcher", "Decision", "DispatchSettings"]

_log = logging.getLogger(__name__)
_ID_RE = re.compile(COMMAND_ID_PATTERN)


@dataclass(frozen=True)
class DispatchSettings:
    """See ``agent.mqtt_config.CommandsConfig`` for each field."""

    max_payload_bytes: int = 65536
    max_clock_skew_s: float = 30.0
    max_validity_s: float = 3600.0
    replay_retention_s: float = 86400.0
    queue_size: int = 64
    max_long_running: int = 1
    signed_classes: frozenset[str] = frozenset({"critical"})
    rate_limits: Mapping[str, tuple[float, int]] = field(
        default_factory=lambda: {"read": (5.0, 20), "control": (1.0, 5), "critical": (0.2, 3)}
    )


@dataclass(frozen=True)
class Decision:
    """What happened to one command (also what the audit record says)."""

    status: ReplyStatus
    reason: str
    message: str
    command_id: str | None
    replied: bool = True
    signed: bool = False
    key_id: str | None = None
    result: Mapping[str, Any] | None = None


@dataclass
class _Parsed:
    raw: dict[str, Any] | None = None
    envelope: CommandEnvelope | None = None
    command_id: str | None = None
    signed: bool = False
    key_id: str | None = None


class CommandDispatcher:
    def __init__(
        self,
        *,
        device_id: str,
        registry: CommandRegistry,
        replies: ReplySink,
        guard: ReplayGuard,
        keys: TrustedKeys,
        audit: AuditLog,
        settings: DispatchSettings | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.registry = registry
        self.replies = replies
        self.guard = guard
        self.keys = keys
        self.audit = audit
        self.settings = settings or DispatchSettings()
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {
            cls: TokenBucket(rate, burst, clock=monotonic)
            for cls, (rate, burst) in self.settings.rate_limits.items()
        }
        self._queue: queue.Queue[InboundCommand | None] = queue.Queue(self.settings.queue_size)
        self._decide_lock = threading.Lock()
        self._long_lock = threading.Lock()
        self._long: set[threading.Thread] = set()
        self._worker: threading.Thread | None = None
        self.decisions: dict[str, int] = {}

    # --- threads ---------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="cmd-dispatcher", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the queued commands, then join the worker and running long commands."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout)
            if self._worker.is_alive():
                _log.error("command dispatcher did not stop within %.1f s", timeout)
            self._worker = None
        with self._long_lock:
            running = list(self._long)
        for t in running:
            t.join(timeout)
            if t.is_alive():
                _log.error("long command thread %s did not stop within %.1f s", t.name, timeout)

    def submit(self, inbound: InboundCommand) -> None:
        """Hand over a received command (never blocks; a full queue answers busy)."""
        try:
            self._queue.put_nowait(inbound)
        except queue.Full:
            self.handle(inbound, overflow=True)

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                self.handle(item)
            except Exception:  # noqa: BLE001 - one bad command must not stop the dispatcher
                _log.exception("command dispatcher: unexpected error on %s", item.topic)

    # --- decisions -------------------------------------------------------------------------

    def handle(self, inbound: InboundCommand, *, overflow: bool = False) -> Decision:
        """Decide on one command, run it (short ones inline), reply, audit; the decision."""
        with self._decide_lock:
            parsed = _Parsed()
            decision, spec = self._decide(inbound, parsed, overflow=overflow)
        if decision is None and spec is not None and parsed.envelope is not None:
            if spec.long_running:
                decision = self._start_long(inbound, spec, parsed)
            else:
                decision = self._execute(inbound, spec, parsed)
        if decision is None:  # pragma: no cover - _decide returns a decision or a spec
            decision = Decision("failed", "internal_error", "no decision", parsed.command_id)
        self._finish(inbound, decision)
        return decision

    def _decide(
        self, inbound: InboundCommand, parsed: _Parsed, *, overflow: bool
    ) -> tuple[Decision | None, CommandSpec | None]:
        s = self.settings
        size = len(inbound.payload)
        if size > s.max_payload_bytes:
            return self._no(
                "rejected",
                "payload_too_large",
                f"payload is {size} bytes, over the limit of {s.max_payload_bytes}",
                None,
            ), None
        try:
            raw = json.loads(inbound.payload.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return self._no(
                "rejected", "bad_json", f"payload is not UTF-8 JSON: {_short(exc)}", None
            ), None
        if not isinstance(raw, dict):
            return self._no(
                "rejected",
                "schema_invalid",
                f"envelope must be a JSON object, not {type(raw).__name__}",
                None,
            ), None
        parsed.raw = raw
        cid = raw.get("command_id")
        parsed.command_id = cid if isinstance(cid, str) and _ID_RE.match(cid) else None
        try:
            env = CommandEnvelope.model_validate(raw)
        except ValidationError as exc:
            return self._no(
                "rejected", "schema_invalid", _first_error(exc), parsed.command_id
            ), None
        parsed.envelope = env
        now = self._clock()
        if not (math.isfinite(env.issued_at) and math.isfinite(env.expires_at)):
            return self._no(
                "rejected", "schema_invalid", "issued_at/expires_at must be finite", env.command_id
            ), None
        forget_at = max(env.expires_at, now) + s.replay_retention_s
        if not self.guard.check_and_remember(env.command_id, forget_at):
            return Decision(
                "rejected",
                "replayed",
                f"command_id {env.command_id} was already decided; not run again",
                env.command_id,
                replied=False,
            ), None
        if now > env.expires_at:
            return self._no(
                "expired", "expired", f"expired {now - env.expires_at:.1f} s ago", env.command_id
            ), None
        if env.expires_at <= env.issued_at:
            return self._no(
                "rejected", "validity_invalid", "expires_at must be after issued_at", env.command_id
            ), None
        if env.issued_at > now + s.max_clock_skew_s:
            return self._no(
                "rejected",
                "clock_skew",
                f"issued_at is {env.issued_at - now:.1f} s in the future (max skew "
                f"{s.max_clock_skew_s:g} s): check the sender's clock",
                env.command_id,
            ), None
        if env.expires_at - env.issued_at > s.max_validity_s:
            return self._no(
                "rejected",
                "validity_too_long",
                f"validity {env.expires_at - env.issued_at:.0f} s exceeds {s.max_validity_s:g} s",
                env.command_id,
            ), None
        spec = (
            self.registry.get(inbound.command)
            if COMMAND_NAME_PATTERN.match(inbound.command)
            else None
        )
        if spec is None:
            return self._no(
                "rejected",
                "unknown_command",
                f"unknown command {inbound.command[:64]!r}; known: "
                + ", ".join(self.registry.names()),
                env.command_id,
            ), None
        if spec.args_model is not None:
            try:
                parsed.envelope = env.model_copy(
                    update={"args": spec.args_model.model_validate(env.args)}
                )
            except ValidationError as exc:
                return self._no("rejected", "args_invalid", _first_error(exc), env.command_id), None
        signed, key_id = False, None
        if spec.command_class in s.signed_classes or env.signature is not None:
            try:
                key_id = self.keys.verify(raw, inbound.command, self.device_id)
                signed = True
            except SignatureError as exc:
                return self._no("rejected", exc.reason, str(exc), env.command_id), None
        bucket = self._buckets.get(spec.command_class)
        if bucket is not None and not bucket.take():
            return self._no(
                "busy",
                "rate_limited",
                f"too many {spec.command_class} commands; retry later with a new command_id",
                env.command_id,
                signed,
                key_id,
            ), None
        if overflow:
            return self._no(
                "busy",
                "queue_full",
                "command queue is full; retry later",
                env.command_id,
                signed,
                key_id,
            ), None
        parsed.signed, parsed.key_id = signed, key_id
        return None, spec

    def _no(  # noqa: PLR0917 - mirrors Decision's fields
        self,
        status: ReplyStatus,
        reason: str,
        message: str,
        command_id: str | None,
        signed: bool = False,
        key_id: str | None = None,
    ) -> Decision:
        return Decision(status, reason, message, command_id, signed=signed, key_id=key_id)

    def _context(self, inbound: InboundCommand, parsed: _Parsed) -> CommandContext:
        env = parsed.envelope
        if env is None:  # pragma: no cover - only called after validation
            raise RuntimeError("no envelope")

        def progress(fraction: float, message: str) -> None:
            self._reply(
                inbound,
                ReplyBody(
                    env.command_id,
                    inbound.command,
                    "progress",
                    "in_progress",
                    message,
                    progress=min(max(float(fraction), 0.0), 1.0),
                ),
            )

        return CommandContext(
            command=inbound.command,
            command_id=env.command_id,
            args=env.args,
            issued_at=env.issued_at,
            expires_at=env.expires_at,
            key_id=parsed.key_id,
            progress=progress,
        )

    def _execute(self, inbound: InboundCommand, spec: CommandSpec, parsed: _Parsed) -> Decision:
        signed, key_id = parsed.signed, parsed.key_id
        cid = parsed.envelope.command_id if parsed.envelope else None
        try:
            result = spec.handler(self._context(inbound, parsed))
            out = dict(result) if result is not None else None
            if out is not None:
                json.dumps(out, allow_nan=False)
        except CommandError as exc:
            return Decision(exc.status, exc.reason, str(exc), cid, signed=signed, key_id=key_id)
        except (TypeError, ValueError) as exc:
            _log.exception("command %s (%s): bad result or error", inbound.command, cid)
            return Decision(
                "failed", "internal_error", _short(exc), cid, signed=signed, key_id=key_id
            )
        except (AgentError, EngineError, PipelineError) as exc:
            _log.warning("command %s (%s) failed [%s]: %s", inbound.command, cid, exc.reason, exc)
            return Decision(
                "failed", reason_code(exc), _short(exc), cid, signed=signed, key_id=key_id
            )
        except Exception as exc:  # noqa: BLE001 - a handler error is a failed reply, never a crash
            _log.exception("command %s (%s) failed", inbound.command, cid)
            return Decision(
                "failed", reason_code(exc), _short(exc), cid, signed=signed, key_id=key_id
            )
        return Decision(
            "succeeded",
            "ok",
            f"{inbound.command} done",
            cid,
            signed=signed,
            key_id=key_id,
            result=out,
        )

    def _start_long(
        self, inbound: InboundCommand, spec: CommandSpec, parsed: _Parsed
    ) -> Decision | None:
        cid = parsed.envelope.command_id if parsed.envelope else None
        with self._long_lock:
            self._long = {t for t in self._long if t.is_alive()}
            thread_name = f"cmd-{inbound.command}"
            if any(t.name == thread_name for t in self._long):
                return Decision("busy", "busy", f"another {inbound.command} is running", cid)
            if len(self._long) >= self.settings.max_long_running:
                return Decision(
                    "busy", "long_command_running", "another long command is running", cid
                )
            self._reply(
                inbound,
                ReplyBody(
                    cid, inbound.command, "accepted", "accepted", f"{inbound.command} started"
                ),
            )

            def run() -> None:
                decision = self._execute(inbound, spec, parsed)
                self._finish(inbound, decision)

            t = threading.Thread(target=run, name=thread_name, daemon=True)
            self._long.add(t)
            t.start()
        return _DEFERRED

    def _finish(self, inbound: InboundCommand, decision: Decision) -> None:
        if decision is _DEFERRED:
            return
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        topic = None
        if decision.replied:
            topic = self._reply(
                inbound,
                ReplyBody(
                    decision.command_id,
                    inbound.command,
                    decision.status,
                    decision.reason,
                    decision.message,
                    result=decision.result,
                ),
            )
        self.audit.append(
            AuditRecord(
                ts=self._clock(),
                command_id=decision.command_id,
                command=inbound.command[:128],
                decision=decision.status,
                reason=decision.reason,
                message=decision.message[:500],
                replied=decision.replied and topic is not None,
                signed=decision.signed,
                key_id=decision.key_id,
                payload_bytes=len(inbound.payload),
                payload_sha256=hashlib.sha256(inbound.payload).hexdigest(),
                response_topic=topic,
            )
        )

    def _reply(self, inbound: InboundCommand, body: ReplyBody) -> str | None:
        try:
            return self.replies.send_reply(inbound, body)
        except ReportingError as exc:
            _log.error(
                "reply %s/%s for %s not queued: %s", body.status, body.reason, body.command_id, exc
            )
            return None


_DEFERRED = Decision("accepted", "accepted", "running", None, replied=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid"
    err = errors[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "envelope"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {err.get('msg', 'invalid')}{more}"[:300]
