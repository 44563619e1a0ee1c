"""`edge-agent models build-plan`: build a TensorRT plan from an ONNX into the plan store.

The models command mounts this with :func:`add_build_plan_parser`; ``tools/build_plan.py`` runs
the same parser standalone. Progress goes to stderr line by line (a TensorRT build takes minutes
on a Jetson and must never look hung); the plan path goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engines.errors import ManifestError
from engines.manifest import InputSpec
from engines.plans import PlanStore
from engines.registry import load_tensorrt_runtime
from engines.store import ModelStore
from engines.tensorrt import RuntimeLoader
from engines.tensorrt_build import BuildRequest, build_plan

__all__ = ["add_build_plan_parser", "parse_batch", "run_build_plan"]


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"4"`` -> (4, 4, 4); ``"1,2,8"`` -> (1, 2, 8) with 1 <= min <= opt <= max."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        msg = f"--batch {text!r}: expected N or MIN,OPT,MAX (e.g. 1,2,4)"
        raise argparse.ArgumentTypeError(msg) from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        msg = f"--batch {text!r}: expected N or MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX"
        raise argparse.ArgumentTypeError(msg)
    return values[0], values[1], values[2]


def add_build_plan_parser(models_subparsers: Any) -> None:
    """Add the ``build-plan`` sub-command to the ``models`` sub-parsers."""
    parser: argparse.ArgumentParser = models_subparsers.add_parser(
        "build-plan",
        help="build a TensorRT plan (FP32/FP16/INT8) from an ONNX into the plan store",
        description="Build a TensorRT plan with the TensorRT builder and store it under its key "
        "(model sha256, TensorRT version, GPU, precision, batch profile) with a JSON sidecar. "
        "Runs on the Jetson that will use the plan.",
        epilog="Examples:\n  edge-agent models build-plan /var/lib/edge-agent/models/"
        "yolox_nano_416.onnx\n  edge-agent models build-plan model.onnx --precision int8 "
        "--calibration-images /data/frames --manifest models/yolox_nano_416.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx", type=Path, help="the model's ONNX file")
    parser.add_argument(
        "--precision", choices=["fp32", "fp16", "int8"], default="fp16", help="default: fp16"
    )
    parser.add_argument(
        "--batch",
        type=parse_batch,
        default=(1, 1, 1),
        metavar="N|MIN,OPT,MAX",
        help="batch range of the optimisation profile (default: 1)",
    )
    parser.add_argument(
        "--plan-dir", type=Path, help="plan store folder (default: plans/ next to the ONNX)"
    )
    parser.add_argument(
        "--timing-cache", type=Path, help="timing cache file (default: one in the plan store)"
    )
    parser.add_argument(
        "--calibration-images", type=Path, metavar="DIR", help="images for INT8 calibration"
    )
    parser.add_argument(
        "--calibration-limit", type=int, default=500, help="use at most this many images"
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="model manifest (TOML) whose [input] section says how to preprocess calibration "
        "images (default: stretch, RGB, /255)",
    )
    parser.add_argument("--workspace-mib", type=int, default=1024, help="default: 1024")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default: 0)")
    parser.set_defaults(func=run_build_plan)


def _input_spec(manifest: Path | None) -> InputSpec | None:
    if manifest is None:
        return None
    try:
        parsed = ModelStore.load_manifest(manifest)
    except ManifestError as exc:
        # Name what the library said (load_manifest chains it), as build-plan always has.
        text = " ".join(str(exc.__cause__ or exc).split())[:200]
        msg = f"cannot use manifest {manifest} ({text}): give a valid model manifest (TOML)"
        raise ManifestError(msg) from exc
    if parsed.input is None:
        msg = f"manifest {manifest} has no [input] section: calibration needs the input spec"
        raise ManifestError(msg)
    return parsed.input


def run_build_plan(
    args: argparse.Namespace, *, runtime_loader: RuntimeLoader = load_tensorrt_runtime
) -> int:
    onnx: Path = args.onnx
    request = BuildRequest(
        onnx=onnx,
        precision=args.precision,
        batch=args.batch,
        workspace_mib=args.workspace_mib,
        calibration_images=args.calibration_images,
        input_spec=_input_spec(args.manifest),
        timing_cache=args.timing_cache,
        device=args.device,
        calibration_limit=args.calibration_limit,
    )
    runtime = runtime_loader()
    store = PlanStore(args.plan_dir or onnx.parent / "plans")

    def progress(line: str) -> None:
        print(f"build-plan: {line}", file=sys.stderr, flush=True)

    plan = build_plan(request, store, runtime=runtime, progress=progress)
    print(plan)
    return 0
