"""Our own GGUF check: what it reads from the real models, and the typed errors for bad files
(bad magic, unknown version, truncated header or data, unsupported file or tensor type) — and
that ``open_llama`` raises them before llama.cpp sees the file."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from engines.errors import ModelFileError, ModelFormatError, ModelUnsupportedError
from engines.gguf import TENSOR_TYPES, inspect_gguf, read_gguf_header
from engines.llama import open_llama
from engines.llama_config import LlamaCppConfig

CPUS = frozenset(os.sched_getaffinity(0))


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, value: Any) -> bytes:
    head = _s(key) + struct.pack("<I", kind)
    if kind == 8:
        return head + _s(value)
    fmt = {4: "<I", 5: "<i", 6: "<f", 10: "<Q"}[kind]
    return head + struct.pack(fmt, value)


def write_gguf(
    path: Path,
    kvs: list[bytes],
    tensors: list[tuple[str, tuple[int, ...], int]],
    *,
    version: int = 3,
    magic: bytes = b"GGUF",
    data_bytes: int | None = None,
) -> int:
    """A GGUF file with the given key/values and tensors (data zero-filled); returns the size
    of the tensor data it should have."""
    infos = b""
    offset = 0
    for name, shape, ggml_type in tensors:
        _n, block, size = TENSOR_TYPES.get(ggml_type, ("?", 1, 1))
        infos += _s(name) + struct.pack("<I", len(shape))
        infos += b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", ggml_type, offset)
        count = 1
        for d in shape:
            count *= d
        offset += (count // block * size + 31) // 32 * 32
    head = magic + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + infos
    pad = (-len(head)) % 32
    data = offset if data_bytes is None else data_bytes
    path.write_bytes(head + b"\0" * pad + b"\0" * data)
    return offset


def _base_kvs(arch: str = "llama", file_type: int = 1) -> list[bytes]:
    return [
        _kv("general.architecture", 8, arch),
        _kv(f"{arch}.context_length", 4, 4096),
        _kv("general.file_type", 4, file_type),
    ]


def test_real_model_header(smollm_path: Path) -> None:
    info = inspect_gguf(smollm_path)
    assert (info.version, info.architecture, info.quantization) == (3, "llama", "Q4_1")
    assert info.context_length == 8192
    assert info.chat_template is True
    assert info.tensor_count == 272
    assert info.tensor_types["Q4_1"] > 200
    header = read_gguf_header(smollm_path, tensors=True)
    assert header.data_offset + info.data_size == info.file_size


def test_base_model_without_chat_template(gemma_path: Path) -> None:
    info = inspect_gguf(gemma_path)
    assert (info.architecture, info.quantization, info.chat_template) == (
        "gemma3",
        "Q4_K_M",
        False,
    )
    assert info.data_size + read_gguf_header(gemma_path, tensors=True).data_offset == (
        info.file_size
    )


def test_synthetic_file_is_read_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    tensors = [("a", (64, 4), 1), ("b", (256, 2), 12), ("c", (32,), 0)]
    size = write_gguf(path, _base_kvs(), tensors)
    info = inspect_gguf(path)
    assert info.quantization == "F16"
    assert info.tensor_types == {"F16": 1, "Q4_K": 1, "F32": 1}
    assert info.data_size <= size


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("magic", ModelFormatError, "not a GGUF file"),
        ("version", ModelFormatError, "version 7 is not supported"),
        ("empty", ModelFormatError, "not a GGUF file"),
        ("header_cut", ModelFormatError, "ends early"),
        ("data_cut", ModelFormatError, "truncated"),
        ("file_type", ModelUnsupportedError, "file type 5"),
        ("tensor_type", ModelUnsupportedError, "ggml type 4"),
        ("no_arch", ModelFormatError, "no general.architecture"),
        ("no_ctx", ModelFormatError, "context_length"),
        ("bad_shape", ModelFormatError, "not valid for Q4_K"),
        ("huge_count", ModelFormatError, "implausible"),
    ],
)
def test_bad_files_are_typed_errors(
    tmp_path: Path, case: str, error: type[Exception], match: str
) -> None:
    path = tmp_path / f"{case}.gguf"
    tensors = [("w", (256, 4), 12)]
    if case == "magic":
        write_gguf(path, _base_kvs(), tensors, magic=b"GGML")
    elif case == "version":
        write_gguf(path, _base_kvs(), tensors, version=7)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "header_cut":
        write_gguf(path, _base_kvs(), tensors)
        path.write_bytes(path.read_bytes()[:60])
    elif case == "data_cut":
        write_gguf(path, _base_kvs(), tensors)
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "file_type":
        write_gguf(path, _base_kvs(file_type=5), tensors)  # Q4_2: removed from llama.cpp
    elif case == "tensor_type":
        write_gguf(path, _base_kvs(), [("w", (64, 4), 4)], data_bytes=256)
    elif case == "no_arch":
        write_gguf(path, _base_kvs()[1:], tensors)
    elif case == "no_ctx":
        write_gguf(path, [_base_kvs()[0], _base_kvs()[2]], tensors)
    elif case == "bad_shape":
        write_gguf(path, _base_kvs(), [("w", (100, 4), 12)], data_bytes=4096)
    elif case == "huge_count":
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1 << 40))
    with pytest.raises(error, match=match) as caught:
        inspect_gguf(path)
    assert "\n" not in str(caught.value)
    # the engine runs the same check first: llama.cpp never sees the file
    with pytest.raises(error, match=match):
        open_llama(LlamaCppConfig(), path, cpus=CPUS, runtime_loader=_no_runtime)


def _no_runtime() -> Any:
    raise AssertionError("llama.cpp was reached with a file our check should have refused")


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot read"):
        inspect_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="not a regular file"):
        inspect_gguf(tmp_path)


def test_truncated_real_model_is_refused_before_llama_cpp(
    smollm_path: Path, tmp_path: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm_path.open("rb") as src, cut.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.truncate(smollm_path.stat().st_size - 4096)
    with pytest.raises(ModelFormatError, match="truncated"):
        open_llama(LlamaCppConfig(), cut, cpus=CPUS)


def test_patched_real_model_type_is_unsupported(smollm_path: Path, tmp_path: Path) -> None:
    raw = bytearray(smollm_path.read_bytes()[: 4 << 20])
    key = b"general.file_type"
    at = raw.index(key) + len(key)
    assert struct.unpack_from("<I", raw, at)[0] == 4  # value type uint32
    assert struct.unpack_from("<I", raw, at + 4)[0] == 3  # Q4_1
    struct.pack_into("<I", raw, at + 4, 6)  # Q4_3: removed from llama.cpp long ago
    patched = tmp_path / "q4_3.gguf"
    patched.write_bytes(bytes(raw))
    with pytest.raises(ModelUnsupportedError, match="file type 6"):
        open_llama(LlamaCppConfig(), patched, cpus=CPUS)
