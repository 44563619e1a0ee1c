"""``edge-agent bundle build SPEC``: collect wheels, models, plans, config and hooks into a bundle.

The spec is a TOML file (:class:`BuildSpec`; relative paths are relative to the spec's folder)::

    name = "street-counter"
    version = "1.4.0"
    config = "deploy/agent.toml"          # validated with the agent's schema, as config/agent.toml

    [target]
    boards = ["rpi5", "generic-arm64"]
    machine = "aarch64"
    python = "3.11"
    # platforms = ["manylinux_2_28_aarch64", ...]   pip --platform tags (default: per machine)

    [wheels]
    project = "."                           # build the agent wheel here (or: agent = "x.whl")
    exclude = ["llama-cpp-python"]          # dependencies not shipped (no wheel for the target)
    # requirements = [...]                  default: the agent wheel's own dependencies
    # find_links = ["wheelhouse"], no_index = true   offline builds from a local wheelhouse

    [models]
    names = ["yolox_nano_416"]              # from the model store, with their manifests

    [[plans]]
    key = "trt10.3-sm87-tegra234"           # -> plans/<key>/...
    dir = "build/plans-orin"

    [hooks]
    pre_install = "hooks/check.sh"

    [files]
    "models/extra/labels.txt" = "labels.txt"

Dependency wheels come from ``python -m pip download --only-binary=:all: --platform ...
--python-version ... --implementation cp``. pip evaluates the markers of *transitive*
dependencies against the build host; the agent's own requirements are evaluated here against the
target (python_version, platform_machine, extras). Every wheel collected is then checked against
the target's tags, so a wheel that cannot install on the device never gets into a bundle.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version
from pydantic import Field, ValidationError, field_validator

from agent.bundles.archive import PayloadSource, write_bundle
from agent.bundles.manifest import (
    CONFIG_PATH,
    Board,
    BundleCompat,
    BundleManifest,
    check_payload_path,
)
from agent.bundles.signing import load_private_key
from agent.configfile import parse_config_text
from agent.errors import BundleError
from engines.configbase import StrictModel
from engines.errors import EngineError
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DEFAULT_PLATFORMS",
    "BuildResult",
    "BuildSpec",
    "build_bundle",
    "default_output",
    "load_spec",
    "target_requirements",
    "wheel_fits",
]

_log = logging.getLogger(__name__)

DEFAULT_PLATFORMS: dict[str, list[str]] = {
    "aarch64": [
        "manylinux_2_28_aarch64",
        "manylinux_2_27_aarch64",
        "manylinux_2_24_aarch64",
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
        "linux_aarch64",
    ],
    "x86_64": [
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_24_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "linux_x86_64",
    ],
}
"""pip ``--platform`` tags per machine when the spec gives none: glibc 2.28 (Debian 12,
Ubuntu 20.04+ / JetPack 5-6, Raspberry Pi OS bookworm) and older."""

Line = Callable[[str], None]


class TargetSpec(StrictModel):
    boards: list[Board] = Field(min_length=1, description="Board families the bundle is for.")
    machine: str = Field(
        pattern=r"^(aarch64|x86_64)$", description="CPU architecture of the device."
    )
    python: str | None = Field(
        default=None,
        pattern=r"^3\.\d+$",
        description="The device's Python major.minor (needed when the bundle has wheels).",
    )
    platforms: list[str] = Field(
        default_factory=list,
        description="pip --platform tags (default: manylinux/linux tags of the machine).",
    )
    l4t: str | None = Field(default=None, description="L4T the plans need (>=36.3 or 36.3).")
    tensorrt: str | None = Field(default=None, description="TensorRT the plans need (10.3).")
    min_agent_version: str | None = Field(
        default=None, description="Oldest agent that may install this bundle."
    )


class WheelsSpec(StrictModel):
    agent: Path | None = Field(default=None, description="The agent wheel to ship.")
    project: Path | None = Field(
        default=None, description="Build the agent wheel from this project folder instead."
    )
    requirements: list[str] | None = Field(
        default=None,
        description="Dependency requirements to download (default: the agent wheel's own "
        "Requires-Dist, evaluated for the target).",
    )
    extras: list[str] = Field(
        default_factory=list, description="Extras of the agent whose dependencies to include."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Projects never shipped (e.g. llama-cpp-python: no aarch64 wheel).",
    )
    extra: list[Path] = Field(default_factory=list, description="More wheel files to ship.")
    find_links: list[Path] = Field(
        default_factory=list, description="Local wheel folders pip searches (--find-links)."
    )
    no_index: bool = Field(default=False, description="Do not use the package index at all.")
    index_url: str | None = Field(default=None, description="pip --index-url.")

    @field_validator("exclude")
    @classmethod
    def _canonical(cls, value: list[str]) -> list[str]:
        return [canonicalize_name(v) for v in value]


class ModelsSpec(StrictModel):
    names: list[str] = Field(default_factory=list, description="Models from the model store.")
    manifest_dirs: list[Path] = Field(
        default_factory=list, description="Extra manifest folders (before the built-in ones)."
    )
    search_path: list[Path] = Field(
        default_factory=list, description="Folders searched for model files."
    )
    store_dir: Path | None = Field(
        default=None,
        description="Model store folder for pulls (default: ~/.cache/edge-agent/models).",
    )
    allow_download: bool = Field(
        default=True, description="Pull a model missing from the search path."
    )


class PlanSpec(StrictModel):
    key: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Target key of these plans (their folder under plans/).",
    )
    dir: Path = Field(description="Folder whose files go under plans/<key>/.")


class HooksSpec(StrictModel):
    pre_install: Path | None = Field(default=None, description="Check run before the switch.")
    post_install: Path | None = Field(
        default=None, description="Check run by the new version's self-test."
    )


class BuildSpec(StrictModel):
    """A ``bundle build`` spec (see the module docstring)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Bundle name.")
    version: str = Field(description="PEP 440 bundle version.")
    config: Path | None = Field(default=None, description="Agent config shipped in the bundle.")
    target: TargetSpec = Field(description="The devices the bundle is for.")
    wheels: WheelsSpec | None = Field(default=None, description="Agent and dependency wheels.")
    models: ModelsSpec = Field(default_factory=ModelsSpec, description="Models to ship.")
    plans: list[PlanSpec] = Field(default_factory=list, description="TensorRT plan folders.")
    hooks: HooksSpec = Field(default_factory=HooksSpec, description="Install checks.")
    files: dict[str, Path] = Field(
        default_factory=dict, description="More payload files: payload path -> source."
    )

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        try:
            Version(value)
        except InvalidVersion:
            raise ValueError(f"version {value!r} is not a PEP 440 version (e.g. 1.4.0)") from None
        return value

    @field_validator("files")
    @classmethod
    def _paths(cls, value: dict[str, Path]) -> dict[str, Path]:
        for path in value:
            check_payload_path(path)
        return value


