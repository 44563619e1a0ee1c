"""Every quantisation type loads and generates on real llama.cpp.

The files are SmolLM2-135M-Instruct re-quantised with ``llama_cpp.llama_model_quantize`` (see
llm_support: the F16 base comes from the Q4_1 file, every other type from that F16 base),
cached in ``~/.cache/edge-agent-test/gguf``. Our GGUF check must name each type, llama.cpp
must load it and greedy decoding must produce text.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from llm_support import QUANT_TYPES, quantize

from engines.gguf import inspect_gguf
from engines.llama import Sampling, open_llama
from engines.llama_config import LlamaCppConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ftype", list(QUANT_TYPES))
def test_quantisation_type_loads_and_generates(smollm_path: Path, ftype: str) -> None:
    path = quantize(smollm_path, ftype)
    info = inspect_gguf(path)
    assert info.quantization == ftype
    config = LlamaCppConfig(n_ctx=256, n_batch=64)
    with open_llama(config, path, cpus=frozenset(os.sched_getaffinity(0))) as engine:
        assert engine.status()["model"]["quantization"] == ftype
        engine.evaluate(engine.tokenize("1, 2, 3, 4, 5, 6, 7, 8,", add_bos=True))
        tokens, sampled = [], 0
        for token in engine.generate(Sampling(temperature=0.0)):
            sampled += 1
            if engine.is_end_of_generation(token) or len(tokens) == 6:
                break
            tokens.append(token)
        perf = engine.perf()
        text = engine.detokenize(tokens).decode("utf-8", "replace")
    assert tokens
    assert text.strip()
    assert perf["n_eval"] == sampled - 1  # every token after the first needed one decode
