"""The llama.cpp engine: a GGUF language model behind a small interface.

``open_llama(config, path, cpus=...)`` checks the file with our own GGUF reader first
(``engines.gguf.inspect_gguf``: magic, version, architecture, context length, quantisation,
truncation), so a bad file is a typed ``EngineError`` and never reaches llama.cpp; then it
loads the model with llama-cpp-python (mmap by default, optional mlock, threads from the CPU
set, GPU layers, flash attention, KV-cache type) and returns a :class:`LlamaEngine`:

- ``tokenize`` / ``detokenize`` / ``format_chat`` (the model's own chat template),
- ``evaluate(tokens)``: bring the KV cache to exactly ``tokens``: the longest common prefix with
  what the cache already holds is kept, the rest is evaluated in chunks of ``n_batch`` tokens
  (``on_chunk`` reports progress after each),
- ``generate(sampling)``: an iterator of sampled tokens continuing the evaluated tokens (each
  ``next`` decodes the previous token, then samples),
- ``save_state`` / ``load_state``: the KV cells of the sequence as bytes plus their tokens
  (``llama_state_seq_get_data``/``set_data``), for sessions and prefix caches,
- ``abort()``: stop the llama.cpp call in flight from any thread; the call raises
  ``InferenceAbortedError`` and the cache keeps every chunk completed before it,
- ``perf()``: llama.cpp's own counters (prompt tokens evaluated, tokens decoded, times).

Abort: llama.cpp calls an abort callback after every graph node on the computing thread; the
engine itself checks the flag only between prompt chunks (a flag set after llama.cpp's last node
check), so an abort always lands in the current or next llama.cpp call. A
Python callback there would take the GIL hundreds of times per token (and wait for it while
other threads run), so the callback is libc's ``strlen`` on a two-byte flag buffer: it returns
0 while the flag byte is 0 and 1 once ``abort()`` set it — a C-level flag read with no Python
involved, on every platform with a C library.

One context is not thread-safe: exactly one thread (the LLM worker) calls everything except
``abort`` and ``status``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from engines.affinity import thread_count
from engines.errors import (
    EngineClosedError,
    EngineUnavailableError,
    InferenceAbortedError,
    InferenceError,
    InputSpecError,
    ModelLoadError,
)
from engines.gguf import GgufInfo, inspect_gguf
from engines.llama_config import KV_CACHE_TYPES, LlamaCppConfig

__all__ = [
    "ChatPrompt",
    "EvalStats",
    "KvState",
    "LlamaEngine",
    "Sampling",
    "common_prefix",
    "load_llama_runtime",
    "open_llama",
]

_log = logging.getLogger(__name__)

_INSTALL_FIX = (
    "install llama-cpp-python (`uv sync`, or `pip install llama-cpp-python`; on a Jetson build "
    'it with CMAKE_ARGS="-DGGML_CUDA=on")'
)


def load_llama_runtime() -> ModuleType:
    """Import ``llama_cpp``; ``EngineUnavailableError`` names the fix when it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise EngineUnavailableError(
            f"the llama.cpp engine needs llama_cpp ({exc}): {_INSTALL_FIX}"
        ) from exc
    except OSError as exc:  # the shared library is there but does not load
        raise EngineUnavailableError(
            f"llama_cpp is installed but its library does not load ({exc}): reinstall it"
        ) from exc


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. ``temperature`` 0 is greedy (deterministic)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    grammar: str | None = None
    """A GBNF grammar constraining the output."""
    json_schema: Mapping[str, Any] | None = None
    """A JSON schema the output must satisfy (converted to a grammar by llama-cpp-python)."""


@dataclass(frozen=True)
class ChatPrompt:
    """A chat rendered with the model's template: the text, extra stop strings, and the
    length (characters) of the part made of the leading system messages (0 if none)."""

    text: str
    stop: tuple[str, ...]
    system_prefix: str


@dataclass(frozen=True)
class EvalStats:
    tokens: int
    """Tokens in the cache after the call (the prompt)."""
    reused: int
    """Leading tokens kept from the cache."""
    evaluated: int
    """Tokens evaluated by llama.cpp in this call."""
    seconds: float


@dataclass(frozen=True)
class KvState:
    """The KV cache of the sequence as bytes, and the tokens it holds."""

    tokens: tuple[int, ...]
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data) + 4 * len(self.tokens)


