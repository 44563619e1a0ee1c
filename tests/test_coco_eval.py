"""COCO mAP on coco_mini through the agent's own preprocessing, engine and decoders must match
the reference values of ../shared/README.md within +-0.01 (tools/coco_eval.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.store import ModelStore
from tools.coco_eval import REFERENCES, TOLERANCE, EvalError, evaluate, open_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(models_dir: Path) -> Iterator[ModelStore]:
    with open_store() as opened:
        yield opened


@pytest.mark.slow
@pytest.mark.parametrize("model", list(REFERENCES))
def test_map_matches_reference(model: str, store: ModelStore, data_dir: Path) -> None:
    result = evaluate(store, model, data_dir, threads=2)
    ref = REFERENCES[model]
    assert result.images == 79
    assert abs(result.map - ref.map) <= TOLERANCE, result
    # mAP50 is not part of the criterion but a decoding bug moves it as well
    assert abs(result.map50 - ref.map50) <= 2 * TOLERANCE, result
    assert result.invalid_candidates == 0
    assert result.within_tolerance


@pytest.mark.slow
def test_cli_writes_reports(tmp_path: Path, data_dir: Path, models_dir: Path) -> None:
    out_json, out_md = tmp_path / "accuracy.json", tmp_path / "accuracy.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "coco_eval.py"),
            "--models",
            "yolox_nano_416",
            "--data",
            str(data_dir),
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"EDGE_AGENT_MODEL_PATH": str(models_dir), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_json.read_text())
    [row] = report["models"]
    assert row["model"] == "yolox_nano_416"
    assert row["within_tolerance"] is True
    assert f"**{row['map']:.3f}**" in out_md.read_text()


def test_missing_dataset_is_one_line(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=r"instances_val2017\.json not found") as info:
        evaluate(store, "yolox_nano_416", tmp_path)
    assert "\n" not in str(info.value)


def test_cli_bad_input_exit_2(tmp_path: Path, models_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "coco_eval.py"),
            "--data",
            str(tmp_path),
            "--no-write",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"EDGE_AGENT_MODEL_PATH": str(models_dir), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "instances_val2017.json not found" in proc.stderr
