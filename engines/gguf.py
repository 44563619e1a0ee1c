"""GGUF files read by our own code before llama.cpp ever sees them.

:func:`read_gguf_header` reads the header (ggml's ``docs/gguf.md``): the ``GGUF`` magic, the
version (1-3), the tensor and key/value counts, every key/value (arrays are skipped and shown as
``[N items]``) and, on request, the tensor infos (name, shape, ggml type, offset).

:func:`inspect_gguf` is the check the llama.cpp engine runs first: it reads the whole header and
the tensor infos and answers with a :class:`GgufInfo` (architecture, context length, file type as
a quantisation name, chat template present, tensor data size), or raises

- ``ModelFileError`` when the file cannot be read,
- ``ModelFormatError`` for a bad magic, an unknown version, a header that ends early, a header
  that is implausible (huge counts or strings), a missing architecture or context length, or
  tensor data that reaches past the end of the file (a truncated download),
- ``ModelUnsupportedError`` for a file type or tensor type this build does not know (removed
  formats such as Q4_2, or types newer than the table below).

so a bad file is a typed, one-line error and never a native abort inside llama.cpp.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import ModelFileError, ModelFormatError, ModelUnsupportedError

__all__ = [
    "FILE_TYPES",
    "GGUF_MAGIC",
    "TENSOR_TYPES",
    "GgufHeader",
    "GgufInfo",
    "TensorInfo",
    "inspect_gguf",
    "read_gguf_header",
]

GGUF_MAGIC = b"GGUF"

_VALUE_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
"""GGUF value types with a fixed size (8 = string, 9 = array are handled apart)."""

FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}  # fmt: skip
"""``general.file_type`` (llama.cpp's ``llama_ftype``) -> quantisation name. Values 4-6 (Q4_1
with F16 parts, Q4_2, Q4_3) and 33-35 (Q4_0_4_4 ...) were removed from llama.cpp: such files are
``ModelUnsupportedError``."""

TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}  # fmt: skip
"""ggml tensor type -> (name, elements per block, bytes per block), from ggml's type traits."""

_STRING_MAX = 1 << 24
_COUNT_MAX = 1 << 24
_DIMS_MAX = 4
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: shape (ggml order, fastest dimension first), type and offset
    relative to the start of the tensor data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        known = TENSOR_TYPES.get(self.ggml_type)
        return known[0] if known else f"type {self.ggml_type}"

    def nbytes(self) -> int:
        """Bytes of the tensor's data (``ModelUnsupportedError`` for an unknown type)."""
        known = TENSOR_TYPES.get(self.ggml_type)
        if known is None:
            raise ModelUnsupportedError(
                f"tensor {self.name} has unknown ggml type {self.ggml_type}"
            )
        _name, block, size = known
        return math.prod(self.shape) // block * size


@dataclass
class GgufHeader:
    """The fixed header and the key/values of a GGUF file (arrays: their length only)."""

    version: int
    tensor_count: int
    kv_count: int
    values: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    """Where the tensor data starts (after the header and padding); 0 unless tensors were read."""


