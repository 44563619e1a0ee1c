"""``edge-agent`` command line: one module per sub-command, registered explicitly below.

Every failure the user can cause ends in one clear line on stderr (the cause, what to do) and a
non-zero exit; a traceback is printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from agent.cli import bundle_cmd, config_cmd, info_cmd, models_cmd, run_cmd
from agent.errors import ConfigError, PinningError, reason_code

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78
"""sysexits' EX_CONFIG: the unit's RestartPreventExitStatus=78 stops systemd retrying a config
that cannot start (bad keys, CPUs outside the allowed set): the first failure is final."""

_SUBCOMMANDS = (run_cmd, config_cmd, info_cmd, models_cmd, bundle_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run and manage an edge AI device: vision and LLM pipelines, model store, "
        "reporting. Start with `edge-agent run` (embedded defaults) or `edge-agent info`.",
        epilog="Examples:\n  edge-agent run --config /etc/edge-agent/agent.toml\n"
        "  edge-agent config validate deploy/agent.example.toml\n  edge-agent info --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs on failure"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edge-agent info | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        print(f"edge-agent: error [{reason_code(exc)}]: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, (ConfigError, PinningError)) else EXIT_FAILURE
    return code
