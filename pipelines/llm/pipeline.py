"""The LLM pipeline: one llama.cpp context, a bounded request queue, one worker thread.

::

    submit() --bounded queue (full: PipelineBusyError)--> worker: prepare -> prompt eval ->
        decode -> TextAssembler -> Coalescer -> sink  llm/{request_id}/stream  (chunks)
                                                      llm/{request_id}/result  (final)
    monitor thread: deadlines (queued and running requests)
    cancel(): a queued request ends at once; the running one through the engine's abort flag

A llama context is not thread-safe, so only the worker touches the engine (``cancel`` and the
monitor only set its abort flag). Each request moves through ``queued`` -> ``prompt_eval`` ->
``decode`` -> ``done``, and ends ``completed`` (stop reason ``eos``, ``stop`` or ``length``),
``cancelled``, ``deadline_exceeded`` or ``failed`` (with the error's reason code) — exactly one
result message per submitted request.

KV reuse, best first (the one with the longest common prefix with the new prompt wins):

- the context itself: the tokens the cache holds now (the previous request's prompt and
  answer), kept up to the first differing token;
- the session (``session_id``): its messages are kept by the pipeline, a request sends only the
  new ones; after each completed turn the cache (prompt + answer) is saved, so turn N+1 is
  evaluated from where turn N ended even after other requests ran in between;
- the prefix cache: the KV state after the leading system messages of a chat, saved the first
  time such a prompt is evaluated and loaded by later prompts with the same system messages.

Result message (``llm/{request_id}/result``, schema ``edge-agent.llm.result`` v1)::

    {"request_id", "pipeline", "model", "session_id", "source",
     "status": "completed|cancelled|deadline_exceeded|failed", "stop_reason": "eos|stop|length",
     "stage": "queued|prompt_eval|decode|done", "text", "error": {"reason", "message"} | null,
     "chunks": N,
     "usage": {"prompt_tokens", "prompt_tokens_cached", "prompt_tokens_evaluated",
               "completion_tokens", "total_tokens"},
     "timing": {"queue_wait_ms", "prompt_eval_ms", "ttft_ms", "decode_ms",
                "decode_tokens_per_s", "publish_overhead_ms", "total_ms"},
     "cache": {"source": "context|session|prefix|none", "reused_tokens"}}

``ttft_ms`` runs from submission (queue wait included) to the first sampled token;
``decode_tokens_per_s`` counts decode steps after the first token over their time;
``publish_overhead_ms`` is the time spent handing chunks and the result to the sink.

Stream message (``llm/{request_id}/stream``, droppable): ``{"request_id", "index", "text",
"tokens"}`` with ``index`` 0, 1, 2, ... per request; the result's ``chunks`` says how many there
were, so a client can tell a dropped chunk from the end of the stream. (``seq`` is the
reporter's own per-boot message number.)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from engines.errors import EngineError, InferenceAbortedError, InputSpecError
from engines.llama import ChatPrompt, KvState, LlamaEngine, Sampling, common_prefix
from pipelines.base import Heartbeats, PipelineContext, ResolvedModel
from pipelines.errors import PipelineBusyError, PipelineError, PipelineStateError
from pipelines.llm.cache import KvLru, Session, SessionStore
from pipelines.llm.config import LlmPipelineConfig
from pipelines.llm.requests import GenerateRequest
from pipelines.llm.stream import Coalescer, TextAssembler
from pipelines.workers import WorkerThreads

__all__ = [
    "RESULT_SCHEMA",
    "STREAM_SCHEMA",
    "LlmPipeline",
    "RequestHandle",
    "result_topic",
    "stream_topic",
]

_log = logging.getLogger(__name__)

RESULT_SCHEMA = "edge-agent.llm.result"
STREAM_SCHEMA = "edge-agent.llm.stream"
_POLL_S = 0.5
_KEEP_FINISHED = 256

Stage = Literal["queued", "prompt_eval", "decode", "done"]
Status = Literal["completed", "cancelled", "deadline_exceeded", "failed"]
ChunkCallback = Callable[[str, int, str], None]
ResultCallback = Callable[[Mapping[str, Any]], None]


def stream_topic(request_id: str) -> str:
    return f"llm/{request_id}/stream"


def result_topic(request_id: str) -> str:
    return f"llm/{request_id}/result"


@dataclass(eq=False)
class _Job:
    request_id: str
    request: GenerateRequest
    submitted: float
    deadline: float
    stream: bool
    source: str
    on_chunk: ChunkCallback | None
    on_result: ResultCallback | None
    context: Mapping[str, Any] | None = None
    stage: Stage = "queued"
    end: Status | None = None
    """Set by cancel / the deadline monitor / stop before the worker notices."""
    end_message: str = ""
    prompt_tokens: int = 0
    prompt_evaluated: int = 0
    completion_tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None


class RequestHandle:
    """A submitted request: ``wait`` for its result, or ``cancel`` it."""

    def __init__(self, pipeline: LlmPipeline, job: _Job) -> None:
        self._pipeline = pipeline
        self._job = job

    @property
    def request_id(self) -> str:
        return self._job.request_id

    @property
    def done(self) -> bool:
        return self._job.done.is_set()

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The result message, or None if it is not there within ``timeout``."""
        if not self._job.done.wait(timeout):
            return None
        return self._job.result

    def cancel(self, wait_s: float = 5.0) -> dict[str, Any]:
        outcome = self._pipeline.cancel(self._job.request_id, wait_s=wait_s)
        if outcome is None:  # pragma: no cover - a handle's job is always known
            raise PipelineError(f"request {self._job.request_id} is unknown")
        return outcome


