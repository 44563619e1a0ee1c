"""Pure-Python parts of the LLM pipeline: text assembly (UTF-8 splits, stop strings held back),
chunk coalescing, the bounded KV caches, session files, request/config validation, the
narrator's summary and the result tee."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llm_support import MemorySink
from pydantic import ValidationError

from engines.llama import KvState
from engines.llama_config import LlamaCppConfig
from pipelines.config import LlmPipelineConfig, PipelineConfig
from pipelines.feed import ResultTee
from pipelines.llm.cache import KvLru, Session, SessionStore
from pipelines.llm.narrator import Window, summarise
from pipelines.llm.requests import GenerateRequest
from pipelines.llm.stream import Coalescer, TextAssembler


def test_utf8_split_across_tokens_is_reassembled() -> None:
    text = "Grüße 👋 from the café"
    raw = text.encode()
    pieces = [raw[i : i + 3] for i in range(0, len(raw), 3)]  # cuts through characters
    assembler = TextAssembler([])
    out = "".join(assembler.feed(p) for p in pieces) + assembler.finish()
    assert out == text == assembler.text
    assert assembler.stopped is None


def test_stop_string_across_tokens_is_held_back_and_cut() -> None:
    assembler = TextAssembler(["END", "\n\n"])
    released = [assembler.feed(p.encode()) for p in ("The answer", " is 4", ". E", "N", "D more")]
    assert released == ["The answer", " is 4", ". ", "", ""]
    assert assembler.stopped == "END"
    assert assembler.text == "The answer is 4. "
    assert assembler.finish() == ""


def test_held_text_that_is_not_a_stop_string_is_released() -> None:
    assembler = TextAssembler(["STOP"])
    assert assembler.feed(b"go ST") == "go "
    assert assembler.feed(b"ART") == "START"
    assert assembler.feed(b" ST") == " "
    assert assembler.finish() == "ST"
    assert assembler.text == "go START ST"


def test_coalescer_rules() -> None:
    c = Coalescer(flush_ms=100, flush_tokens=4, sentence_end=True, first_token=True)
    assert c.add("Hi", 0.0) == ("Hi", 1)  # first token at once
    assert c.add(" the", 0.01) is None
    assert c.add(" cat", 0.02) is None
    assert c.add(" sat", 0.03) is None
    assert c.add(" on", 0.04) == (" the cat sat on", 4)  # token count
    assert c.add(" the", 0.05) is None
    assert c.add(" mat", 0.2) == (" the mat", 2)  # age of the oldest buffered token
    assert c.add(".", 0.21) == (".", 1)  # sentence end
    assert c.add(" And", 0.22) is None
    assert c.flush() == (" And", 1)
    assert c.flush() is None


def test_coalescer_without_first_token_or_sentences() -> None:
    c = Coalescer(flush_ms=1e9, flush_tokens=3, sentence_end=False, first_token=False)
    assert [c.add(t, 0.0) for t in ("a.", "b.", "c.")] == [None, None, ("a.b.c.", 3)]


def _state(n: int, size: int) -> KvState:
    return KvState(tuple(range(n)), b"x" * size)


def test_lru_bounds_entries_and_bytes() -> None:
    evicted: list[str] = []
    lru: KvLru[str, KvState] = KvLru(3, 1000, lambda s: s.nbytes, lambda k, _v: evicted.append(k))
    for key in "abc":
        assert lru.put(key, _state(10, 100))  # 140 bytes each
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("d", _state(10, 100))
    assert evicted == ["b"]
    lru.put("e", _state(10, 800))  # bytes: evicts from the back until <= 1000
    assert lru.nbytes <= 1000
    assert "e" in lru.peek_keys()
    assert lru.put("huge", _state(10, 5000)) is False
    assert lru.get("huge") is None
    status = lru.status()
    assert status["evictions"] == len(evicted) >= 2
    assert status["hits"] == 1


def test_sessions_spill_to_disk_and_come_back(tmp_path: Path) -> None:
    identity = {"model": "m", "sha256": "0" * 64, "n_ctx": 512, "kv_cache_type": "f16"}
    store = SessionStore(
        max_entries=1, max_bytes=10**6, disk_dir=tmp_path, max_disk_bytes=10**6,
        model_identity=identity,
    )  # fmt: skip
    first = Session("s1", [{"role": "user", "content": "hi"}], _state(5, 64))
    store.put(first)
    store.put(Session("s2", [{"role": "user", "content": "yo"}], _state(3, 32)))  # evicts s1
    assert len(list(tmp_path.glob("*.session"))) == 1
    back = store.get("s1")
    assert back is not None
    assert back.messages == first.messages
    assert back.state == first.state
    assert store.status()["disk"]["reads"] == 1
    # a file written for another model is ignored and removed
    other = SessionStore(
        max_entries=1, max_bytes=10**6, disk_dir=tmp_path, max_disk_bytes=10**6,
        model_identity={**identity, "sha256": "1" * 64},
    )  # fmt: skip
    store.put(Session("s3", [], _state(2, 16)))  # evicts s1 again -> disk
    assert other.get("s1") is None
    assert other.status()["disk"]["errors"] == 1
    assert store.drop("s3") is True
    assert store.get("s3") is None


def test_session_disk_is_bounded(tmp_path: Path) -> None:
    store = SessionStore(
        max_entries=0, max_bytes=0, disk_dir=tmp_path, max_disk_bytes=3000, model_identity={}
    )
    for i in range(10):
        store.put(Session(f"s{i}", [], _state(10, 1000)))
    total = sum(p.stat().st_size for p in tmp_path.glob("*.session"))
    assert 0 < total <= 3000


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({}, "exactly one of"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
        ({"prompt": "a", "session_id": "s"}, "needs `messages`"),
        ({"prompt": "a", "json_schema": {}, "grammar": "root ::= x"}, "at most one"),
        ({"prompt": "a", "stop": [""]}, "must not be empty"),
        ({"prompt": "a", "request_id": "has/slash"}, "pattern"),
        ({"prompt": "a", "temperature": -1}, "greater than or equal"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ],
)
def test_request_validation(args: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        GenerateRequest.model_validate(args)


def test_pipeline_config_union_and_engine_checks() -> None:
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(PipelineConfig)
    cfg = adapter.validate_python({"type": "llm", "name": "chat", "model": "m"})
    assert isinstance(cfg, LlmPipelineConfig)
    assert cfg.engine.use_mmap is True
    with pytest.raises(ValidationError, match="needs flash_attn"):
        LlamaCppConfig(kv_cache_type="q8_0")
    assert LlamaCppConfig(kv_cache_type="q8_0", flash_attn=True).kv_cache_type == "q8_0"
    with pytest.raises(ValidationError, match="Extra inputs"):
        adapter.validate_python({"type": "llm", "name": "x", "model": "m", "n_ctx": 5})


def test_summary_of_detection_counts() -> None:
    street = Window()
    for counts in ({"person": 2, "car": 1}, {"person": 3}, {}, {"person": 1, "bicycle": 0}):
        street.add_frame(counts)
    street.events.append("line_crossed")
    text = summarise({"street": street, "idle": Window()}, 30.0)
    expected = (
        "Camera 'street', last 30 s, 4 frames: person in 75% of frames (at most 3 at once, "
        "2.0 on average when present); car in 25% of frames (at most 1 at once, 1.0 on "
        "average when present). Events: line_crossed."
    )
    assert text.splitlines() == [expected]
    assert summarise({"idle": Window()}, 30.0) == ""


def test_tee_feeds_listeners_and_forwards() -> None:
    sink = MemorySink()
    tee = ResultTee(sink)
    seen: list[str] = []
    unsubscribe = tee.subscribe(lambda topic, _m: seen.append(topic))

    def broken(_topic: str, _m: Any) -> None:
        raise RuntimeError("listener bug")

    tee.subscribe(broken)
    tee.publish("vision/a/detections", {"counts": {}})
    unsubscribe()
    tee.publish("vision/a/detections", {"counts": {}})
    assert seen == ["vision/a/detections"]
    assert len(sink.on("vision/a/detections")) == 2
    assert tee.listener_errors == 2
