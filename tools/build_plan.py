"""Build a TensorRT plan from an ONNX (standalone form of `edge-agent models build-plan`).

    python tools/build_plan.py MODEL.onnx [--precision fp16] [--batch 1,2,4] [--plan-dir DIR]
        [--calibration-images DIR --manifest models/NAME.toml] [--timing-cache FILE]

Progress goes to stderr, the plan path to stdout. Errors end in one line naming the fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent.cli.plan_cmd import add_build_plan_parser
from engines.errors import EngineError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_plan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_plan_parser(sub)
    args = parser.parse_args(["build-plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        code: int = args.func(args)
    except EngineError as exc:
        print(f"build_plan: error [{exc.reason}]: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
