"""Helpers of the install / boot / crash-point tests: signed bundles of given files (bytes or
source files; keys from ``bundle_support``), the agent wheel built from the checkout plus the
locked runtime wheels (the nspawn harness's cached wheelhouse), configs, file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import platform
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.bundles.archive import PayloadSource, write_bundle
from agent.bundles.manifest import BundleCompat
from agent.bundles.target import detect_target

ROOT = Path(__file__).resolve().parents[2]

# the nspawn harness builds the agent wheel and keeps the locked runtime wheels in its cache
sys.path.insert(0, str(ROOT / "tests" / "systemd"))
import nspawn_harness  # noqa: E402
from bundle_support import BundleKeys  # noqa: E402


def host_compat(*, boards: list[str] | None = None) -> BundleCompat:
    """A compat block this machine satisfies (or the given boards)."""
    target = detect_target()
    return BundleCompat.model_validate(
        {
            "boards": boards or [target.board],
            "machine": target.machine,
            "python": target.python,
        }
    )


def write_test_bundle(
    out: Path,
    keys: BundleKeys,
    version: str,
    files: Mapping[str, bytes | Path],
    *,
    compat: BundleCompat | None = None,
    agent_version: str | None = None,
) -> Path:
    """A signed bundle ``out`` whose payload is ``files`` (path -> content or source file)."""
    src = out.parent / f".src-{out.name}"
    sources: list[PayloadSource] = []
    for rel, content in files.items():
        if isinstance(content, Path):
            sources.append(PayloadSource(rel, content))
            continue
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        sources.append(PayloadSource(rel, path))
    write_bundle(
        out,
        name="test-bundle",
        version=version,
        compat=compat or host_compat(),
        files=sources,
        agent_version=agent_version,
        key=keys.key,
        level=1,
    )
    return out


def agent_wheel(out_dir: Path) -> Path:
    """The project wheel built from the checkout as it is now (under a second)."""
    return nspawn_harness.build_wheel(out_dir)


def runtime_wheels() -> list[Path]:
    """The locked runtime dependency wheels for this interpreter, from the harness's cached
    wheelhouse (downloaded once into ``$EDGE_AGENT_CI_CACHE`` when missing)."""
    libc = platform.libc_ver()[1].split(".")
    target = nspawn_harness.PythonTarget(
        platform.python_version(), (int(libc[0]), int(libc[1])), platform.machine()
    )
    pins = nspawn_harness.locked_requirements(target)
    house = nspawn_harness.wheelhouse(target, pins, {})
    return sorted(house.glob("*.whl"))


def wheel_files(agent: Path, deps: list[Path]) -> dict[str, bytes | Path]:
    """Payload entries ``wheels/<name>`` for the agent wheel and its dependencies."""
    return {f"wheels/{w.name}": w for w in [agent, *deps]}


def config_text(*, extra: str = "") -> str:
    """A bundle config without pipelines (state_dir unset: the launcher passes its own)."""
    return 'log_level = "info"\nstop_timeout_s = 5.0\n' + extra


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (symlinks by their target text)."""
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + str(path.readlink())
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def lock_held_by_another_process(lock_path: Path) -> Iterator[None]:
    """A real second process holds ``lock_path`` (flock) while the block runs."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(lock_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
