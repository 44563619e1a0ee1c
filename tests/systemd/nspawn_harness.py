"""A Debian bookworm container with a real systemd, and the agent installed in it as a unit.

Build steps, each cached under ``$EDGE_AGENT_CI_CACHE`` (default ``/var/cache/edge-agent-ci``,
outside the repository) so a warm run only unpacks a tarball:

    base rootfs   debootstrap --variant=minbase + PACKAGES      bookworm-<base>.tar.zst
                  base = hash(suite, mirror, packages, arch)      (+ .json: its python, glibc)
    wheelhouse    pip download of the locked runtime deps        wheelhouse-<pins>/
    deps rootfs   base + /opt/edge-agent/venv with those deps    bookworm-<base>-deps-<pins>.tar.zst
                  pins = hash(runtime requirements exported from uv.lock, resolved for the
                  rootfs python, and CMAKE_ARGS; dev-only lock changes keep the cache)

Per test session the deps rootfs is unpacked into a scratch tmpfs, the project wheel (built
fresh from the checkout) is installed with ``pip --no-index --no-deps``, and the unit, the
sysusers entry, a config and a CI drop-in are copied in. ``Container`` boots it with
``systemd-nspawn --boot --register=no --keep-unit`` and drives it with
``nsenter -t <container PID 1> -a systemctl|journalctl ...``.

A cache is written under an exclusive lock and renamed into place only when complete, so a run
that is killed half-way leaves no broken cache behind; a cold run simply builds everything.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker

__all__ = [
    "AGENT_UNIT",
    "PACKAGES",
    "Container",
    "HarnessError",
    "build_wheel",
    "cache_dir",
    "debootstrap_tarball",
    "deps_rootfs_tarball",
    "install_agent",
    "missing_host_tools",
    "scratch_tmpfs",
    "unpack",
    "venv_rootfs_tarball",
    "write_measurements",
]

_log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
# libgomp1: the OpenMP runtime that llama-cpp-python's libllama.so links against.
PACKAGES = ("python3", "python3-venv", "systemd", "systemd-sysv", "dbus", "libgomp1")
VENV = "/opt/edge-agent/venv"
AGENT_UNIT = "edge-agent.service"
HOST_TOOLS = ("systemd-nspawn", "debootstrap", "nsenter", "tar", "zstd")
TAR_FLAGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*")


class HarnessError(RuntimeError):
    """A build or container step failed; the message names the command and its output tail."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_AGENT_CI_CACHE", "/var/cache/edge-agent-ci"))


def mirror() -> str:
    return os.environ.get("EDGE_AGENT_CI_MIRROR", "http://deb.debian.org/debian")


