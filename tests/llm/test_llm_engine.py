"""The llama.cpp engine on the real SmolLM2 model: tokens, chat template, prefix reuse counted
by llama.cpp itself, aborts inside llama.cpp calls (prompt and decode), KV state save/load,
JSON-schema constrained output."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from llm_support import LONG_TEXT

from engines.errors import EngineClosedError, InferenceAbortedError, InputSpecError
from engines.llama import LlamaEngine, Sampling, open_llama
from engines.llama_config import LlamaCppConfig

GREEDY = Sampling(temperature=0.0)


def _take(engine: LlamaEngine, sampling: Sampling, n: int) -> list[int]:
    out = []
    for token in engine.generate(sampling):
        if engine.is_end_of_generation(token):
            break
        out.append(token)
        if len(out) == n:
            break
    return out


def test_tokens_round_trip_and_chat_template(smollm: LlamaEngine) -> None:
    tokens = smollm.tokenize("Hello, wörld!", add_bos=False, special=False)
    assert smollm.detokenize(tokens).decode() == "Hello, wörld!"
    assert smollm.has_chat_template
    chat = smollm.format_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert chat.text.startswith(chat.system_prefix)
    assert "Be brief." in chat.system_prefix
    assert "Hi" not in chat.system_prefix
    assert chat.text.rstrip().endswith("assistant")
    with pytest.raises(InputSpecError, match="empty"):
        smollm.evaluate([])


def test_prefix_reuse_is_counted_by_llama_cpp(smollm: LlamaEngine) -> None:
    base = smollm.tokenize(LONG_TEXT * 3, add_bos=True)
    smollm.forget()
    smollm.reset_perf()
    first = smollm.evaluate(base)
    assert (first.reused, first.evaluated) == (0, len(base))
    assert smollm.perf()["n_p_eval"] == len(base)
    longer = base + smollm.tokenize(" Then it rains.", add_bos=False)
    smollm.reset_perf()
    second = smollm.evaluate(longer)
    assert second.reused == len(base)
    assert smollm.perf()["n_p_eval"] == len(longer) - len(base)
    assert smollm.cached_tokens == tuple(longer)
    # the same prompt again: only the last token is evaluated (its logits are needed)
    smollm.reset_perf()
    again = smollm.evaluate(longer)
    assert (again.reused, again.evaluated) == (len(longer) - 1, 1)
    assert smollm.perf()["n_eval"] == 1


def test_greedy_generation_is_deterministic(smollm: LlamaEngine) -> None:
    prompt = smollm.tokenize("The capital of France is", add_bos=True)
    smollm.evaluate(prompt)
    first = _take(smollm, GREEDY, 8)
    smollm.evaluate(prompt)
    second = _take(smollm, GREEDY, 8)
    assert first == second
    assert len(first) == 8
    assert "Paris" in smollm.detokenize(first).decode()


def test_abort_inside_prompt_evaluation(smollm: LlamaEngine) -> None:
    """The flag is set before the call: no Python check precedes the first chunk, so it is
    llama.cpp's abort callback (libc strlen on the flag) that stops llama_decode."""
    smollm.forget()
    tokens = smollm.tokenize(LONG_TEXT * 4, add_bos=True)
    smollm.abort()
    try:
        with pytest.raises(InferenceAbortedError) as caught:
            smollm.evaluate(tokens)
    finally:
        smollm.clear_abort()
    assert "returned 2" in str(caught.value.__cause__)  # llama_decode's "aborted"
    assert smollm.cached_tokens == ()
    # the context is usable right after
    assert smollm.evaluate(tokens).evaluated == len(tokens)


def test_abort_between_prompt_chunks_keeps_the_finished_chunks(smollm: LlamaEngine) -> None:
    smollm.forget()
    tokens = smollm.tokenize(LONG_TEXT * 4, add_bos=True)
    seen: list[int] = []

    def progress(done: int, _total: int) -> None:
        seen.append(done)
        if len(seen) == 2:
            smollm.abort()

    try:
        with pytest.raises(InferenceAbortedError, match=f"at token {2 * 64} of {len(tokens)}"):
            smollm.evaluate(tokens, on_chunk=progress)
    finally:
        smollm.clear_abort()
    assert seen == [64, 128]
    assert smollm.cached_tokens == tuple(tokens[:128])
    smollm.reset_perf()
    assert smollm.evaluate(tokens).reused == 128
    assert smollm.perf()["n_p_eval"] == len(tokens) - 128


