"""Config file loading and validation: every problem with its key path and TOML line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import AgentConfig
from agent.configfile import (
    ConfigProblem,
    check_config_file,
    format_key_path,
    key_lines,
    load_config,
)
from agent.errors import ConfigFileError, ConfigValidationError
from agent.pinning import allowed_cpus

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "agent.example.toml"

VISION = """
[[pipelines]]
type = "vision"
name = "street"
model = "yolox_nano_416"
engine = { type = "onnxruntime" }
sources = [{ type = "file", path = "bikes-video" }]
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def by_key(problems: list[ConfigProblem]) -> dict[str, ConfigProblem]:
    return {format_key_path(p.path): p for p in problems}


def test_valid_file_loads_with_values(tmp_path: Path) -> None:
    path = write(tmp_path, 'device_id = "cam-1"\nstop_timeout_s = 3\n' + VISION)
    config = load_config(path)
    assert config.device_id == "cam-1"
    assert config.stop_timeout_s == 3.0
    assert [p.name for p in config.pipelines] == ["street"]
    assert check_config_file(path) == []


def test_every_problem_reported_with_key_path_and_line(tmp_path: Path) -> None:
    text = """\
device_id = "cam 1"
[pinning]
proces = "0"
nice = 50
[[pipelines]]
type = "vision"
name = "a"
model = "m"
sources = [{ type = "file", path = "x" }]
engine = { type = "onnxruntime", providers = ["CPUExecutionProvider", "CUDA"] }
[[pipelines]]
type = "vision"
name = "b"
model = "m"
sources = [{ type = "file", path = "x" }]
[pipelines.engine]
type = "tensorrt"
bogus = 1
"""
    problems = by_key(check_config_file(write(tmp_path, text)))
    assert set(problems) == {
        "device_id",
        "pinning.proces",
        "pinning.nice",
        "pipelines[0].engine.providers[1]",
        "pipelines[1].engine.bogus",
    }
    assert problems["device_id"].line == 1
    assert problems["pinning.proces"].line == 3
    assert "did you mean 'process'" in problems["pinning.proces"].message
    assert problems["pinning.nice"].line == 4
    assert "19" in problems["pinning.nice"].message
    assert problems["pipelines[0].engine.providers[1]"].line == 10
    assert "'CUDA'" in problems["pipelines[0].engine.providers[1]"].message
    assert problems["pipelines[1].engine.bogus"].line == 18
    assert "unknown key" in problems["pipelines[1].engine.bogus"].message


def test_missing_required_key_points_at_its_table(tmp_path: Path) -> None:
    text = (
        '[[pipelines]]\ntype = "vision"\nname = "a"\nmodel = "m"\nengine = {type = "onnxruntime"}\n'
    )
    problems = by_key(check_config_file(write(tmp_path, text)))
    assert list(problems) == ["pipelines[0].sources"]
    assert problems["pipelines[0].sources"].line == 1
    assert problems["pipelines[0].sources"].message == "required key is missing"


def test_unknown_engine_type_names_the_choices(tmp_path: Path) -> None:
    text = VISION.replace('engine = { type = "onnxruntime" }', 'engine = { type = "onnx" }')
    problems = check_config_file(write(tmp_path, text))
    assert len(problems) == 1
    assert problems[0].path == ("pipelines", 0, "engine")
    assert "'onnx'" in problems[0].message
    assert "onnxruntime" in problems[0].message


def test_score_threshold_of_one_is_rejected_at_validation(tmp_path: Path) -> None:
    # DecodeParams keeps scores strictly above the threshold and rejects 1.0: the config must too
    text = VISION.replace(
        'model = "yolox_nano_416"', 'model = "yolox_nano_416"\nscore_threshold = 1.0'
    )
    problems = check_config_file(write(tmp_path, text))
    assert [(p.path, p.line) for p in problems] == [(("pipelines", 0, "score_threshold"), 6)]
    assert "less than 1" in problems[0].message
    ok = VISION.replace(
        'model = "yolox_nano_416"', 'model = "yolox_nano_416"\nscore_threshold = 0.99'
    )
    assert check_config_file(write(tmp_path, ok)) == []


def test_wrong_type_is_one_problem_per_key(tmp_path: Path) -> None:
    problems = check_config_file(write(tmp_path, 'stop_timeout_s = "soon"\n'))
    assert [(p.path, p.line) for p in problems] == [(("stop_timeout_s",), 1)]
    assert "number" in problems[0].message


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    problems = check_config_file(write(tmp_path, 'device_id = "a"\n[pinning\nnice = 1\n'))
    assert len(problems) == 1
    assert problems[0].line == 2
    assert problems[0].message.startswith("TOML syntax error")