@dataclass
class BuildResult:
    path: Path
    manifest: BundleManifest
    signed_with: str | None
    excluded: list[str] = field(default_factory=list)


def load_spec(path: Path) -> BuildSpec:
    """Read and validate a spec; relative paths made relative to its folder."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise BundleError(f"cannot read bundle spec {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"bundle spec {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise BundleError(f"bundle spec {path} is not UTF-8 text") from exc
    try:
        spec = BuildSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise BundleError(f"bundle spec {path} is invalid: {problems}") from exc
    return _resolve_paths(spec, path.parent.resolve())


def _resolve_paths(spec: BuildSpec, base: Path) -> BuildSpec:
    def rel(p: Path | None) -> Path | None:
        return None if p is None else (base / p.expanduser())

    def each(paths: list[Path]) -> list[Path]:
        return [base / p.expanduser() for p in paths]

    update: dict[str, object] = {
        "config": rel(spec.config),
        "files": {k: base / v.expanduser() for k, v in spec.files.items()},
        "plans": [p.model_copy(update={"dir": base / p.dir}) for p in spec.plans],
        "hooks": spec.hooks.model_copy(
            update={
                "pre_install": rel(spec.hooks.pre_install),
                "post_install": rel(spec.hooks.post_install),
            }
        ),
        "models": spec.models.model_copy(
            update={
                "manifest_dirs": each(spec.models.manifest_dirs),
                "search_path": each(spec.models.search_path),
                "store_dir": rel(spec.models.store_dir),
            }
        ),
    }
    if spec.wheels is not None:
        update["wheels"] = spec.wheels.model_copy(
            update={
                "agent": rel(spec.wheels.agent),
                "project": rel(spec.wheels.project),
                "extra": each(spec.wheels.extra),
                "find_links": each(spec.wheels.find_links),
            }
        )
    return spec.model_copy(update=update)


# ---------------------------------------------------------------------------------- wheels


def _target_env(target: TargetSpec, extra: str) -> dict[str, str]:
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    python = target.python or f"{sys.version_info.major}.{sys.version_info.minor}"
    env.update(
        {
            "python_version": python,
            "python_full_version": f"{python}.0",
            "platform_machine": target.machine,
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "extra": extra,
        }
    )
    return env


def target_requirements(
    requires_dist: list[str], target: TargetSpec, *, extras: list[str], exclude: list[str]
) -> tuple[list[str], list[str]]:
    """``(requirements to download, names excluded)``: each Requires-Dist whose marker holds
    on the target (for no extra or one of ``extras``), without its marker."""
    keep: list[str] = []
    excluded: list[str] = []
    for text in requires_dist:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise BundleError(f"agent wheel requirement {text!r} is invalid: {exc}") from exc
        if req.marker is not None and not any(
            req.marker.evaluate(_target_env(target, extra)) for extra in ["", *extras]
        ):
            continue
        if canonicalize_name(req.name) in exclude:
            excluded.append(req.name)
            continue
        req.marker = None
        keep.append(str(req))
    return keep, excluded


def _requires_dist(wheel: Path) -> list[str]:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise BundleError(f"{wheel} has {len(names)} METADATA files, expected 1")
            text = zf.read(names[0]).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read wheel {wheel}: {exc}") from exc
    return Parser().parsestr(text).get_all("Requires-Dist") or []


def _platforms(target: TargetSpec) -> list[str]:
    return target.platforms or DEFAULT_PLATFORMS[target.machine]


def wheel_fits(filename: str, target: TargetSpec) -> bool:
    """Whether a wheel file name's tags install on the target (python, machine, platforms)."""
    try:
        _name, _version, _build, wheel_tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return False
    python = target.python or f"{sys.version_info.major}.{sys.version_info.minor}"
    major, minor = (int(p) for p in python.split("."))
    platforms = _platforms(target)
    supported = {
        *tags.cpython_tags((major, minor), platforms=platforms),
        *tags.compatible_tags((major, minor), "cp" + f"{major}{minor}", platforms),
    }
    return any(tag in supported for tag in wheel_tags)