class _Reader:
    """Reads GGUF fields from a buffer (the mmapped file), never past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self._buf = buf
        self._size = len(buf)
        self._path = path
        self.pos = 0
        self.len_fmt = "<Q"

    def _short(self) -> ModelFormatError:
        return ModelFormatError(
            f"{self._path}: GGUF header ends early (truncated file?); get the file again"
        )

    def take(self, n: int) -> bytes:
        if self.pos + n > self._size:
            raise self._short()
        data = bytes(self._buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > self._size:
            raise self._short()
        value = struct.unpack_from(fmt, self._buf, self.pos)[0]
        self.pos += size
        return value

    def count(self) -> int:
        n = int(self.unpack(self.len_fmt))
        if n > _COUNT_MAX:
            raise ModelFormatError(f"{self._path}: GGUF count {n} is implausible (corrupt file?)")
        return n

    def _length(self) -> int:
        n = int(self.unpack(self.len_fmt))
        if n > _STRING_MAX:
            raise ModelFormatError(f"{self._path}: GGUF string of {n} bytes (corrupt file?)")
        return n

    def string(self) -> str:
        return self.take(self._length()).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if self.pos + n > self._size:
            raise self._short()
        self.pos += n

    def value(self, kind: int) -> Any:
        if kind in _VALUE_FORMATS:
            return self.unpack(_VALUE_FORMATS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            inner = int(self.unpack("<I"))
            n = self.count()
            if inner in _VALUE_FORMATS:
                self.skip(n * struct.calcsize(_VALUE_FORMATS[inner]))
            elif inner == 8:
                for _ in range(n):
                    self.skip(self._length())
            else:
                for _ in range(n):
                    self.value(inner)
            return f"[{n} items]"
        raise ModelFormatError(f"{self._path}: unknown GGUF value type {kind} (corrupt file?)")


def read_gguf_header(path: Path, *, tensors: bool = False) -> GgufHeader:
    """Read a GGUF file's header: magic, version, tensor count, key/value count and values;
    with ``tensors`` also the tensor infos and where the tensor data starts.

    Layout (ggml's gguf.md): ``GGUF`` magic, uint32 version, then tensor count and key/value
    count (uint64; uint32 in version 1), then each key (string) with a uint32 type and value,
    then per tensor: name, uint32 dimension count, the dimensions, uint32 ggml type and uint64
    offset; the data follows, aligned to ``general.alignment`` (default 32). The file is
    mapped read-only, so only the pages of the header are read.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:  # mmap cannot map an empty file
                return _read(f.read(), path, tensors=tensors)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _read(buf, path, tensors=tensors)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read(buf: mmap.mmap | bytes, path: Path, *, tensors: bool) -> GgufHeader:
    reader = _Reader(buf, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF'); give a .gguf model"
        )
    reader.pos = 4
    version = int(reader.unpack("<I"))
    if version not in (1, 2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (1-3)")
    reader.len_fmt = "<I" if version == 1 else "<Q"
    header = GgufHeader(version, reader.count(), reader.count())
    for _ in range(header.kv_count):
        key = reader.string()
        header.values[key] = reader.value(int(reader.unpack("<I")))
    if not tensors:
        return header
    for _ in range(header.tensor_count):
        name = reader.string()
        n_dims = int(reader.unpack("<I"))
        if n_dims > _DIMS_MAX:
            raise ModelFormatError(
                f"{path}: tensor {name} has {n_dims} dimensions (at most {_DIMS_MAX}); "
                "corrupt file?"
            )
        shape = tuple(int(reader.unpack(reader.len_fmt)) for _ in range(n_dims))
        ggml_type = int(reader.unpack("<I"))
        offset = int(reader.unpack("<Q"))
        header.tensors.append(TensorInfo(name, shape, ggml_type, offset))
    alignment = header.values.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    header.data_offset = (reader.pos + alignment - 1) // alignment * alignment
    return header


@dataclass(frozen=True)
class GgufInfo:
    """What :func:`inspect_gguf` found in a checked GGUF file."""

    path: Path
    version: int
    architecture: str
    name: str | None
    context_length: int
    file_type: int | None
    quantization: str
    """Name of ``general.file_type`` (``Q4_K_M``), or of the dominant tensor type without it."""
    chat_template: bool
    tensor_count: int
    file_size: int
    data_size: int
    tensor_types: dict[str, int]
    """Tensor count per ggml type name."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "gguf_version": self.version,
            "architecture": self.architecture,
            "name": self.name,
            "context_length": self.context_length,
            "file_type": self.file_type,
            "quantization": self.quantization,
            "chat_template": self.chat_template,
            "tensor_count": self.tensor_count,
            "file_size": self.file_size,
            "data_size": self.data_size,
            "tensor_types": dict(self.tensor_types),
        }


def inspect_gguf(path: Path) -> GgufInfo:
    """Check ``path`` as a loadable GGUF model; see the module docstring for the errors."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except OSError as exc:
        raise ModelFileError(
            f"cannot read {path}: {exc.strerror or exc}; check the model path"
        ) from exc
    if not path.is_file():
        raise ModelFileError(f"{path} is not a regular file; give a .gguf model file")
    header = read_gguf_header(path, tensors=True)
    values = header.values
    arch = values.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFormatError(
            f"{path}: GGUF header has no general.architecture; not a llama.cpp model file"
        )
    ctx_len = values.get(f"{arch}.context_length")
    if not isinstance(ctx_len, int) or isinstance(ctx_len, bool) or ctx_len <= 0:
        raise ModelFormatError(
            f"{path}: GGUF header has no valid {arch}.context_length; not a complete model file"
        )
    file_type = values.get("general.file_type")
    if file_type is not None and (not isinstance(file_type, int) or file_type not in FILE_TYPES):
        raise ModelUnsupportedError(
            f"{path}: file type {file_type!r} (general.file_type) is not supported by this "
            f"llama.cpp build (supported: {', '.join(sorted(set(FILE_TYPES.values())))}); "
            "re-quantise the model to one of them"
        )
    type_counts: dict[str, int] = {}
    data_end = header.data_offset
    for tensor in header.tensors:
        known = TENSOR_TYPES.get(tensor.ggml_type)
        if known is None:
            raise ModelUnsupportedError(
                f"{path}: tensor {tensor.name} has ggml type {tensor.ggml_type}, which this "
                "llama.cpp build does not support; re-quantise the model"
            )
        name, block, _size = known
        if any(d <= 0 for d in tensor.shape) or (tensor.shape and tensor.shape[0] % block):
            raise ModelFormatError(
                f"{path}: tensor {tensor.name} has shape {list(tensor.shape)}, not valid for "
                f"{name} (blocks of {block}); corrupt file?"
            )
        type_counts[name] = type_counts.get(name, 0) + 1
        data_end = max(data_end, header.data_offset + tensor.offset + tensor.nbytes())
    if data_end > file_size:
        raise ModelFormatError(
            f"{path} is truncated: its tensors need {data_end} bytes, the file has {file_size}; "
            "get the file again (`edge-agent models pull NAME` checks size and sha256)"
        )
    if isinstance(file_type, int):
        quantization = FILE_TYPES[file_type]
    else:  # no general.file_type: name the most common type of the 2-D weights
        quantization = max(type_counts, key=lambda k: type_counts[k]) if type_counts else "?"
    general_name = values.get("general.name")
    return GgufInfo(
        path=path,
        version=header.version,
        architecture=arch,
        name=general_name if isinstance(general_name, str) else None,
        context_length=ctx_len,
        file_type=file_type if isinstance(file_type, int) else None,
        quantization=quantization,
        chat_template=isinstance(values.get("tokenizer.chat_template"), str),
        tensor_count=header.tensor_count,
        file_size=file_size,
        data_size=data_end - header.data_offset,
        tensor_types=type_counts,
    )
