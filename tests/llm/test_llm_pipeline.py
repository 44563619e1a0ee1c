"""The LLM pipeline with real llama.cpp on SmolLM2: streaming, queue limits, cancel in prompt
evaluation and in decoding, deadlines, sessions and the prefix cache (checked with llama.cpp's
own counters), failures reported per request, stop, and the narrator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from llm_support import LONG_TEXT, SMOLLM, MemorySink, make_context

from engines.store import ModelStore
from pipelines.config import LlmPipelineConfig
from pipelines.errors import PipelineBusyError, PipelineStateError
from pipelines.feed import ResultTee
from pipelines.llm.build import build_llm_pipeline
from pipelines.llm.pipeline import LlmPipeline, result_topic, stream_topic
from pipelines.llm.requests import GenerateRequest

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
"""A prompt SmolLM2 continues for hundreds of tokens (greedy): a long decode to interrupt."""


def _config(**overrides: Any) -> LlmPipelineConfig:
    raw: dict[str, Any] = {
        "type": "llm",
        "name": "chat",
        "model": SMOLLM,
        "engine": {"n_ctx": 2048, "n_batch": 64},
        "defaults": {"temperature": 0.0, "max_tokens": 32},
    }
    raw.update(overrides)
    return LlmPipelineConfig.model_validate(raw)


@contextmanager
def running(
    store: ModelStore, sink: Any = None, **overrides: Any
) -> Iterator[tuple[LlmPipeline, MemorySink]]:
    sink = sink if sink is not None else MemorySink()
    results = sink if isinstance(sink, ResultTee) else None
    ctx, _watchdog = make_context(store, sink, results=results)
    pipeline = build_llm_pipeline(_config(**overrides), ctx)
    stop = threading.Event()
    pipeline.start(stop)
    try:
        yield pipeline, sink
    finally:
        stop.set()
        assert pipeline.stop(30.0)


def _wait_running(pipeline: LlmPipeline, stage: str, *, evaluated: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run = pipeline.status()["running"]
        if run is not None and run["stage"] == stage and run["prompt_tokens_evaluated"] > evaluated:
            return dict(run)
        time.sleep(0.002)
    pytest.fail(f"no request reached {stage}: {pipeline.status()['running']}")


def test_stream_chunks_reassemble_to_the_result(store: ModelStore) -> None:
    with running(store, stream={"flush_tokens": 4, "flush_ms": 1000}) as (pipeline, sink):
        chunks: list[tuple[int, str]] = []
        handle = pipeline.submit(
            GenerateRequest(
                messages=[{"role": "user", "content": "Describe a busy street in a few words."}],
                max_tokens=40,
            ),
            on_chunk=lambda _rid, index, text: chunks.append((index, text)),
        )
        result = handle.wait(120)
    assert result is not None
    assert result["status"] == "completed"
    assert result["stop_reason"] in ("eos", "length")
    streamed = sink.on(stream_topic(handle.request_id))
    assert [m["index"] for m in streamed] == list(range(result["chunks"]))
    assert result["chunks"] >= 2
    assert "".join(m["text"] for m in streamed) == result["text"] != ""
    assert [(m["index"], m["text"]) for m in streamed] == chunks
    assert sum(m["tokens"] for m in streamed) <= result["usage"]["completion_tokens"] + 1
    assert sink.on(result_topic(handle.request_id)) == [result]
    usage, timing = result["usage"], result["timing"]
    cached, evaluated = usage["prompt_tokens_cached"], usage["prompt_tokens_evaluated"]
    assert usage["prompt_tokens"] == cached + evaluated
    assert timing["ttft_ms"] >= timing["prompt_eval_ms"] > 0
    assert timing["decode_tokens_per_s"] > 0
    # handing >= 2 chunks and the result to the sink takes some time, a sliver of the request's
    assert 0 < timing["publish_overhead_ms"] < timing["total_ms"]
    assert pipeline.status()["counters"]["completed"] == 1


def test_stop_string_ends_the_answer(store: ModelStore) -> None:
    with running(store) as (pipeline, sink):
        result = pipeline.generate(GenerateRequest(prompt=COUNTING, stop=[" 16"]), timeout=120)
    assert result["stop_reason"] == "stop"
    assert result["text"] == " 13, 14, 15,"
    streamed = sink.on(stream_topic(result["request_id"]))
    assert "".join(m["text"] for m in streamed) == result["text"]


def test_json_schema_request(store: ModelStore) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["label", "count"],
    }
    with running(store) as (pipeline, _sink):
        result = pipeline.generate(
            GenerateRequest(
                messages=[{"role": "user", "content": "Three cars passed. Answer in JSON."}],
                json_schema=schema,
                max_tokens=60,
            ),
            timeout=120,
        )
    value = json.loads(result["text"])
    assert isinstance(value["label"], str)
    assert isinstance(value["count"], int)


def test_full_queue_is_busy_and_queued_requests_can_be_cancelled(store: ModelStore) -> None:
    with running(store, queue_size=1) as (pipeline, _sink):
        long = pipeline.submit(GenerateRequest(prompt=COUNTING, max_tokens=1500))
        _wait_running(pipeline, "decode", evaluated=-1)
        queued = pipeline.submit(GenerateRequest(prompt="Hello"))
        with pytest.raises(PipelineBusyError, match="queue_size 1"):
            pipeline.submit(GenerateRequest(prompt="One too many"))
        assert pipeline.status()["counters"]["busy"] == 1
        outcome = queued.cancel()
        assert (outcome["stage"], outcome["status"]) == ("queued", "cancelled")
        assert outcome["prompt_tokens_evaluated"] == 0
        result = long.cancel()
    assert result["stage"] == "decode"
    assert result["status"] == "cancelled"
    assert result["completion_tokens"] > 0


def test_cancel_during_prompt_evaluation(store: ModelStore) -> None:
    prompt = LONG_TEXT * 20  # ~1200 tokens, in chunks of 16
    with running(store, engine={"n_ctx": 2048, "n_batch": 16}) as (pipeline, sink):
        handle = pipeline.submit(GenerateRequest(prompt=prompt, max_tokens=8))
        _wait_running(pipeline, "prompt_eval")
        outcome = handle.cancel()
        result = sink.wait_topic(result_topic(handle.request_id))
        # the pipeline goes on: the next request completes
        after = pipeline.generate(GenerateRequest(prompt="Hello", max_tokens=4), timeout=120)
    assert outcome["stage"] == "prompt_eval"
    assert outcome["status"] == "cancelled"
    assert 0 < outcome["prompt_tokens_evaluated"] < outcome["prompt_tokens"]
    assert outcome["completion_tokens"] == 0
    assert result is not None
    assert (result["status"], result["stage"]) == ("cancelled", "prompt_eval")
    assert result["error"]["reason"] == "cancelled"
    assert after["status"] == "completed"


def test_cancel_during_decode_reports_the_text_so_far(store: ModelStore) -> None:
    chunks: list[str] = []
    third_chunk = threading.Event()

    def on_chunk(_rid: str, _index: int, text: str) -> None:
        chunks.append(text)
        if len(chunks) == 3:
            third_chunk.set()

    with running(store, stream={"flush_tokens": 2}) as (pipeline, _sink):
        handle = pipeline.submit(
            GenerateRequest(prompt=COUNTING, max_tokens=1500), on_chunk=on_chunk
        )
        assert third_chunk.wait(120)
        outcome = handle.cancel()
        result = handle.wait(10)
    assert outcome["stage"] == "decode"
    assert outcome["status"] == "cancelled"
    assert 0 < outcome["completion_tokens"] < 1500
    assert result is not None
    assert result["text"] == outcome["text"]
    assert len(result["text"]) >= len("".join(chunks[:3]))
    assert " 13, 14, 15, 16, 17, 18, 19, 20, 21, 22".startswith(result["text"])


def test_deadline_of_a_running_and_a_queued_request(store: ModelStore) -> None:
    with running(store) as (pipeline, _sink):
        running_one = pipeline.submit(GenerateRequest(prompt=COUNTING, max_tokens=1500))
        _wait_running(pipeline, "decode", evaluated=-1)
        queued = pipeline.submit(GenerateRequest(prompt="Hello", deadline_s=0.2))
        queued_result = queued.wait(30)
        assert running_one.done is False
        running_one.cancel()
        # 5 s: the short prompt is evaluated well inside it even on a loaded machine, and 1500
        # tokens take > 18 s at SmolLM2's ~80 tok/s, so the deadline strikes during decode
        late = pipeline.submit(GenerateRequest(prompt=COUNTING, max_tokens=1500, deadline_s=5.0))
        late_result = late.wait(60)
    assert queued_result is not None
    assert (queued_result["status"], queued_result["stage"]) == ("deadline_exceeded", "queued")
    assert late_result is not None
    assert late_result["status"] == "deadline_exceeded"
    assert late_result["error"]["reason"] == "deadline_exceeded"
    assert 0 < late_result["usage"]["completion_tokens"] < 1500


def test_session_second_turn_evaluates_only_new_tokens(store: ModelStore) -> None:
    with running(store) as (pipeline, _sink):
        turn1 = pipeline.generate(
            GenerateRequest(
                session_id="s1",
                messages=[
                    {"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": "What is a bicycle?"},
                ],
            ),
            timeout=120,
        )
        # another request in between: the context no longer holds the session
        other = pipeline.generate(GenerateRequest(prompt=LONG_TEXT, max_tokens=4), timeout=120)
        assert other["cache"]["reused_tokens"] == 0
        pipeline.engine.reset_perf()  # the worker is idle between requests
        turn2 = pipeline.generate(
            GenerateRequest(session_id="s1", messages=[{"role": "user", "content": "And a bus?"}]),
            timeout=120,
        )
        perf = pipeline.engine.perf()
        sessions = pipeline.status()["sessions"]
    assert turn2["cache"]["source"] == "session"
    cached = turn2["usage"]["prompt_tokens_cached"]
    assert cached >= turn1["usage"]["prompt_tokens"] + turn1["usage"]["completion_tokens"] // 2
    evaluated = turn2["usage"]["prompt_tokens_evaluated"]
    assert evaluated == turn2["usage"]["prompt_tokens"] - cached
    assert evaluated < turn2["usage"]["prompt_tokens"] - turn1["usage"]["prompt_tokens"]
    assert perf["n_p_eval"] == evaluated  # llama.cpp's own count of prompt tokens evaluated
    assert sessions["entries"] == 1
    assert sessions["hits"] >= 1


def test_prefix_cache_for_a_shared_system_prompt(store: ModelStore) -> None:
    system = "You are a traffic assistant. " + LONG_TEXT * 6  # ~400 tokens

    def ask(question: str) -> GenerateRequest:
        return GenerateRequest(
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            max_tokens=4,
        )

    with running(store) as (pipeline, _sink):
        first = pipeline.generate(ask("How many buses?"), timeout=120)
        pipeline.generate(GenerateRequest(prompt="Unrelated text.", max_tokens=2), timeout=120)
        pipeline.engine.reset_perf()
        second = pipeline.generate(ask("Any bicycles?"), timeout=120)
        perf = pipeline.engine.perf()
        cache = pipeline.status()["prefix_cache"]
    assert first["cache"]["source"] == "none"
    assert second["cache"]["source"] == "prefix"
    prefix = second["usage"]["prompt_tokens_cached"]
    assert prefix > 300
    assert perf["n_p_eval"] == second["usage"]["prompt_tokens"] - prefix
    assert (cache["entries"], cache["hits"]) == (1, 1)


def test_a_failing_request_is_reported_and_the_worker_goes_on(store: ModelStore) -> None:
    with running(store, engine={"n_ctx": 256, "n_batch": 64}) as (pipeline, _sink):
        failed = pipeline.generate(GenerateRequest(prompt=LONG_TEXT * 10), timeout=60)
        no_template = GenerateRequest(prompt="Hello there", max_tokens=3)
        ok = pipeline.generate(no_template, timeout=60)
    assert failed["status"] == "failed"
    assert failed["error"]["reason"] == "input_spec_mismatch"
    assert "context holds 256" in failed["error"]["message"]
    assert ok["status"] == "completed"


def test_stop_ends_running_and_queued_requests(store: ModelStore) -> None:
    sink = MemorySink()
    ctx, watchdog = make_context(store, sink)
    pipeline = build_llm_pipeline(_config(), ctx)
    pipeline.start(threading.Event())
    workers = set(watchdog.status()["workers"])
    assert {"chat/worker", "chat/monitor"} <= workers
    long = pipeline.submit(GenerateRequest(prompt=COUNTING, max_tokens=1500))
    _wait_running(pipeline, "decode", evaluated=-1)
    queued = pipeline.submit(GenerateRequest(prompt="Hello"))
    assert pipeline.stop(30.0)
    for handle in (long, queued):
        result = handle.wait(1)
        assert result is not None
        assert result["status"] == "cancelled"
        assert "stopping" in result["error"]["message"]
    assert pipeline.status()["state"] == "stopped"
    assert not {"chat/worker", "chat/monitor"} & set(watchdog.status()["workers"])
    with pytest.raises(PipelineStateError):
        pipeline.submit(GenerateRequest(prompt="late"))


def test_narrator_reports_on_vision_counts(store: ModelStore) -> None:
    inner = MemorySink()
    tee = ResultTee(inner)
    narrator = {"interval_s": 3600, "min_gap_s": 0, "max_tokens": 24}
    with running(store, tee, narrator=narrator) as (pipeline, _sink):
        for i in range(30):
            counts = {"person": 1 + i % 3, "bicycle": 1} if i % 2 else {"car": 2}
            tee.publish("vision/street/detections", {"pipeline": "street", "counts": counts})
        tee.publish("vision/street/events", {"event": "crowd"})  # triggers a report
        deadline = time.monotonic() + 120
        reports: list[dict[str, Any]] = []
        while not reports and time.monotonic() < deadline:
            reports = [m for t, m in inner.items if t.endswith("/result")]
            time.sleep(0.05)
        status = pipeline.status()["narrator"]
    assert len(reports) == 1
    report = reports[0]
    assert (report["source"], report["status"]) == ("narrator", "completed")
    assert report["text"].strip()
    street = report["context"]["pipelines"]["street"]
    assert street["frames"] == 30
    assert street["labels"]["bicycle"] == {"frames": 15, "peak": 1, "total": 15}
    assert street["events"] == ["crowd"]
    assert "person in 50% of frames" in report["context"]["summary"]
    assert status["reports"] == 1