class _AbortFlag:
    """A two-byte buffer and libc ``strlen`` as llama.cpp's abort callback (module docstring)."""

    def __init__(self, callback_type: Any) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        address = ctypes.cast(libc.strlen, ctypes.c_void_p).value
        self.buffer = ctypes.create_string_buffer(2)
        self.callback = callback_type(address)
        self.data = ctypes.cast(self.buffer, ctypes.c_void_p)

    def set(self) -> None:
        self.buffer[0] = b"\x01"

    def clear(self) -> None:
        self.buffer[0] = b"\x00"

    def is_set(self) -> bool:
        return self.buffer[0] != b"\x00"


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` share (at most ``limit`` when given)."""
    n = min(len(a), len(b))
    if limit is not None:
        n = min(n, limit)
    i = 0
    while i < n and int(a[i]) == int(b[i]):
        i += 1
    return i


class LlamaEngine:
    """A loaded GGUF model with one llama.cpp context (see the module docstring)."""

    def __init__(
        self,
        llama: Any,
        runtime: ModuleType,
        info: GgufInfo,
        config: LlamaCppConfig,
        *,
        threads: int,
        batch_threads: int,
    ) -> None:
        self._llama = llama
        self._rt = runtime
        self.info = info
        self.config = config
        self.threads = threads
        self.batch_threads = batch_threads
        self._closed = False
        self._lock = threading.Lock()
        self._vocab = runtime.llama_model_get_vocab(llama.model)
        self._abort = _AbortFlag(runtime.ggml_abort_callback)
        runtime.llama_set_abort_callback(llama.ctx, self._abort.callback, self._abort.data)
        self._chat = self._chat_formatter()
        self.n_ctx = int(llama.n_ctx())
        self.eos_text = self._token_text(llama.token_eos())

    # ------------------------------------------------------------------ basics

    def _check(self) -> None:
        if self._closed:
            raise EngineClosedError(f"llama.cpp engine for {self.info.path} is closed")

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llama.detokenize([token], special=True)).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokens of ``text`` (``special``: control tokens such as ``<|im_start|>`` are parsed)."""
        self._check()
        try:
            return list(self._llama.tokenize(text.encode("utf-8"), add_bos, special))
        except RuntimeError as exc:
            raise InputSpecError(f"cannot tokenize the prompt: {exc}") from exc

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """The bytes of ``tokens`` (control tokens left out). Pieces may split UTF-8
        characters: decode incrementally."""
        self._check()
        return bytes(self._llama.detokenize(list(tokens)))

    def is_end_of_generation(self, token: int) -> bool:
        """True for end-of-sequence / end-of-turn tokens of this vocabulary."""
        return bool(self._rt.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------------ chat template

    def _chat_formatter(self) -> Any:
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        chat_format = importlib.import_module("llama_cpp.llama_chat_format")
        return chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llama.token_eos()),
            bos_token=self._token_text(self._llama.token_bos()),
        )

    def format_chat(self, messages: Sequence[Mapping[str, str]]) -> ChatPrompt:
        """Render ``messages`` (role, content) with the model's chat template, ending with the
        assistant's turn. ``InputSpecError`` when the model has no template or the template
        rejects the messages (e.g. roles out of order)."""
        self._check()
        if self._chat is None:
            raise InputSpecError(
                f"model {self.info.name or self.info.path.name} has no chat template; send a "
                "plain `prompt` instead of `messages`"
            )
        rendered = self._render(messages, generation=True)
        n_system = 0
        while n_system < len(messages) and messages[n_system].get("role") == "system":
            n_system += 1
        system = ""
        if 0 < n_system < len(messages):
            prefix = self._render(messages[:n_system], generation=False)
            system = prefix if rendered.startswith(prefix) else ""
        stop = tuple(s for s in (self.eos_text,) if s)
        return ChatPrompt(rendered, stop, system)

    def _render(self, messages: Sequence[Mapping[str, str]], *, generation: bool) -> str:
        formatter = self._chat
        previous = formatter.add_generation_prompt
        formatter.add_generation_prompt = generation
        try:
            response = formatter(messages=[dict(m) for m in messages])
        except Exception as exc:  # jinja2 raises several types; the template is user data
            raise InputSpecError(f"the model's chat template rejected the messages: {exc}") from exc
        finally:
            formatter.add_generation_prompt = previous
        return str(response.prompt)

    # ------------------------------------------------------------------ evaluation

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        """The tokens whose keys and values the cache holds now, in order."""
        return tuple(int(t) for t in self._llama.input_ids[: self._llama.n_tokens])

    def abort(self) -> None:
        """Stop the llama.cpp call in flight (safe from any thread); the worker clears the
        flag with ``clear_abort`` before the next request."""
        self._abort.set()

    def clear_abort(self) -> None:
        self._abort.clear()

    @property
    def abort_requested(self) -> bool:
        return self._abort.is_set()

    def _raise_aborted(self, what: str) -> InferenceAbortedError:
        return InferenceAbortedError(f"{what} aborted on request")

    def evaluate(
        self,
        tokens: Sequence[int],
        *,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> EvalStats:
        """Make the cache hold exactly ``tokens`` with logits for the last one.

        The longest common prefix with the cache is kept (at least the last token is
        evaluated again so that its logits exist); the rest goes to llama.cpp in chunks of
        ``n_batch``; ``on_chunk(done, total)`` after each. ``InferenceAbortedError`` when
        ``abort()`` was called: the cache then holds the chunks completed before it.
        """
        self._check()
        llama = self._llama
        total = len(tokens)
        if total == 0:
            raise InputSpecError("the prompt is empty; give at least one token of text")
        if total >= self.n_ctx:
            raise InputSpecError(
                f"the prompt has {total} tokens, the context holds {self.n_ctx}: shorten it or "
                "raise engine.n_ctx"
            )
        started = time.perf_counter()
        reused = common_prefix(llama.input_ids[: llama.n_tokens], tokens, limit=total - 1)
        llama.n_tokens = reused  # Llama.eval drops the cache cells from here on
        done = reused
        step = self.config.n_batch
        while done < total:
            chunk = list(tokens[done : min(total, done + step)])
            try:
                llama.eval(chunk)
            except RuntimeError as exc:
                if self._abort.is_set():
                    raise self._raise_aborted(
                        f"prompt evaluation at token {done} of {total}"
                    ) from exc
                raise InferenceError(f"llama.cpp failed evaluating the prompt: {exc}") from exc
            done += len(chunk)
            if on_chunk is not None:
                on_chunk(done, total)
            if done < total and self._abort.is_set():  # set after llama.cpp's last check
                raise self._raise_aborted(f"prompt evaluation at token {done} of {total}")
        return EvalStats(total, reused, total - reused, time.perf_counter() - started)

    def generate(self, sampling: Sampling) -> Iterator[int]:
        """Tokens sampled after the evaluated prompt; each ``next`` decodes the previous token
        first. Stop iterating to stop (the last yielded token is then not in the cache).
        ``InferenceAbortedError`` when ``abort()`` hit a decode step."""
        self._check()
        llama = self._llama
        grammar = self._grammar(sampling)
        llama.set_seed(sampling.seed)
        tokens = self.cached_tokens
        if not tokens:
            raise InputSpecError("generate() before evaluate(): no prompt in the cache")
        stream = llama.generate(
            list(tokens),
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
            grammar=grammar,
        )
        return self._guarded(stream)

    def _guarded(self, stream: Iterator[int]) -> Iterator[int]:
        try:
            while True:
                try:
                    token = next(stream)  # decodes the previous token: aborts there if asked
                except StopIteration:
                    return
                except RuntimeError as exc:
                    if self._abort.is_set():
                        raise self._raise_aborted("decoding") from exc
                    raise InferenceError(f"llama.cpp failed while decoding: {exc}") from exc
                yield int(token)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def _grammar(self, sampling: Sampling) -> Any:
        """A ``LlamaGrammar`` for the request, parsed by llama.cpp here first: llama-cpp-python
        hands the text to ``llama_sampler_init_grammar`` without checking its result, and a
        grammar that does not parse would then crash the process."""
        if sampling.grammar is None and sampling.json_schema is None:
            return None
        grammar_mod = importlib.import_module("llama_cpp.llama_grammar")
        what = "JSON schema" if sampling.json_schema is not None else "grammar"
        try:
            if sampling.json_schema is not None:
                grammar = grammar_mod.LlamaGrammar.from_json_schema(
                    json.dumps(sampling.json_schema), verbose=False
                )
            else:
                grammar = grammar_mod.LlamaGrammar.from_string(sampling.grammar, verbose=False)
        except (ValueError, RuntimeError, TypeError, KeyError, RecursionError) as exc:
            raise InputSpecError(f"the {what} cannot be used: {exc}") from exc
        text = str(grammar._grammar).encode("utf-8")  # the GBNF text (no public accessor)
        sampler = self._rt.llama_sampler_init_grammar(self._vocab, text, b"root")
        if not sampler:
            raise InputSpecError(
                f"the {what} does not parse as a llama.cpp GBNF grammar with a `root` rule "
                "(see llama.cpp's grammars/README.md)"
            )
        self._rt.llama_sampler_free(sampler)
        return grammar

    # ------------------------------------------------------------------ state

    def save_state(self) -> KvState:
        """The cache's cells of sequence 0 and the tokens they hold."""
        self._check()
        rt, ctx = self._rt, self._llama.ctx
        size = int(rt.llama_state_seq_get_size(ctx, 0))
        buf = (ctypes.c_uint8 * size)()
        written = int(rt.llama_state_seq_get_data(ctx, buf, size, 0))
        if written <= 0 or written > size:
            raise InferenceError(f"llama.cpp could not copy the KV state ({written} of {size})")
        return KvState(self.cached_tokens, bytes(memoryview(buf)[:written]))

    def load_state(self, state: KvState) -> None:
        """Replace the cache with ``state`` (from ``save_state`` of the same model and
        context size)."""
        self._check()
        rt, llama = self._rt, self._llama
        if len(state.tokens) >= self.n_ctx:
            raise InputSpecError(f"saved state of {len(state.tokens)} tokens exceeds n_ctx")
        self.forget()
        buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if int(rt.llama_state_seq_set_data(llama.ctx, buf, len(state.data), 0)) == 0:
            self.forget()
            raise InferenceError("llama.cpp rejected a saved KV state (another model or n_ctx?)")
        n = len(state.tokens)
        llama.input_ids[:n] = state.tokens
        llama.n_tokens = n

    def forget(self) -> None:
        """Empty the cache."""
        self._check()
        memory = self._rt.llama_get_memory(self._llama.ctx)
        if memory is not None:
            self._rt.llama_memory_seq_rm(memory, -1, -1, -1)
        self._llama.n_tokens = 0

    # ------------------------------------------------------------------ figures

    def perf(self) -> dict[str, float]:
        """llama.cpp's counters since the last ``reset_perf``: prompt tokens evaluated in
        batches (``n_p_eval``), single-token decodes (``n_eval``), their times in ms. llama.cpp
        reports a count of 0 as 1."""
        self._check()
        ctx = self._llama.ctx
        self._rt.llama_synchronize(ctx)  # llama.cpp books queued tokens when it synchronises
        data = self._rt.llama_perf_context(ctx)
        return {
            "n_p_eval": int(data.n_p_eval),
            "n_eval": int(data.n_eval),
            "t_p_eval_ms": float(data.t_p_eval_ms),
            "t_eval_ms": float(data.t_eval_ms),
            "t_load_ms": float(data.t_load_ms),
        }

    def reset_perf(self) -> None:
        """Zero the counters (after booking what llama.cpp still has queued)."""
        self._check()
        self._rt.llama_synchronize(self._llama.ctx)
        self._rt.llama_perf_context_reset(self._llama.ctx)

    def status(self) -> dict[str, Any]:
        return {
            "backend": "llamacpp",
            "model": self.info.as_dict(),
            "n_ctx": self.n_ctx,
            "n_batch": self.config.n_batch,
            "threads": self.threads,
            "batch_threads": self.batch_threads,
            "n_gpu_layers": self.config.n_gpu_layers,
            "mmap": self.config.use_mmap,
            "mlock": self.config.use_mlock,
            "flash_attn": self.config.flash_attn,
            "kv_cache_type": self.config.kv_cache_type,
            "closed": self._closed,
        }

    def close(self) -> None:
        """Free the context and the model (safe to call twice)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._llama.close()

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_llama(
    config: LlamaCppConfig,
    model_path: Path,
    *,
    cpus: frozenset[int],
    runtime_loader: Callable[[], ModuleType] = load_llama_runtime,
) -> LlamaEngine:
    """Check ``model_path`` (GGUF header, types, size), then load it with llama.cpp.

    Threads default to one per CPU of ``cpus`` (the ``llm`` pinning stage); the calling thread
    of later ``evaluate``/``generate`` calls should be pinned to the same set, llama.cpp's
    worker threads inherit its mask.
    """
    info = inspect_gguf(Path(model_path))
    runtime = runtime_loader()
    threads = config.threads or thread_count(cpus)
    batch_threads = config.batch_threads or thread_count(cpus)
    n_ctx = min(config.n_ctx, info.context_length)
    llama_mod = importlib.import_module("llama_cpp.llama")
    kv_type = KV_CACHE_TYPES[config.kv_cache_type]
    try:
        llama = llama_mod.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=config.n_batch,
            n_ubatch=config.n_batch,
            n_threads=threads,
            n_threads_batch=batch_threads,
            n_gpu_layers=config.n_gpu_layers,
            use_mmap=config.use_mmap,
            use_mlock=config.use_mlock,
            flash_attn=config.flash_attn,
            type_k=kv_type,
            type_v=kv_type,
            seed=config.seed,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"llama.cpp could not load {model_path} ({info.architecture}, {info.quantization}): "
            f"{exc}; check that this llama-cpp-python supports the architecture"
        ) from exc
    try:
        engine = LlamaEngine(
            llama, runtime, info, config, threads=threads, batch_threads=batch_threads
        )
    except BaseException:
        llama.close()
        raise
    _log.info(
        "llama.cpp: %s (%s %s, %d tensors), n_ctx %d, %d/%d threads, mmap %s, mlock %s",
        model_path,
        info.architecture,
        info.quantization,
        info.tensor_count,
        n_ctx,
        threads,
        batch_threads,
        config.use_mmap,
        config.use_mlock,
    )
    return engine
