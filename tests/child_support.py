"""A snippet run in a fresh Python interpreter, for tests that change the whole process
(affinity, nice, scheduler, locked memory, memory policy) and must leave the runner alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(body: str, *args: object) -> dict[str, object]:
    """Run ``body`` in a fresh interpreter (repo on sys.path, ``json``/``os``/``sys`` imported,
    ``ARGS`` the list of ``args``); it prints one JSON object on its last line."""
    script = "import json, os, sys\nARGS = json.loads(sys.argv[1])\n" + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def process_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