def test_abort_inside_a_decode_step(smollm: LlamaEngine) -> None:
    prompt = smollm.tokenize("Count: 1, 2, 3, 4,", add_bos=True)
    smollm.evaluate(prompt)
    got: list[int] = []
    with pytest.raises(InferenceAbortedError) as caught:  # noqa: PT012 - abort mid-loop
        for token in smollm.generate(GREEDY):
            got.append(token)
            if len(got) == 3:
                smollm.abort()  # the next decode step is the call that aborts
    smollm.clear_abort()
    assert "returned 2" in str(caught.value.__cause__)
    assert len(got) == 3
    # prompt + the two tokens whose decode finished; the aborted step left nothing behind
    assert smollm.cached_tokens == (*prompt, *got[:2])


def test_abort_from_another_thread_while_decoding(smollm: LlamaEngine) -> None:
    prompt = smollm.tokenize("Count from one to one thousand: one, two, three,", add_bos=True)
    smollm.evaluate(prompt)
    started = threading.Event()
    count = 0
    error: list[BaseException] = []

    def decode() -> None:
        nonlocal count
        try:
            for _token in smollm.generate(GREEDY):
                count += 1
                started.set()
                if count > 2000:
                    return
        except InferenceAbortedError as exc:
            error.append(exc)

    worker = threading.Thread(target=decode)
    worker.start()
    assert started.wait(60)
    smollm.abort()
    worker.join(60)
    smollm.clear_abort()
    assert not worker.is_alive()
    assert len(error) == 1
    assert count < 2000


def test_state_save_and_load(smollm: LlamaEngine) -> None:
    prompt = smollm.tokenize(LONG_TEXT * 2, add_bos=True)
    smollm.forget()
    smollm.evaluate(prompt)
    state = smollm.save_state()
    assert state.tokens == tuple(prompt)
    # K and V of every token: 30 layers x 3 KV heads x 64 dims x 2 x 2 bytes (f16) = 23040
    assert len(state.data) >= 23040 * len(prompt)
    reference = _take(smollm, GREEDY, 6)
    smollm.forget()
    smollm.evaluate(smollm.tokenize("Something else entirely.", add_bos=True))
    smollm.load_state(state)
    assert smollm.cached_tokens == tuple(prompt)
    smollm.reset_perf()
    stats = smollm.evaluate(prompt)
    assert (stats.reused, stats.evaluated) == (len(prompt) - 1, 1)
    assert _take(smollm, GREEDY, 6) == reference


def test_json_schema_output_parses(smollm: LlamaEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
        "required": ["city", "people"],
    }
    chat = smollm.format_chat(
        [{"role": "user", "content": "Give a city and its number of people as JSON."}]
    )
    smollm.evaluate(smollm.tokenize(chat.text, add_bos=False))
    tokens = _take(smollm, Sampling(temperature=0.0, json_schema=schema), 80)
    value = json.loads(smollm.detokenize(tokens).decode())
    assert isinstance(value["city"], str)
    assert isinstance(value["people"], int)


def test_bad_grammar_is_a_typed_error(smollm: LlamaEngine) -> None:
    smollm.evaluate(smollm.tokenize("x", add_bos=True))
    with pytest.raises(InputSpecError, match="grammar"):
        next(iter(smollm.generate(Sampling(grammar="root ::= ("))))


def test_closed_engine(smollm_path: Path) -> None:
    engine = open_llama(LlamaCppConfig(n_ctx=256), smollm_path, cpus=frozenset({0}))
    assert engine.status()["threads"] == 1
    assert engine.status()["model"]["quantization"] == "Q4_1"
    engine.close()
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.tokenize("x")


def test_threads_follow_the_cpu_set(smollm_path: Path) -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    with open_llama(LlamaCppConfig(n_ctx=256), smollm_path, cpus=cpus) as engine:
        assert (engine.threads, engine.batch_threads) == (len(cpus), len(cpus))
        assert engine.n_ctx == 256