def _run(cmd: list[str], what: str, line: Line, cwd: Path | None = None) -> None:
    line(f"{what}: {' '.join(cmd[:6])} ...")
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=3600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundleError(f"{what} failed to run: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln or "error" in ln.lower()] or lines
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        hint = ""
        found = re.search(r"No matching distribution found for (\S+)", proc.stderr or "")
        if found:
            hint = (
                f" — {found.group(1)} has no wheel for this target: add it to wheels.exclude "
                "or put a wheel in a wheels.find_links folder"
            )
        raise BundleError(f"{what} failed: {detail[:300]}{hint}")


def _agent_wheel(spec: WheelsSpec, work: Path, line: Line) -> Path | None:
    if spec.agent is not None and spec.project is not None:
        raise BundleError("bundle spec: give wheels.agent or wheels.project, not both")
    if spec.agent is not None:
        if not spec.agent.is_file():
            raise BundleError(f"agent wheel {spec.agent} not found (wheels.agent)")
        return spec.agent
    if spec.project is None:
        return None
    out = work / "agent-wheel"
    out.mkdir()
    uv = shutil.which("uv")
    if uv is not None:
        cmd = [uv, "build", "--wheel", "--quiet", "--out-dir", str(out), str(spec.project)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(spec.project)]
    _run(cmd, f"building the agent wheel from {spec.project}", line)
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BundleError(f"building {spec.project} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _download(
    requirements: list[str], spec: WheelsSpec, target: TargetSpec, dest: Path, line: Line
) -> None:
    if not requirements:
        return
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--python-version",
        target.python or f"{sys.version_info.major}.{sys.version_info.minor}",
        "--implementation",
        "cp",
        "--dest",
        str(dest),
    ]
    for platform_tag in _platforms(target):
        cmd += ["--platform", platform_tag]
    if spec.no_index:
        cmd.append("--no-index")
    if spec.index_url:
        cmd += ["--index-url", spec.index_url]
    for folder in spec.find_links:
        cmd += ["--find-links", str(folder)]
    _run(
        [*cmd, *requirements],
        f"downloading {len(requirements)} requirement(s) for {target.machine} / "
        f"Python {target.python}",
        line,
    )


