"""`edge-agent models list | pull | verify | info` on the real model files.

Each test writes a small agent config (its own state_dir) and points $EDGE_AGENT_MODEL_PATH at
the real models (or at a real, deliberately damaged copy). The GGUF header reader is checked
here against a file written to the GGUF layout (ggml's docs/gguf.md) and, in
tests/test_store_pypi.py, against the real SmolLM2 file pulled from PyPI.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.cli.models_cmd import Progress, read_gguf_header
from engines.errors import ModelFormatError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[models]\nallow_download = false\n', "utf-8"
    )
    return path


@pytest.fixture
def shared_env(monkeypatch: pytest.MonkeyPatch, models_dir: Path, data_dir: Path) -> None:
    monkeypatch.setenv("EDGE_AGENT_MODEL_PATH", str(models_dir))
    monkeypatch.setenv("EDGE_AGENT_DATA_PATH", str(data_dir))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.usefixtures("shared_env")
def test_list_json_shows_states(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "models", "--config", str(config), "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["models"]}
    assert rows["yolox_nano_416"]["state"] == "present"
    assert rows["yolox_nano_416"]["path"].endswith("yolox_nano_416.onnx")
    assert rows["bikes-video"]["path"].endswith("videos/bikes.mp4")
    assert rows["gemma-3-270m-q4_k_m"]["state"] == "missing"
    assert rows["smollm2-135m-instruct-q4_1"]["licence"] == "Apache-2.0"


@pytest.mark.usefixtures("shared_env")
def test_list_table_and_verify_then_verified(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "models", "--config", str(config), "list")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("nanodet_m_416 "))
    assert line.split()[1:5] == ["detector", "3.8", "MB", "Apache-2.0"]
    assert "present" in line
    assert f"store: {tmp_path / 'state' / 'models'}" in out

    code, out, _ = _run(capsys, "models", "--config", str(config), "verify")
    assert code == 0, "missing LLMs alone do not fail a verify of everything"
    lines = {x.split()[1]: x.split()[0] for x in out.splitlines()}
    assert lines["nanodet_m_416"] == "OK"
    assert lines["bikes-video"] == "OK"
    assert lines["gemma-3-270m-q4_k_m"] == "MISSING"

    _, out, _ = _run(capsys, "models", "--config", str(config), "list")
    assert "verified" in next(x for x in out.splitlines() if x.startswith("nanodet_m_416 "))


def test_verify_reports_mismatch_and_exits_1(
    config: Path,
    tmp_path: Path,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "damaged"
    folder.mkdir()
    shutil.copy(models_dir / "yolox_nano_416.onnx", folder)
    data = bytearray((folder / "yolox_nano_416.onnx").read_bytes())
    data[-5] ^= 0x01
    (folder / "yolox_nano_416.onnx").write_bytes(bytes(data))
    monkeypatch.setenv("EDGE_AGENT_MODEL_PATH", f"{folder}:{models_dir}")
    code, out, _ = _run(capsys, "models", "--config", str(config), "verify")
    assert code == 1
    mismatch = next(x for x in out.splitlines() if x.startswith("MISMATCH"))
    assert "yolox_nano_416" in mismatch
    assert str(folder / "yolox_nano_416.onnx") in mismatch
    assert "OK          nanodet_m_416" in out


@pytest.mark.usefixtures("shared_env")
def test_verify_named_missing_model_exits_1(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "models", "--config", str(config), "verify", "gemma-3-270m-q4_k_m")
    assert code == 1
    assert out.startswith("MISSING     gemma-3-270m-q4_k_m")


@pytest.mark.usefixtures("shared_env")
def test_pull_copies_into_store_and_reports_progress_lines(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "models", "--config", str(config), "pull", "nanodet_m_416")
    assert code == 0
    final = tmp_path / "state" / "models" / "nanodet_m_416.onnx"
    assert out == f"nanodet_m_416: {final}\n"
    assert final.stat().st_size == 3_802_805
    assert "copy nanodet_m_416.onnx: 100% (3.8/3.8 MB" in err  # not a TTY: lines


def test_pull_unknown_name_is_one_line_with_suggestion(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "models", "--config", str(config), "pull", "nanodet")
    assert code == 1
    assert out == ""
    assert err.strip().count("\n") == 0
    assert "[model_not_found]" in err
    assert "did you mean nanodet_m_416" in err


def test_pull_missing_file_with_downloads_off_fails_cleanly(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EDGE_AGENT_MODEL_PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("EDGE_AGENT_DATA_PATH", raising=False)
    # `pull` is explicit: it downloads even with allow_download = false (that setting is for
    # the agent's start); here the PyPI host does not exist, so the pull fails with one line.
    config.write_text(
        config.read_text("utf-8") + 'pypi_url = "http://127.0.0.1:9/pypi"\ntimeout_s = 5\n',
        "utf-8",
    )
    code, _, err = _run(capsys, "models", "--config", str(config), "pull", "bikes-video")
    assert code == 1
    assert "edge-agent models pull: bikes-video: [download_failed]" in err
    assert "Traceback" not in err


def test_info_onnx_lists_inputs_and_manifest(
    config: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = models_dir / "deimv2_hgnetv2_atto_coco.onnx"
    code, out, _ = _run(capsys, "models", "--config", str(config), "info", str(path))
    assert code == 0
    assert "manifest: deimv2_hgnetv2_atto_coco" in out
    assert "input  images: tensor(float) ['N', 3, 320, 320]" in out
    assert "input  orig_target_sizes: tensor(int64)" in out
    assert "output scores: tensor(float)" in out


def test_info_video(config: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = data_dir / "videos" / "bikes.mp4"
    code, out, _ = _run(capsys, "models", "--config", str(config), "info", str(path))
    assert code == 0
    assert "manifest: bikes-video" in out
    assert "format: video 640x272, 250 frames" in out


def test_info_truncated_onnx_is_one_line(
    config: Path, tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "cut.onnx"
    bad.write_bytes((models_dir / "yolox_nano_416.onnx").read_bytes()[:20_000])
    code, out, err = _run(capsys, "models", "--config", str(config), "info", str(bad))
    assert code == 1
    assert out == ""
    assert err.startswith(f"edge-agent: error [model_format_invalid]: {bad} is not a loadable ONNX")
    assert err.count("\n") == 1


def test_info_unknown_and_missing_files(
    config: Path, tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = models_dir / "coco_classes.txt"
    code, out, _ = _run(capsys, "models", "--config", str(config), "info", str(text))
    assert code == 0
    assert "manifest: none matches" in out
    assert "format: unknown" in out
    code, _, err = _run(capsys, "models", "--config", str(config), "info", str(tmp_path / "no"))
    assert code == 1
    assert "[model_file_unreadable]: cannot read" in err
    assert "No such file or directory" in err


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf(kvs: list[bytes], tensors: int = 2) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


GGUF_KVS = [
    _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama"),
    _gguf_string("general.file_type") + struct.pack("<II", 4, 15),
    _gguf_string("llama.context_length") + struct.pack("<IQ", 10, 2048),
    _gguf_string("tokenizer.ggml.tokens")
    + struct.pack("<IIQ", 9, 8, 3)
    + b"".join(_gguf_string(t) for t in ("<s>", "a", "b")),
    _gguf_string("general.flag") + struct.pack("<IB", 7, 1),
]


def test_gguf_header_reader_on_spec_layout(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(GGUF_KVS) + b"\0" * 64)
    header = read_gguf_header(path)
    assert (header.version, header.tensor_count, header.kv_count) == (3, 2, 5)
    assert header.values == {
        "general.architecture": "llama",
        "general.file_type": 15,
        "llama.context_length": 2048,
        "tokenizer.ggml.tokens": "[3 items]",
        "general.flag": True,
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGUF" + struct.pack("<I", 3) + b"\0\0", "ends early"),
        (b"GGUF" + struct.pack("<I", 7) + b"\0" * 16, "GGUF version 7 is not supported"),
        (_gguf([_gguf_string("k") + struct.pack("<I", 99)]), "unknown GGUF value type 99"),
        (_gguf([struct.pack("<Q", 1 << 40)]), "GGUF string of"),
        (_gguf(GGUF_KVS)[:-10], "ends early"),
    ],
    ids=["cut-counts", "version", "type", "huge-string", "cut-values"],
)
def test_gguf_reader_rejects_corrupt_headers(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFormatError, match=message):
        read_gguf_header(path)


def test_info_gguf_through_cli(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(GGUF_KVS))
    code, out, _ = _run(capsys, "models", "--config", str(config), "info", str(path))
    assert code == 0
    assert "format: GGUF version 3, 2 tensors, 5 key/values" in out
    assert "quantization: Q4_K_M" in out
    assert "llama.context_length: 2048" in out
    assert "chat template: no" in out


def test_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    for done in range(0, 1001, 50):
        progress(done, 1000, "download x")
    progress.finish()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [f"{p}%" for p in range(0, 101, 10)]


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress(500, 1000, "verify y")
    progress(1000, 1000, "verify y")
    progress.finish()
    text = out.getvalue()
    assert text.startswith("\rverify y")
    assert "[###############...............]  50.0%" in text
    assert "[##############################] 100.0%" in text
    assert text.endswith("\n")


def test_models_help_has_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "models", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "edge-agent models pull yolox_nano_416" in result.stdout
    for action in ("list", "pull", "verify", "info", "build-plan"):
        assert action in result.stdout