def missing_host_tools() -> list[str]:
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def run(
    cmd: Sequence[str | Path],
    *,
    timeout: float,
    check: bool = True,
    input_text: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; with ``check`` a non-zero exit raises HarnessError with the output tail."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(
        args,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=None if env is None else dict(env),
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise HarnessError(f"`{' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return proc


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _cache_lock() -> Iterator[Path]:
    """The cache folder, held exclusively (two sessions never build the same entry twice)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pack(src: Path, dest: Path) -> None:
    """Tar ``src`` into ``dest`` (zstd), atomically: a partial file never has the final name."""
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        run(["tar", *TAR_FLAGS, "-I", "zstd -T0 -3", "-C", src, "-cf", partial, "."], timeout=900)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def scratch_tmpfs(prefix: str, size: str = "4G") -> Iterator[Path]:
    """A fresh tmpfs for one session's rootfs: unpacking into RAM is quick, and unmounting
    frees it at once (deleting ~15k files from disk took 40 s on a busy 2-core runner)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", work], timeout=30)
        try:
            yield work
        finally:
            done = run(["umount", work], timeout=60, check=False)
            if done.returncode != 0:
                _log.warning("umount %s: %s; detaching it lazily", work, done.stderr.strip())
                run(["umount", "--lazy", work], timeout=60)
    finally:
        work.rmdir()


def unpack(tarball: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", *TAR_FLAGS, "-I", "zstd -T0", "-C", dest, "-xf", tarball], timeout=900)


def nspawn_run(
    rootfs: Path, command: Sequence[str], *, binds: Mapping[Path, str], timeout: float
) -> str:
    """Run one command inside ``rootfs`` (no boot, no network), read-only binds host -> guest."""
    cmd: list[str | Path] = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--setenv=PIP_DISABLE_PIP_VERSION_CHECK=1",
        "-D",
        rootfs,
    ]
    cmd += [f"--bind-ro={host}:{guest}" for host, guest in binds.items()]
    return run([*cmd, "--", *command], timeout=timeout).stdout


def _base_key() -> str:
    return _digest(SUITE, "minbase", PACKAGES, mirror(), platform.machine())


@dataclass(frozen=True)
class PythonTarget:
    """The interpreter and C library of the rootfs, for picking matching wheels on the host."""

    full_version: str  # "3.11.2"
    glibc: tuple[int, int]  # (2, 36)
    machine: str  # "x86_64"

    def to_json(self) -> str:
        return json.dumps(
            {"full_version": self.full_version, "glibc": list(self.glibc), "machine": self.machine}
        )

    @classmethod
    def from_json(cls, text: str) -> PythonTarget:
        data = json.loads(text)
        return cls(data["full_version"], (data["glibc"][0], data["glibc"][1]), data["machine"])

    @property
    def short(self) -> str:
        return ".".join(self.full_version.split(".")[:2])

    def marker_env(self) -> dict[str, str]:
        return {
            "python_version": self.short,
            "python_full_version": self.full_version,
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "os_name": "posix",
            "platform_system": "Linux",
            "platform_machine": self.machine,
        }

    def pip_target_args(self) -> list[str]:
        nodot = self.short.replace(".", "")
        major, minor = self.glibc
        args = ["--only-binary=:all:", "--python-version", self.short, "--implementation", "cp"]
        for abi in (f"cp{nodot}", "abi3", "none"):
            args += ["--abi", abi]
        platforms = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        platforms += [f"{tag}_{self.machine}" for tag in ("manylinux2014", "manylinux2010")]
        platforms += [f"manylinux1_{self.machine}", f"linux_{self.machine}"]
        for plat in platforms:
            args += ["--platform", plat]
        return args


def _dpkg_version(rootfs: Path, package: str) -> str:
    status = (rootfs / "var/lib/dpkg/status").read_text()
    for para in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", para, re.MULTILINE):
            match = re.search(r"^Version: (?:\d+:)?([0-9.]+)", para, re.MULTILINE)
            if match:
                return match.group(1)
    raise HarnessError(f"package {package} not installed in {rootfs}")


def python_target(rootfs: Path) -> PythonTarget:
    link = (rootfs / "usr/bin/python3").readlink()  # "python3.11"
    short = link.name.removeprefix("python")
    full = _dpkg_version(rootfs, f"python{short}")
    glibc = tuple(int(x) for x in _dpkg_version(rootfs, "libc6").split(".")[:2])
    return PythonTarget(full, (glibc[0], glibc[1]), platform.machine())


def base_rootfs_tarball(timings: dict[str, object]) -> tuple[Path, PythonTarget]:
    """The cached debootstrap tarball (built, a minute or two, when missing) and its python."""
    return debootstrap_tarball(f"{SUITE}-", _base_key(), PACKAGES, timings, timeout=1800)


def debootstrap_tarball(
    prefix: str,
    key: str,
    packages: Sequence[str],
    timings: dict[str, object],
    *,
    timeout: float,
    arch: str | None = None,
    machine: str | None = None,
) -> tuple[Path, PythonTarget]:
    """``<prefix><key>.tar.zst``: a cached ``debootstrap --variant=minbase`` of SUITE with
    ``packages`` (for ``arch``, built under emulation, when given), and its python (``machine``
    overrides the one the host reports). Building it prunes every other ``<prefix>*`` entry:
    other bases and everything built on them."""
    with _cache_lock() as root:
        tarball = root / f"{prefix}{key}.tar.zst"
        facts = tarball.with_suffix("").with_suffix(".json")
        timings["cache_base_hit"] = tarball.is_file() and facts.is_file()
        if tarball.is_file() and facts.is_file():
            return tarball, PythonTarget.from_json(facts.read_text())
        started = time.monotonic()
        with scratch_tmpfs(f".debootstrap-{arch or 'host'}-") as work:
            rootfs = work / "rootfs"
            run(
                [
                    "debootstrap",
                    *([f"--arch={arch}"] if arch else []),
                    "--variant=minbase",
                    f"--include={','.join(packages)}",
                    SUITE,
                    rootfs,
                    mirror(),
                ],
                timeout=timeout,
            )
            for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                leftover.unlink()
            lists = rootfs / "var/lib/apt/lists"
            if lists.is_dir():
                shutil.rmtree(lists)
            target = python_target(rootfs)
            if machine is not None:
                target = dataclasses.replace(target, machine=machine)
            facts.write_text(target.to_json())
            _pack(rootfs, tarball)
        for stale in root.glob(f"{prefix}*"):  # other bases and everything built on them
            if stale not in {tarball, facts}:
                _log.info("pruning stale cache entry %s", stale)
                stale.unlink()
        timings["debootstrap_s"] = round(time.monotonic() - started, 1)
        return tarball, target


def uv_binary() -> str:
    local = ROOT / ".tools/uv/bin/uv"
    found = str(local) if local.is_file() else shutil.which("uv")
    if found is None:
        raise HarnessError("uv not found (.tools/uv/bin/uv or PATH): run ./bootstrap once")
    return found


def locked_requirements(target: PythonTarget) -> list[str]:
    """The locked runtime dependencies (no dev group, no project), markers resolved for target."""
    exported = run(
        [
            uv_binary(),
            "export",
            "--frozen",
            "--no-dev",
            "--no-hashes",
            "--no-emit-project",
            "--no-header",
        ],
        cwd=ROOT,
        timeout=120,
    ).stdout
    env = target.marker_env()
    pins: list[str] = []
    for raw in exported.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue
        pins.append(requirement.strip())
    return sorted(pins)


def _pip_tool() -> Path:
    """A pip on the host (uv's .venv has none): a small venv in the cache, made once."""
    venv = cache_dir() / "pip-venv"
    pip = venv / "bin/pip"
    if not pip.is_file():
        base = getattr(sys, "_base_executable", sys.executable)
        run([base, "-m", "venv", "--clear", venv], timeout=300)
    return pip


def wheelhouse(target: PythonTarget, pins: list[str], timings: dict[str, object]) -> Path:
    """Wheels of ``pins`` for ``target``, made once (the host's pip configuration applies).

    Binary wheels are downloaded for the rootfs python and glibc. A pin with no matching wheel
    on the index (an sdist-only package) is built into a wheel on the host, which needs the
    host python to be the rootfs one (both are Debian 12's python3.11 in CI).
    """
    with _cache_lock() as root:
        house = root / f"wheelhouse-{_digest(pins, target.pip_target_args(), cmake_args())}"
        timings["cache_wheelhouse_hit"] = house.is_dir()
        if house.is_dir():
            return house
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=root, prefix=".wheelhouse-") as work:
            download = Path(work) / "wheels"
            from_source = _download_wheels(download, target, pins)
            reused = _reuse_uv_built_wheels(download, target, from_source)
            if reused:
                timings["wheels_reused_from_uv_cache"] = reused
            from_source = [pin for pin in from_source if pin not in reused]
            if from_source:
                _build_wheels(download, target, from_source)
                timings["wheels_built_from_source"] = from_source
            download.rename(house)
        _prune(house, "wheelhouse-*")
        timings["wheelhouse_s"] = round(time.monotonic() - started, 1)
        return house


def _download_wheels(dest: Path, target: PythonTarget, pins: list[str]) -> list[str]:
    """Download a wheel of every pin that has one for ``target``; the pins that have none."""
    pending, without_wheel = list(pins), []
    while pending:
        proc = run(
            [
                _pip_tool(),
                "download",
                "--quiet",
                "--no-deps",
                "-d",
                dest,
                *target.pip_target_args(),
                *pending,
            ],
            timeout=1800,
            check=False,
        )
        if proc.returncode == 0:
            break
        missing = re.findall(r"No matching distribution found for (\S+)", proc.stderr)
        if not missing or not set(missing) <= set(pending):
            raise HarnessError(f"pip download failed:\n{proc.stderr.strip()[-3000:]}")
        pending = [p for p in pending if p not in missing]
        without_wheel += missing
    return without_wheel


def _reuse_uv_built_wheels(dest: Path, target: PythonTarget, pins: list[str]) -> list[str]:
    """Copy the wheels uv already built from sdists for .venv; the pins it had.

    ./bootstrap's `uv sync` builds every sdist-only pin (llama-cpp-python: ~15 min on 2 cores)
    with bootstrap's CMAKE_ARGS and keeps the wheel in uv's cache. The container then runs the
    very build the host's tests ran, and a cold CI run builds it once, not twice. Only a wheel
    whose tags fit the rootfs python (same interpreter version as the host in CI) is taken.
    """
    cache = Path(run([uv_binary(), "cache", "dir"], timeout=60).stdout.strip())
    reused: list[str] = []
    for pin in pins:
        name, _, version = pin.partition("==")
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
        found = sorted(
            (
                wheel
                for wheel in cache.glob(f"sdists-v*/pypi/{name.lower()}/{version}/*/*.whl")
                if wheel.name.lower().startswith(stem) and _wheel_fits(wheel.name, target)
            ),
            key=lambda wheel: wheel.stat().st_mtime,
        )
        if found:
            _log.info("reusing uv's build of %s: %s", pin, found[-1])
            shutil.copy2(found[-1], dest / found[-1].name)
            reused.append(pin)
    return reused


def _wheel_fits(filename: str, target: PythonTarget) -> bool:
    """A built wheel's python tag is py3 / cp3X for the target's version (platform: the host's)."""
    python_tag = filename[: -len(".whl")].split("-")[-3]
    wanted = {"py3", f"cp{target.short.replace('.', '')}"}
    return any(tag in wanted for tag in python_tag.split("."))


def _build_wheels(dest: Path, target: PythonTarget, pins: list[str]) -> None:
    pip = _pip_tool()
    host = run(
        [pip.parent / "python", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        timeout=60,
    ).stdout.strip()
    if host != target.short:
        raise HarnessError(
            f"{pins} have no wheel for python {target.short} on the index and must be built, "
            f"but the host python is {host}: run the suite on Debian 12 (python {target.short})"
        )
    env = dict(os.environ, CMAKE_ARGS=cmake_args())
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could hand back another build.
    run(
        [pip, "wheel", "--quiet", "--no-cache-dir", "--no-deps", "-w", dest, *pins],
        timeout=3600,
        env=env,
    )


def cmake_args() -> str:
    """CMAKE_ARGS for native builds: the environment's, else ./bootstrap's llama_cmake_args.

    The same flags as the .venv build (on x86-64 a fixed AVX2 build instead of GGML_NATIVE,
    whose AMX kernels crash VMs without the AMX tile state).
    """
    if "CMAKE_ARGS" in os.environ:
        return os.environ["CMAKE_ARGS"]
    script = (ROOT / "bootstrap").read_text()
    match = re.search(r"^llama_cmake_args\(\) \{\n.*?^\}\n", script, re.MULTILINE | re.DOTALL)
    if match is None:
        _log.warning("no llama_cmake_args() in ./bootstrap: building with default CMAKE_ARGS")
        return ""
    return run(["bash", "-c", f"{match.group(0)}\nllama_cmake_args"], timeout=30).stdout


def _prune(keep: Path, pattern: str) -> None:
    """Remove older cache entries of one kind (a new uv.lock makes the old ones dead weight)."""
    for old in keep.parent.glob(pattern):
        if old != keep:
            _log.info("pruning stale cache entry %s", old)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()


def deps_rootfs_tarball(timings: dict[str, object]) -> Path:
    """Base rootfs plus /opt/edge-agent/venv holding the locked runtime deps (cached).

    Keyed by the runtime pins resolved for the rootfs python, so a change to dev dependencies
    in uv.lock reuses the cached tarball.
    """
    base, target = base_rootfs_tarball(timings)
    pins = locked_requirements(target)
    prefix = f"{SUITE}-{_base_key()}-deps-"
    tarball = cache_dir() / f"{prefix}{_digest(pins, target.to_json(), cmake_args())}.tar.zst"
    timings["cache_deps_hit"] = tarball.is_file()
    if tarball.is_file():
        return tarball
    house = wheelhouse(target, pins, timings)
    return venv_rootfs_tarball(base, tarball, prefix, pins, house, timings=timings, timeout=900)


def venv_rootfs_tarball(
    base: Path,
    tarball: Path,
    prefix: str,
    pins: Sequence[str],
    house: Path,
    *,
    timings: dict[str, object],
    timeout: float,
) -> Path:
    """``tarball``: the ``base`` rootfs plus VENV with ``pins`` installed from the wheelhouse
    ``house`` by pip inside the rootfs; older ``<prefix>*`` tarballs are pruned."""
    with scratch_tmpfs(".deps-") as work:
        rootfs = work / "rootfs"
        unpack(base, rootfs)
        started = time.monotonic()
        req = work / "requirements.txt"
        req.write_text("\n".join(pins) + "\n")
        nspawn_run(
            rootfs,
            [
                "/bin/sh",
                "-ec",
                (
                    f"python3 -m venv {VENV}\n"
                    f"{VENV}/bin/pip install --quiet --no-index --find-links /mnt/wheelhouse "
                    "-r /mnt/requirements.txt"
                ),
            ],
            binds={house: "/mnt/wheelhouse", req: "/mnt/requirements.txt"},
            timeout=timeout,
        )
        timings["deps_install_s"] = round(time.monotonic() - started, 1)
        with _cache_lock():
            if not tarball.is_file():
                _pack(rootfs, tarball)
            _prune(tarball, f"{prefix}*.tar.zst")
    return tarball


def write_measurements(
    terminalreporter: pytest.TerminalReporter,
    title: str,
    values: Mapping[str, object],
    filename: str,
) -> None:
    """A suite's measurements: printed at the end of the run and written to
    ``<cache_dir>/<filename>`` as JSON (nothing when there are none)."""
    if not values:
        return
    terminalreporter.section(title)
    for key, value in values.items():
        terminalreporter.write_line(f"{key}: {json.dumps(value)}")
    out = cache_dir() / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(values, indent=2) + "\n")
    terminalreporter.write_line(f"(written to {out})")


def build_wheel(out_dir: Path) -> Path:
    """The project wheel, built from the checkout as it is now."""
    run([uv_binary(), "build", "--wheel", "--quiet", "--out-dir", out_dir], cwd=ROOT, timeout=600)
    wheels = sorted(out_dir.glob("edge_agent-*.whl"))
    if len(wheels) != 1:
        raise HarnessError(f"expected one edge_agent wheel in {out_dir}, found {wheels}")
    return wheels[0]


def install_agent(rootfs: Path, wheel: Path, *, config: str, dropins: Mapping[str, str]) -> None:
    """Install the wheel into the rootfs venv, and the unit (enabled), sysusers entry, config
    and drop-ins, as an administrator would on a device."""
    systemd_dir = ROOT / "deploy/systemd"
    placed = {
        "etc/systemd/system/edge-agent.service": (systemd_dir / AGENT_UNIT).read_text(),
        "usr/lib/sysusers.d/edge-agent.conf": (systemd_dir / "edge-agent.sysusers").read_text(),
        "etc/edge-agent/agent.toml": config,
    }
    for name, text in dropins.items():
        placed[f"etc/systemd/system/edge-agent.service.d/{name}"] = text
    for rel, text in placed.items():
        dest = rootfs / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(0o644)
    # Enabled, the unit stays loaded after it stops (an unreferenced inactive unit is garbage
    # collected, and with it the exit status that `systemctl show` reports).
    nspawn_run(
        rootfs,
        [
            "/bin/sh",
            "-ec",
            (
                f"{VENV}/bin/pip install --quiet --no-index --no-deps /mnt/dist/{wheel.name}\n"
                f"{VENV}/bin/pip check\n"
                f"systemctl enable --quiet {AGENT_UNIT}"
            ),
        ],
        binds={wheel.parent: "/mnt/dist"},
        timeout=300,
    )


@dataclass
class Container:
    """One booted container; every command runs in all its namespaces through nsenter."""

    rootfs: Path
    console_log: Path
    name: str = field(default_factory=lambda: f"edge-agent-ci-{os.getpid()}")
    nspawn: subprocess.Popen[bytes] | None = None
    pid1: int = 0

    def boot(self, timeout: float = 120.0) -> float:
        """Start the container and wait until systemd is up; the boot time in seconds."""
        started = time.monotonic()
        with self.console_log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "--console=read-only",
                    f"--machine={self.name}",
                    "-D",
                    str(self.rootfs),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        self.pid1 = self._wait_for_pid1(deadline)
        # Until PID 1 has exec'd systemd and opened its private bus socket, nsenter or
        # systemctl fail ("offline", or no output at all): retry those until the deadline.
        state, detail = "offline", ""
        while state in {"offline", ""} and time.monotonic() < deadline:
            proc = self.run(
                ["systemctl", "is-system-running", "--wait"],
                check=False,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            state, detail = proc.stdout.strip(), proc.stderr.strip()
            if state in {"offline", ""}:
                time.sleep(0.1)
        if state not in {"running", "degraded"}:
            raise HarnessError(f"container systemd is {state!r} ({detail}):\n{self.console_tail()}")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            _log.warning("container booted degraded; failed units:\n%s", failed)
        return time.monotonic() - started

    def _wait_for_pid1(self, deadline: float) -> int:
        """The nspawn child that is PID 1 of its own PID namespace (NSpid: <host pid> 1)."""
        if self.nspawn is None:
            raise HarnessError("systemd-nspawn was not started")
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise HarnessError(
                    f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console_tail()}"
                )
            for child in _children(self.nspawn.pid):
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except FileNotFoundError:
                    continue
                match = re.search(r"^NSpid:\s+(.*)$", status, re.MULTILINE)
                if match and match.group(1).split()[-1] == "1":
                    return child
            time.sleep(0.05)
        raise HarnessError(f"container PID 1 did not appear:\n{self.console_tail()}")

    def run(
        self,
        command: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        if not self.pid1:
            raise HarnessError("container not booted")
        return run(
            ["nsenter", "-t", str(self.pid1), "-a", *command],
            check=check,
            timeout=timeout,
            input_text=input_text,
        )

    def sh(self, script: str, *args: str, check: bool = True) -> str:
        return self.run(["/bin/sh", "-ec", script, "sh", *args], check=check).stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(
            ["/bin/sh", "-ec", 'umask 077; cat > "$1"; chmod "$2" "$1"', "sh", path, mode],
            input_text=text,
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal_cursor(self) -> str:
        out = self.run(["journalctl", "--show-cursor", "-n", "0", "--no-pager"]).stdout
        match = re.search(r"-- cursor: (\S+)", out)
        if match is None:
            raise HarnessError(f"no journal cursor in {out!r}")
        return match.group(1)

    def journal(self, unit: str, after_cursor: str) -> list[dict[str, str]]:
        """Journal entries of ``unit`` after the cursor (systemd's and the process's own)."""
        out = self.run(
            [
                "journalctl",
                "-u",
                unit,
                f"--after-cursor={after_cursor}",
                "-o",
                "json",
                "--no-pager",
                "--output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID,__MONOTONIC_TIMESTAMP",
            ]
        ).stdout
        entries: list[dict[str, str]] = []
        for line in out.splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            message = entry.get("MESSAGE", "")
            if isinstance(message, list):  # journald stores non-UTF-8 messages as byte arrays
                message = bytes(message).decode(errors="replace")
            entry["MESSAGE"] = message
            entries.append(entry)
        return entries

    def console_tail(self, chars: int = 4000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no console log)"

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power the container off; escalate to SIGTERM, then SIGKILL. Safe to call twice."""
        proc = self.nspawn
        if proc is None or proc.poll() is not None:
            return
        if self.pid1:
            asked = self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
            if asked.returncode != 0:
                _log.warning("systemctl poweroff: %s", (asked.stdout + asked.stderr).strip())
        if _wait(proc, timeout):
            return
        _log.warning(
            "container %s did not power off within %.0f s; sending SIGTERM to nspawn; console:\n%s",
            self.name,
            timeout,
            self.console_tail(2000),
        )
        proc.send_signal(signal.SIGTERM)
        if _wait(proc, 10):
            return
        _log.warning("container %s still running; killing it", self.name)
        if self.pid1:
            _kill_quietly(self.pid1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            _log.debug("nspawn process group already gone")
        _wait(proc, 10)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(k) for k in _read_or_empty(children).split()]
    return kids


def _read_or_empty(path: Path) -> str:
    """A /proc file's text, or "" when the task has gone meanwhile."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        _log.debug("pid %d already gone", pid)


def wait_until(
    probe: Callable[[], dict[str, str]],
    done: Callable[[dict[str, str]], bool],
    *,
    timeout: float,
    interval: float = 0.2,
) -> tuple[dict[str, str], float]:
    """Poll ``probe`` until ``done`` holds; the last state and the seconds it took.

    Raises HarnessError with the last state seen when ``timeout`` passes first.
    """
    started = time.monotonic()
    state = probe()
    while not done(state):
        if time.monotonic() - started > timeout:
            raise HarnessError(f"condition not reached within {timeout:.0f} s; last: {state}")
        time.sleep(interval)
        state = probe()
    return state, time.monotonic() - started