def _collect_wheels(
    spec: WheelsSpec, target: TargetSpec, work: Path, line: Line
) -> tuple[list[Path], str | None, list[str]]:
    """(wheel files, agent version, excluded names)."""
    agent = _agent_wheel(spec, work, line)
    agent_version: str | None = None
    requirements = list(spec.requirements or [])
    excluded: list[str] = []
    if agent is not None:
        try:
            name, version, _b, _t = parse_wheel_filename(agent.name)
        except InvalidWheelFilename as exc:
            raise BundleError(f"{agent} is not a wheel file name: {exc}") from exc
        if canonicalize_name(name) != "edge-agent":
            raise BundleError(f"{agent} is a {name} wheel, not edge-agent (wheels.agent)")
        agent_version = str(version)
        if spec.requirements is None:
            requirements, excluded = target_requirements(
                _requires_dist(agent), target, extras=spec.extras, exclude=spec.exclude
            )
    dest = work / "wheels"
    dest.mkdir()
    _download(requirements, spec, target, dest, line)
    wheels = sorted(dest.glob("*.whl"))
    for path in wheels:
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
        if name in spec.exclude:
            line(f"excluded {path.name} (wheels.exclude)")
            excluded.append(str(name))
            path.unlink()
    for extra in spec.extra:
        if not extra.is_file():
            raise BundleError(f"wheel {extra} not found (wheels.extra)")
    chosen = [*sorted(dest.glob("*.whl")), *spec.extra]
    if agent is not None:
        chosen.insert(0, agent)
    by_name: dict[str, Path] = {}
    for path in chosen:
        if not wheel_fits(path.name, target):
            raise BundleError(
                f"{path.name} does not install on {target.machine} / Python {target.python} "
                f"({', '.join(_platforms(target)[:2])}...): give a wheel built for the target"
            )
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
        if name in by_name and by_name[name].name != path.name:
            raise BundleError(f"two wheels of {name}: {by_name[name].name} and {path.name}")
        by_name[name] = path
    return list(by_name.values()), agent_version, sorted(set(excluded))


# ---------------------------------------------------------------------------------- models


def _model_files(spec: ModelsSpec, line: Line) -> list[PayloadSource]:
    if not spec.names:
        return []
    store_dir = spec.store_dir or Path.home() / ".cache" / "edge-agent" / "models"
    config = ModelStoreConfig(
        store_dir=store_dir,
        search_path=spec.search_path,
        manifest_dirs=spec.manifest_dirs,
        allow_download=spec.allow_download,
    )
    store = ModelStore(config, store_dir.parent)
    out: list[PayloadSource] = []
    classes_done: set[str] = set()
    for name in spec.names:
        try:
            manifest = store.manifest(name)
            origin = store.manifest_path(name)
            path = store.resolve(name)
        except EngineError as exc:
            raise BundleError(f"model {name}: {exc}") from exc
        line(f"model {name}: {path} ({manifest.size} bytes, sha256 checked)")
        out.append(PayloadSource(f"models/{manifest.file}", path))
        out.append(PayloadSource(f"models/manifests/{origin.name}", origin))
        if isinstance(manifest.classes, str) and manifest.classes not in classes_done:
            for folder in (origin.parent, *spec.manifest_dirs, *_builtin_dirs()):
                candidate = folder / "classes" / f"{manifest.classes}.txt"
                if candidate.is_file():
                    out.append(
                        PayloadSource(f"models/manifests/classes/{candidate.name}", candidate)
                    )
                    classes_done.add(manifest.classes)
                    break
            else:
                raise BundleError(f"model {name}: class list {manifest.classes}.txt not found")
    return out


