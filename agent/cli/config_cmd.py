"""`edge-agent config`: check a config file, print the config's JSON Schema."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig
from agent.configfile import check_config_file

__all__ = ["register"]

EXIT_OK = 0
EXIT_PROBLEMS = 2


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "config",
        help="check a config file or print its JSON Schema",
        description="Work with the agent's TOML config file "
        f"(default {DEFAULT_CONFIG_PATH}; see deploy/agent.example.toml).",
        epilog="Examples:\n"
        "  edge-agent config validate /etc/edge-agent/agent.toml\n"
        "  edge-agent config schema > agent.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    validate = actions.add_parser(
        "validate",
        help="print every problem of FILE (key path and line), exit 2 if any",
        description="Check FILE against the config schema and this machine's allowed CPUs. "
        "Prints every problem as `FILE:LINE: key.path: what is wrong` and exits 2; prints "
        "`FILE: ok` and exits 0 when the file is valid.",
        epilog="Example:\n  edge-agent config validate deploy/agent.example.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("file", type=Path, metavar="FILE", help="TOML config file to check")
    validate.set_defaults(func=_validate)

    schema = actions.add_parser(
        "schema",
        help="print the JSON Schema of the config",
        description="Print the JSON Schema (draft 2020-12) of the config file; every property "
        "carries a description. Editors use it for completion and checking.",
        epilog="Example:\n  edge-agent config schema > agent.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    schema.set_defaults(func=_schema)


def _validate(args: argparse.Namespace) -> int:
    path: Path = args.file
    problems = check_config_file(path)
    for problem in problems:
        print(problem.format(str(path)))
    if problems:
        print(f"{path}: {len(problems)} problem(s)")
        return EXIT_PROBLEMS
    print(f"{path}: ok")
    return EXIT_OK


def _schema(_args: argparse.Namespace) -> int:
    print(json.dumps(AgentConfig.model_json_schema(), indent=2))
    return EXIT_OK
