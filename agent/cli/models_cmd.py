"""`edge-agent models` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("models", help="(not yet implemented)")
    p.set_defaults(func=lambda _a: 1)