def test_cpu_outside_allowed_set_is_a_problem(tmp_path: Path) -> None:
    outside = max(allowed_cpus()) + 1
    text = f'[pinning]\nprocess = "0"\n[pinning.stages]\ninference = [{outside}]\n'
    problems = check_config_file(write(tmp_path, text))
    assert len(problems) == 1
    assert problems[0].path[:2] == ("pinning", "stages")
    assert problems[0].line == 4
    assert str(outside) in problems[0].message


def test_every_pinning_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    outside = max(allowed_cpus()) + 1
    text = (
        f'[pinning]\nprocess = "auto"\n[pinning.stages]\n'
        f'capture = [{outside}]\nllm = "{outside}-{outside + 1}"\n'
    )
    problems = by_key(check_config_file(write(tmp_path, text)))
    assert sorted(problems) == ["pinning.stages.capture", "pinning.stages.llm"]
    assert problems["pinning.stages.capture"].line == 4
    assert problems["pinning.stages.llm"].line == 5
    for problem in problems.values():
        assert problem.message.startswith(f"CPUs {outside}")
        assert "outside the allowed set" in problem.message


def test_load_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_load_directory_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'device_id = "caf\xe9"\n')
    with pytest.raises(ConfigFileError, match="not UTF-8"):
        load_config(bad)


def test_load_invalid_file_raises_with_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus = 1\nstop_timeout_s = -1\n")
    with pytest.raises(ConfigValidationError) as info:
        load_config(path)
    assert info.value.problems == [
        "line 1: bogus: unknown key — known keys: " + ", ".join(sorted(AgentConfig.model_fields)),
        "line 2: stop_timeout_s: Input should be greater than 0 (got -1)",
    ]
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_no_config_and_no_default_file_uses_embedded_defaults(tmp_path: Path) -> None:
    config = load_config(None, default_path=tmp_path / "absent.toml")
    assert isinstance(config, AgentConfig)
    if (ROOT / "agent" / "defaults.py").exists():
        from agent.defaults import default_config

        assert config == default_config()


def test_no_config_reads_default_file_when_present(tmp_path: Path) -> None:
    default = write(tmp_path, 'device_id = "from-default"\n')
    assert load_config(None, default_path=default).device_id == "from-default"


def test_example_config_validates() -> None:
    assert check_config_file(EXAMPLE) == []
    # the example sets every top-level key and every key of the sections it shows
    lines = key_lines(EXAMPLE.read_text(encoding="utf-8"))
    assert {path[0] for path in lines} == set(AgentConfig.model_fields)
    config = load_config(EXAMPLE)
    assert config.pipelines


def test_example_commented_mqtt_block_validates(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    begin = text.index("# --- mqtt example begin\n")
    end = text.index("# --- mqtt example end\n")
    block = text[begin:end].splitlines()[1:]
    assert block
    assert all(line.startswith("# ") for line in block)
    enabled = text[:begin] + "\n".join(line[2:] for line in block) + "\n" + text[end:]
    path = write(tmp_path, enabled)
    assert check_config_file(path) == []
    config = load_config(path)
    assert config.reporting.mqtt is not None
    assert config.reporting.mqtt.host == "broker.example.net"


def _properties_without_description(node: Any, where: str) -> list[str]:
    missing: list[str] = []
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            if not isinstance(prop, dict) or not prop.get("description"):
                missing.append(f"{where}.{name}")
        for key, value in node.items():
            missing += _properties_without_description(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            missing += _properties_without_description(value, f"{where}[{i}]")
    return missing


def test_schema_every_property_has_a_description() -> None:
    schema = AgentConfig.model_json_schema()
    assert "pipelines" in schema["properties"]
    assert _properties_without_description(schema, "#") == []


def test_cli_schema_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == AgentConfig.model_json_schema()


def test_cli_validate_ok_and_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == f"{EXAMPLE}: ok"
    path = write(tmp_path, "[pinning]\nnic = 1\n[watchdog]\ndefault_interval_s = 0\n")
    assert main(["config", "validate", str(path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}:2: pinning.nic: unknown key — did you mean 'nice'?",
        f"{path}:4: watchdog.default_interval_s: Input should be greater than 0 (got 0)",
        f"{path}: 2 problem(s)",
    ]


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(tmp_path / "gone.toml")]) == 2
    out = capsys.readouterr().out
    assert "does not exist" in out
    assert "Traceback" not in out