@dataclass
class _Counters:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    deadline_exceeded: int = 0
    failed: int = 0
    busy: int = 0
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    completion_tokens: int = 0


class LlmPipeline:
    """See the module docstring. Build with ``pipelines.factory.build_pipeline``."""

    def __init__(
        self,
        config: LlmPipelineConfig,
        ctx: PipelineContext,
        *,
        engine: LlamaEngine,
        model: ResolvedModel,
    ) -> None:
        self.config = config
        self._ctx = ctx
        self._engine = engine
        self._model = model
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._running: _Job | None = None
        self._state = "created"
        self._error: str | None = None
        self._stop = threading.Event()
        self._external: threading.Event | None = None
        self._workers = WorkerThreads(config.name, ctx.heartbeats, self._fail)
        self._counters = _Counters()
        self._last: dict[str, Any] | None = None
        self._started_at: float | None = None
        identity = {
            "model": model.manifest.name,
            "sha256": model.manifest.sha256,
            "n_ctx": engine.n_ctx,
            "kv_cache_type": engine.config.kv_cache_type,
        }
        sc = config.sessions
        self._sessions = SessionStore(
            max_entries=sc.max_entries,
            max_bytes=sc.max_bytes,
            disk_dir=sc.disk_dir,
            max_disk_bytes=sc.max_disk_bytes,
            model_identity=identity,
        )
        pc = config.prefix_cache
        self._prefixes: KvLru[tuple[int, ...], KvState] = KvLru(
            pc.max_entries, pc.max_bytes, lambda s: s.nbytes
        )
        self._listeners: list[Callable[[], None]] = []
        self._status_extra: dict[str, Callable[[], dict[str, Any]]] = {}
        self._extra_threads: list[tuple[str, Callable[[str], None]]] = []

    # ------------------------------------------------------------------ Pipeline protocol

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def engine(self) -> LlamaEngine:
        return self._engine

    def start(self, stop_event: threading.Event) -> None:
        with self._lock:
            if self._state != "created":
                raise PipelineStateError(
                    f"pipeline {self.name} cannot start: it is {self._state} (build a new one)"
                )
            self._state = "running"
            self._external = stop_event
            self._started_at = time.monotonic()
        self._spawn("worker", self._worker_loop, critical=True)
        self._spawn("monitor", self._monitor_loop, critical=True)
        for role, body in self._extra_threads:
            self._spawn(role, body, critical=True)

    def add_thread(self, role: str, body: Callable[[str], None]) -> None:
        """Run ``body(worker_name)`` on a thread of this pipeline from ``start()`` on (the
        narrator uses it); the body beats ``heartbeats`` and returns once ``stopping`` is set."""
        if self._state != "created":
            raise PipelineStateError(f"pipeline {self.name}: add threads before start()")
        self._extra_threads.append((role, body))

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the pipeline stops (before its threads are joined)."""
        self._listeners.append(callback)

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    @property
    def heartbeats(self) -> Heartbeats:
        return self._ctx.heartbeats

    def add_status(self, key: str, provider: Callable[[], dict[str, Any]]) -> None:
        """Show ``provider()`` under ``key`` in ``status()`` (the narrator's figures)."""
        self._status_extra[key] = provider

    def stop(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._state == "running":
                self._state = "stopping"
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
            if running is not None and running.end is None:
                running.end = "cancelled"
                running.end_message = "the pipeline is stopping"
            self._wake.notify_all()
        self._stop.set()
        for callback in self._listeners:
            self._notify_stop(callback)
        if running is not None:
            self._engine.abort()
        for job in queued:
            job.end, job.end_message = "cancelled", "the pipeline is stopping"
            self._finish(job, self._outcome(job, None))
        joined = self._workers.finish(deadline)
        with self._lock:
            if self._state in ("created", "stopping"):
                self._state = "stopped"
        if joined:
            self._engine.close()
        else:
            _log.error(
                "pipeline %s: the LLM worker still runs after %.1f s; the engine is left open",
                self.name,
                timeout_s,
            )
        return joined

    def _notify_stop(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # noqa: BLE001 - one listener must not block the stop
            _log.exception("pipeline %s: stop listener failed", self.name)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = self._running
            run_status = None
            if running is not None:
                run_status = {
                    "request_id": running.request_id,
                    "stage": running.stage,
                    "prompt_tokens": running.prompt_tokens,
                    "prompt_tokens_evaluated": running.prompt_evaluated,
                    "completion_tokens": running.completion_tokens,
                }
            depth = len(self._queue)
            state, error = self._state, self._error
            counters = dict(vars(self._counters))
            last = dict(self._last) if self._last else None
        uptime = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        return {
            "name": self.name,
            "type": "llm",
            "state": state,
            "error": error,
            "uptime_s": round(uptime, 3),
            "model": self.config.model,
            "queue": {"depth": depth, "capacity": self.config.queue_size},
            "running": run_status,
            "counters": counters,
            "last": last,
            "sessions": self._sessions.status(),
            "prefix_cache": self._prefixes.status(),
            "engine": self._engine.status(),
            **{key: provider() for key, provider in self._status_extra.items()},
        }

    # ------------------------------------------------------------------ Python API

    def submit(
        self,
        request: GenerateRequest,
        *,
        request_id: str | None = None,
        on_chunk: ChunkCallback | None = None,
        on_result: ResultCallback | None = None,
        source: str = "api",
        context: Mapping[str, Any] | None = None,
    ) -> RequestHandle:
        """Queue ``request``; ``PipelineBusyError`` when the queue is full,
        ``PipelineStateError`` when the pipeline is not running, ``PipelineError`` for a
        request id that is still in use. ``on_chunk(request_id, index, text)`` and
        ``on_result(message)`` are called on the worker thread, after the sink. ``source``
        and ``context`` are copied into the result message (who asked, and with what)."""
        rid = request.request_id or request_id or uuid.uuid4().hex
        now = time.monotonic()
        deadline_s = request.deadline_s or self.config.defaults.deadline_s
        stream = (
            request.stream if request.stream is not None else self.config.result_mode == "stream"
        )
        job = _Job(
            rid, request, now, now + deadline_s, stream, source, on_chunk, on_result, context
        )
        with self._lock:
            if self._state != "running":
                raise PipelineStateError(
                    f"LLM pipeline {self.name} is {self._state}; it takes no requests"
                )
            old = self._jobs.get(rid)
            if old is not None and not old.done.is_set():
                raise PipelineError(f"request id {rid!r} is still in use; choose another")
            if len(self._queue) >= self.config.queue_size:
                self._counters.busy += 1
                raise PipelineBusyError(
                    f"LLM pipeline {self.name}: {len(self._queue)} requests already wait "
                    f"(queue_size {self.config.queue_size}); retry later"
                )
            self._queue.append(job)
            self._remember(job)
            self._counters.submitted += 1
            self._wake.notify_all()
        return RequestHandle(self, job)

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> dict[str, Any]:
        """Submit and wait: the result message (``PipelineError`` if none within timeout)."""
        handle = self.submit(request)
        result = handle.wait(timeout)
        if result is None:
            handle.cancel()
            raise PipelineError(f"request {handle.request_id} did not finish in {timeout} s")
        return result

    def has_request(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._jobs

    def cancel(self, request_id: str, *, wait_s: float = 5.0) -> dict[str, Any] | None:
        """Stop a request wherever it is; None for an unknown id. The answer says where it
        was when the cancel landed (``stage``), how far it got and how it ended."""
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None:
                return None
            stage_at_cancel = job.stage
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            if not job.done.is_set() and job.end is None:
                job.end, job.end_message = "cancelled", "cancelled on request"
            running = self._running is job
        if queued:
            self._finish(job, self._outcome(job, None))
        elif running:
            self._engine.abort()
        job.done.wait(wait_s)
        result = job.result or {}
        return {
            "request_id": request_id,
            "stage": stage_at_cancel,
            "status": result.get("status", "cancelling"),
            "prompt_tokens": job.prompt_tokens,
            "prompt_tokens_evaluated": job.prompt_evaluated,
            "completion_tokens": job.completion_tokens,
            "text": result.get("text", ""),
        }

    def drop_session(self, session_id: str) -> bool:
        """Forget a session (RAM and disk); True if it existed."""
        return self._sessions.drop(session_id)

    # ------------------------------------------------------------------ threads

    def _spawn(self, role: str, body: Callable[[str], None], *, critical: bool) -> None:
        cpus = self._ctx.cpus_for(self.config.stage)
        interval_s = self.config.heartbeat_interval_s
        self._workers.start(role, body, cpus=cpus, interval_s=interval_s, critical=critical)

    def _fail(self, error: str) -> None:
        with self._lock:
            self._state = "failed"
            self._error = error
            queued = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        self._stop.set()
        for job in queued:
            job.end, job.end_message = "cancelled", f"the pipeline failed: {error}"
            self._finish(job, self._outcome(job, None))

    def _halted(self) -> bool:
        external = self._external
        if external is not None and external.is_set():
            self._stop.set()
        return self._stop.is_set()

    def _worker_loop(self, worker: str) -> None:
        beats = self._ctx.heartbeats
        while not self._halted():
            beats.beat(worker)
            with self._lock:
                if not self._queue:
                    self._wake.wait(_POLL_S)
                if not self._queue or self._stop.is_set():
                    continue
                job = self._queue.popleft()
                self._running = job
                job.stage = "prompt_eval"
                self._engine.clear_abort()
                if job.end is not None:  # cancelled between the pop and here
                    self._engine.abort()
            try:
                self._run(job, lambda: beats.beat(worker))
            finally:
                with self._lock:
                    self._running = None

    def _monitor_loop(self, worker: str) -> None:
        """Ends requests whose deadline passed: queued ones at once, the running one through
        the engine's abort flag."""
        beats = self._ctx.heartbeats
        while not self._halted():
            beats.beat(worker)
            expired: list[_Job] = []
            with self._lock:
                now = time.monotonic()
                for job in list(self._queue):
                    if job.deadline <= now:
                        self._queue.remove(job)
                        job.end, job.end_message = "deadline_exceeded", _deadline_text(job)
                        expired.append(job)
                running = self._running
                if running is not None and running.deadline <= now and running.end is None:
                    running.end, running.end_message = "deadline_exceeded", _deadline_text(running)
                    self._engine.abort()
                pending = [j.deadline for j in self._queue]
                if self._running is not None and self._running.end is None:
                    pending.append(self._running.deadline)
                wait = min([_POLL_S * 2, *(d - now for d in pending)])
                self._wake.wait(max(0.005, wait))
            for job in expired:
                self._finish(job, self._outcome(job, None))

    # ------------------------------------------------------------------ one request

    def _run(self, job: _Job, beat: Callable[[], None]) -> None:
        started = time.monotonic()
        timing: dict[str, float] = {"queue_wait_ms": (started - job.submitted) * 1000.0}
        run = _Run(job=job, timing=timing)
        if job.end is not None:  # cancelled or expired between the queue and here
            run.status = job.end
            self._finish(job, self._outcome(job, run))
            return
        try:
            self._prepare(run)
            job.prompt_tokens = len(run.tokens)
            self._evaluate(run, beat)
            job.stage = "decode"
            self._decode(run, beat)
            run.status = "completed"
            self._save_session(run)
        except InferenceAbortedError:
            run.status = _end_of(job) or "cancelled"
            run.error = None
        except (EngineError, PipelineError) as exc:
            end = _end_of(job)  # set by another thread meanwhile
            if end is not None:
                run.status = end
            else:
                run.status = "failed"
                run.error = {"reason": exc.reason, "message": str(exc)}
                _log.warning("LLM request %s failed [%s]: %s", job.request_id, exc.reason, exc)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the worker
            _log.exception("LLM request %s failed unexpectedly", job.request_id)
            run.status = "failed"
            run.error = {"reason": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        self._finish(job, self._outcome(job, run))

    def _prepare(self, run: _Run) -> None:
        engine, req, cfg = self._engine, run.job.request, self.config
        defaults = cfg.defaults
        stop = list(req.stop)
        if req.messages is not None:
            new = [m.model_dump() for m in req.messages]
            if req.session_id is not None:
                if not self._sessions.enabled:
                    raise InputSpecError(
                        f"LLM pipeline {self.name} keeps no sessions (sessions.max_entries = "
                        "0); send the whole conversation without session_id"
                    )
                session = self._sessions.get(req.session_id) or Session(req.session_id)
                run.session = session
                history = _trim(session.messages + new, cfg.sessions.max_messages)
            else:
                history = new
            run.history = history
            chat: ChatPrompt = engine.format_chat(history)
            stop.extend(chat.stop)
            run.tokens = engine.tokenize(chat.text, add_bos=False, special=True)
            if chat.system_prefix:
                prefix = engine.tokenize(chat.system_prefix, add_bos=False, special=True)
                if 0 < len(prefix) < len(run.tokens) and run.tokens[: len(prefix)] == prefix:
                    run.prefix = tuple(prefix)
        else:
            run.tokens = engine.tokenize(req.prompt or "", add_bos=True, special=True)
        run.stop = tuple(dict.fromkeys(stop))
        room = engine.n_ctx - len(run.tokens) - 1
        if room < 1:
            raise InputSpecError(
                f"the prompt has {len(run.tokens)} tokens, the context holds {engine.n_ctx}: "
                "shorten it (or raise engine.n_ctx)"
            )
        run.max_tokens = min(req.max_tokens or defaults.max_tokens, room)
        run.sampling = Sampling(
            temperature=req.temperature if req.temperature is not None else defaults.temperature,
            top_p=req.top_p if req.top_p is not None else defaults.top_p,
            top_k=req.top_k if req.top_k is not None else defaults.top_k,
            repeat_penalty=req.repeat_penalty if req.repeat_penalty is not None else 1.0,
            seed=req.seed if req.seed is not None else engine.config.seed,
            grammar=req.grammar,
            json_schema=req.json_schema,
        )

    def _evaluate(self, run: _Run, beat: Callable[[], None]) -> None:
        engine, job, tokens = self._engine, run.job, run.tokens
        best = common_prefix(engine.cached_tokens, tokens)
        source = "context"
        state: KvState | None = None
        if run.session is not None and run.session.state is not None:
            n = common_prefix(run.session.state.tokens, tokens)
            if n > best:
                best, source, state = n, "session", run.session.state
        if run.prefix is not None and best < len(run.prefix):
            cached = self._prefixes.get(run.prefix)
            if cached is not None:
                best, source, state = len(run.prefix), "prefix", cached
        if state is not None:
            engine.load_state(state)
        run.cache_source = source if best > 0 else "none"
        run.reused = min(best, len(tokens) - 1)  # what evaluate() keeps (progress until then)

        def progress(done: int, _total: int) -> None:
            job.prompt_evaluated = done - run.reused
            beat()

        t0 = time.monotonic()
        reused = None
        if run.prefix is not None and best < len(run.prefix) and self._prefixes.max_entries > 0:
            first = engine.evaluate(run.prefix, on_chunk=progress)
            reused = first.reused
            run.reused = reused
            self._prefixes.put(run.prefix, engine.save_state())
        stats = engine.evaluate(tokens, on_chunk=progress)
        run.reused = stats.reused if reused is None else reused
        job.prompt_evaluated = len(tokens) - run.reused
        run.timing["prompt_eval_ms"] = (time.monotonic() - t0) * 1000.0

    def _decode(self, run: _Run, beat: Callable[[], None]) -> None:
        engine, job, cfg = self._engine, run.job, self.config
        assembler = TextAssembler(run.stop)
        coalescer = Coalescer(
            flush_ms=cfg.stream.flush_ms,
            flush_tokens=cfg.stream.flush_tokens,
            sentence_end=cfg.stream.sentence_end,
            first_token=cfg.stream.first_token,
        )
        first: float | None = None
        last = 0.0
        steps = 0
        run.stop_reason = "length"
        for token in engine.generate(run.sampling):
            now = time.monotonic()
            if first is None:
                first = now
                run.timing["ttft_ms"] = (now - job.submitted) * 1000.0
            else:
                steps += 1
            last = now
            if engine.is_end_of_generation(token):
                run.stop_reason = "eos"
                break
            job.completion_tokens += 1
            text = assembler.feed(engine.detokenize([token]))
            run.text = assembler.text  # what a cancel or deadline reports
            if assembler.stopped is not None:
                run.stop_reason = "stop"
                self._chunk(run, coalescer.add(text, now) if text else None)
                break
            if job.stream:
                self._chunk(run, coalescer.add(text, now))
            if job.completion_tokens >= run.max_tokens:
                break
            if now >= job.deadline:
                with self._lock:
                    if job.end is None:
                        job.end, job.end_message = "deadline_exceeded", _deadline_text(job)
                raise InferenceAbortedError("deadline")
            beat()
        tail = assembler.finish()
        if job.stream:
            if tail:
                self._chunk(run, coalescer.add(tail, time.monotonic()))
            self._chunk(run, coalescer.flush())
        run.text = assembler.text
        run.steps = steps
        if first is not None:
            run.timing["decode_ms"] = (last - first) * 1000.0

    def _chunk(self, run: _Run, chunk: tuple[str, int] | None) -> None:
        if chunk is None or not run.job.stream:
            return
        text, tokens = chunk
        job = run.job
        message = {
            "schema": STREAM_SCHEMA,
            "schema_version": 1,
            "request_id": job.request_id,
            "index": run.chunks,
            "text": text,
            "tokens": tokens,
        }
        t0 = time.perf_counter()
        try:
            self._ctx.sink.publish(stream_topic(job.request_id), message)
        except PipelineError as exc:
            _log.warning("LLM request %s: stream chunk not published: %s", job.request_id, exc)
        if job.on_chunk is not None:
            job.on_chunk(job.request_id, run.chunks, text)
        run.publish_s += time.perf_counter() - t0
        run.chunks += 1

    def _save_session(self, run: _Run) -> None:
        session = run.session
        if session is None:
            return
        session.messages = [*run.history, {"role": "assistant", "content": run.text}]
        session.state = self._engine.save_state()
        self._sessions.put(session)

    # ------------------------------------------------------------------ results

    def _outcome(self, job: _Job, run: _Run | None) -> dict[str, Any]:
        now = time.monotonic()
        status: Status = run.status if run is not None else (job.end or "cancelled")
        timing = dict(run.timing) if run is not None else {}
        timing.setdefault("queue_wait_ms", (now - job.submitted) * 1000.0)
        decode_ms = timing.get("decode_ms")
        steps = run.steps if run is not None else 0
        out_timing = {
            "queue_wait_ms": _r(timing.get("queue_wait_ms")),
            "prompt_eval_ms": _r(timing.get("prompt_eval_ms")),
            "ttft_ms": _r(timing.get("ttft_ms")),
            "decode_ms": _r(decode_ms),
            "decode_tokens_per_s": (
                round(steps / (decode_ms / 1000.0), 2) if decode_ms and steps else None
            ),
            "publish_overhead_ms": _r(run.publish_s * 1000.0) if run is not None else 0.0,
            "total_ms": _r((now - job.submitted) * 1000.0),
        }
        error = run.error if run is not None else None
        if status in ("cancelled", "deadline_exceeded") and error is None:
            error = {"reason": status, "message": job.end_message or status}
        prompt_tokens = job.prompt_tokens
        return {
            "schema": RESULT_SCHEMA,
            "schema_version": 1,
            "request_id": job.request_id,
            "pipeline": self.name,
            "model": self.config.model,
            "session_id": job.request.session_id,
            "source": job.source,
            "status": status,
            "stop_reason": run.stop_reason if run is not None and status == "completed" else None,
            "stage": job.stage if status != "completed" else "done",
            "text": run.text if run is not None else "",
            "error": error,
            "chunks": run.chunks if run is not None else 0,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "prompt_tokens_cached": run.reused if run is not None else 0,
                "prompt_tokens_evaluated": job.prompt_evaluated,
                "completion_tokens": job.completion_tokens,
                "total_tokens": prompt_tokens + job.completion_tokens,
            },
            "timing": out_timing,
            "cache": {
                "source": run.cache_source if run is not None else "none",
                "reused_tokens": run.reused if run is not None else 0,
            },
            "context": dict(job.context) if job.context is not None else None,
        }

    def _finish(self, job: _Job, message: dict[str, Any]) -> None:
        """Publish the one result of ``job`` and wake whoever waits for it."""
        if job.done.is_set():
            return
        t0 = time.perf_counter()
        try:
            self._ctx.sink.publish(result_topic(job.request_id), message)
        except PipelineError as exc:
            _log.error("LLM request %s: result not published: %s", job.request_id, exc)
        if job.on_result is not None:
            try:
                job.on_result(message)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the worker
                _log.exception("LLM request %s: result callback failed", job.request_id)
        spent = (time.perf_counter() - t0) * 1000.0
        timing = message["timing"]
        timing["publish_overhead_ms"] = _r((timing.get("publish_overhead_ms") or 0.0) + spent)
        with self._lock:
            status = message["status"]
            c = self._counters
            setattr(c, status, getattr(c, status) + 1)
            usage = message["usage"]
            c.prompt_tokens += usage["prompt_tokens"]
            c.prompt_tokens_evaluated += usage["prompt_tokens_evaluated"]
            c.completion_tokens += usage["completion_tokens"]
            self._last = {
                "request_id": job.request_id,
                "status": status,
                "usage": usage,
                "timing": timing,
            }
            job.stage = "done" if status == "completed" else job.stage
            job.result = message
            job.done.set()

    def _remember(self, job: _Job) -> None:
        """Keep requests findable by id (cancel, status): every unfinished one and the last
        ``_KEEP_FINISHED`` finished ones."""
        self._jobs.pop(job.request_id, None)
        self._jobs[job.request_id] = job
        if len(self._jobs) > _KEEP_FINISHED:
            for rid in [r for r, j in self._jobs.items() if j.done.is_set()]:
                if len(self._jobs) <= _KEEP_FINISHED:
                    break
                del self._jobs[rid]


@dataclass
class _Run:
    job: _Job
    timing: dict[str, float]
    tokens: list[int] = field(default_factory=list)
    prefix: tuple[int, ...] | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    session: Session | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    reused: int = 0
    cache_source: str = "none"
    text: str = ""
    stop_reason: str | None = None
    steps: int = 0
    chunks: int = 0
    publish_s: float = 0.0
    status: Status = "failed"
    error: dict[str, str] | None = None


def _end_of(job: _Job) -> Status | None:
    """``job.end`` read afresh (cancel and the monitor set it from other threads); a call, so
    that type checkers drop the ``job.end is None`` narrowing from the top of ``_run``."""
    return job.end


def _trim(messages: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """At most ``limit`` messages: the leading system messages and the newest others."""
    if len(messages) <= limit:
        return messages
    system = [m for m in messages if m["role"] == "system"][: limit - 1]
    rest = [m for m in messages if m["role"] != "system"]
    return system + rest[-(limit - len(system)) :]


def _deadline_text(job: _Job) -> str:
    return f"deadline of {job.deadline - job.submitted:.3g} s passed"


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
