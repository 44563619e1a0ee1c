"""Config of the llama.cpp engine (GGUF language models through llama-cpp-python).

Nothing here imports llama_cpp, so a config validates on a machine without it; the runtime is
imported when the engine is opened (``engines.llama.open_llama``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engines.configbase import StrictModel

__all__ = ["KV_CACHE_TYPES", "LlamaCppConfig"]

KV_CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6}
"""KV cache element type name -> ggml type id (``type_k``/``type_v`` of the llama context)."""


class LlamaCppConfig(StrictModel):
    type: Literal["llamacpp"] = Field(
        default="llamacpp", description="Selects the llama.cpp engine (GGUF models)."
    )
    n_ctx: int = Field(
        default=2048,
        ge=64,
        le=131072,
        description="Context size in tokens (prompt + answer); capped at the model's trained "
        "context length. The KV cache grows with it.",
    )
    n_batch: int = Field(
        default=128,
        ge=8,
        le=4096,
        description="Prompt tokens evaluated per llama.cpp call. The prompt is evaluated in "
        "chunks of this size, so progress is reported and a cancel lands between chunks (and "
        "inside a chunk through the abort callback).",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="Threads for decoding; default: one per CPU of the `llm` pinning stage.",
    )
    batch_threads: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="Threads for prompt evaluation; default: one per CPU of the `llm` stage.",
    )
    n_gpu_layers: int = Field(
        default=0,
        ge=-1,
        description="Layers offloaded to the GPU (CUDA builds, e.g. Jetson); -1 = all, 0 = CPU.",
    )
    use_mmap: bool = Field(
        default=True,
        description="Map the GGUF file instead of reading it: pages load on demand and are "
        "shared with the page cache, so resident memory stays below the file size.",
    )
    use_mlock: bool = Field(
        default=False,
        description="Lock the model's pages in RAM (needs CAP_IPC_LOCK or a high "
        "LimitMEMLOCK=); avoids paging stalls on a loaded device.",
    )
    flash_attn: bool = Field(
        default=False,
        description="Use flash attention (fewer KV reads; required for a quantised V cache).",
    )
    kv_cache_type: Literal["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0"] = Field(
        default="f16",
        description="Element type of the KV cache (K and V); q8_0 halves its memory. A "
        "quantised type needs `flash_attn = true`.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Default sampling seed of a request that names none.",
    )

    @model_validator(mode="after")
    def _check_kv(self) -> LlamaCppConfig:
        if self.kv_cache_type not in ("f16", "f32") and not self.flash_attn:
            raise ValueError(
                f'kv_cache_type = "{self.kv_cache_type}" needs flash_attn = true (llama.cpp '
                "quantises the V cache only with flash attention)"
            )
        return self