def _builtin_dirs() -> tuple[Path, ...]:
    from engines.store import builtin_manifest_dirs  # noqa: PLC0415

    return builtin_manifest_dirs()


def _tree(folder: Path, prefix: str) -> list[PayloadSource]:
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder ({prefix})")
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise BundleError(f"{path} is a symbolic link: copy the file itself there")
        if path.is_file():
            out.append(PayloadSource(f"{prefix}/{path.relative_to(folder).as_posix()}", path))
    if not out:
        raise BundleError(f"{folder} has no files ({prefix})")
    return out


def _check_config(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read bundle config {path}: {exc}") from exc
    _config, problems = parse_config_text(text)
    if problems:
        raise BundleError(
            f"bundle config {path} does not validate: "
            + "; ".join(p.format() for p in problems[:5])
            + f" — fix it (`edge-agent config validate {path}`)"
        )


def _file(path: Path | None, what: str) -> Path | None:
    if path is not None and not path.is_file():
        raise BundleError(f"{path} not found ({what})")
    return path


def build_bundle(
    spec: BuildSpec,
    out: Path,
    *,
    key_path: Path | None = None,
    progress: Line | None = None,
) -> BuildResult:
    """Build the bundle ``spec`` describes into ``out``; signed with the ``.key`` given."""
    line: Line = progress or (lambda text: _log.info("%s", text))
    key = load_private_key(key_path) if key_path is not None else None
    sources: list[PayloadSource] = []
    with tempfile.TemporaryDirectory(prefix="edge-agent-bundle-") as tmp:
        work = Path(tmp)
        agent_version: str | None = None
        excluded: list[str] = []
        if spec.wheels is not None:
            if spec.target.python is None:
                raise BundleError("bundle spec: target.python is needed to collect wheels")
            wheels, agent_version, excluded = _collect_wheels(spec.wheels, spec.target, work, line)
            sources += [PayloadSource(f"wheels/{w.name}", w) for w in wheels]
            line(
                f"{len(wheels)} wheel(s)"
                + (f", excluded {', '.join(excluded)}" if excluded else "")
            )
        sources += _model_files(spec.models, line)
        for plan in spec.plans:
            sources += _tree(plan.dir, f"plans/{plan.key}")
        config = _file(spec.config, "config")
        if config is not None:
            _check_config(config)
            sources.append(PayloadSource(CONFIG_PATH, config))
        for hook, rel in (
            (spec.hooks.pre_install, "hooks/pre-install"),
            (spec.hooks.post_install, "hooks/post-install"),
        ):
            if _file(hook, rel) is not None and hook is not None:
                sources.append(PayloadSource(rel, hook))
        for rel, src in spec.files.items():
            sources.append(PayloadSource(rel, _file(src, f"files.{rel}") or src))
        seen: dict[str, Path] = {}
        for item in sources:
            if item.path in seen:
                raise BundleError(
                    f"payload {item.path} comes from {seen[item.path]} and {item.source}"
                )
            seen[item.path] = item.source
        compat = BundleCompat(
            boards=spec.target.boards,
            machine=spec.target.machine,
            python=spec.target.python if spec.wheels is not None else None,
            l4t=spec.target.l4t,
            tensorrt=spec.target.tensorrt,
            min_agent_version=spec.target.min_agent_version,
        )
        last = [-1]

        def packed(fraction: float, message: str) -> None:
            step = int(fraction * 20)
            if step != last[0]:
                last[0] = step
                line(f"[{fraction * 100:5.1f}%] {message}")

        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = write_bundle(
            out,
            name=spec.name,
            version=spec.version,
            compat=compat,
            files=sources,
            agent_version=agent_version,
            key=key,
            progress=packed,
        )
    line(
        f"wrote {out}: {len(manifest.files)} files, {manifest.total_size} bytes of payload, "
        + (f"signed with {key.key_id}" if key else "unsigned")
    )
    return BuildResult(
        path=out, manifest=manifest, signed_with=key.key_id if key else None, excluded=excluded
    )


def default_output(spec: BuildSpec, folder: Path | None = None) -> Path:
    """``<folder or cwd>/<name>-<version>.bundle``."""
    return (folder or Path.cwd()) / f"{spec.name}-{spec.version}.bundle"
