"""``bundle build``: real builds with real pip from a local wheelhouse (offline), the real agent
wheel built from this checkout, a real model from the shared folder through the model store.

The dependency wheels of the fast tests are small but genuine wheels written here (METADATA with
Requires-Dist, WHEEL, RECORD), in a ``--find-links`` folder used with ``--no-index``; pip resolves
them for the target platform (an aarch64 and an x86_64 build of the same binary project sit side
by side). A ``slow`` test downloads one real binary aarch64 wheel from PyPI.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest
from bundle_support import BundleKeys, read_members

from agent.bundles.archive import open_bundle
from agent.bundles.build import (
    BuildSpec,
    TargetSpec,
    build_bundle,
    load_spec,
    target_requirements,
    wheel_fits,
)
from agent.errors import BundleError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "systemd"))
from nspawn_harness import build_wheel  # noqa: E402

AARCH64 = TargetSpec(boards=["rpi5", "generic-arm64"], machine="aarch64", python="3.11")


def make_wheel(
    folder: Path, name: str, version: str, tag: str = "py3-none-any", requires: tuple[str, ...] = ()
) -> Path:
    """A genuine, installable wheel of a one-module project."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: edge-agent-tests\n"
            f"Root-Is-Purelib: {'true' if tag.endswith('any') else 'false'}\nTag: {tag}\n"
        ).encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("agent-wheel"))


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    make_wheel(house, "tinydep", "1.2.0", requires=("tinysub>=1", "tinybin", "tinyexcluded"))
    make_wheel(house, "tinysub", "1.0.0")
    make_wheel(house, "tinysub", "2.0.0")
    make_wheel(house, "tinyexcluded", "1.0.0")
    make_wheel(house, "tinybin", "0.5.0", tag="cp311-cp311-manylinux_2_17_aarch64")
    make_wheel(house, "tinybin", "0.5.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    return house


def write_spec(folder: Path, text: str) -> Path:
    spec = folder / "bundle.toml"
    spec.write_text(text)
    return spec


def test_real_build_from_local_wheelhouse(
    tmp_path: Path, agent_wheel: Path, wheelhouse: Path, models_dir: Path, bundle_keys: BundleKeys
) -> None:
    plans = tmp_path / "plans-orin"
    plans.mkdir()
    (plans / "yolox.plan").write_bytes(b"plan bytes")
    (plans / "yolox.json").write_text("{}")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "check.sh").write_text("#!/bin/sh\nexit 0\n")
    spec_path = write_spec(
        tmp_path,
        f"""
name = "street-counter"
version = "1.4.0"
config = "{ROOT / "deploy/agent.example.toml"}"

[target]
boards = ["rpi5", "generic-arm64"]
machine = "aarch64"
python = "3.11"
min_agent_version = "0.1.0"

[wheels]
agent = "{agent_wheel}"
requirements = ["tinydep"]
exclude = ["TinyExcluded"]
find_links = ["wheelhouse"]
no_index = true

[models]
names = ["yolox_nano_416"]
search_path = ["{models_dir}"]
store_dir = "store"
allow_download = false

[[plans]]
key = "trt10.3-sm87-tegra234"
dir = "plans-orin"

[hooks]
pre_install = "hooks/check.sh"

[files]
"models/extra/notes.txt" = "hooks/check.sh"
""",
    )
    spec = load_spec(spec_path)
    lines: list[str] = []
    out = tmp_path / "out" / "street-counter-1.4.0.bundle"
    result = build_bundle(spec, out, key_path=bundle_keys.key_path, progress=lines.append)
    assert result.signed_with == "release"
    assert result.excluded == ["tinyexcluded"]
    assert any("downloading 1 requirement" in line for line in lines)
    assert lines[-1].startswith(f"wrote {out}")

    manifest = result.manifest
    paths = [f.path for f in manifest.files]
    assert paths == [
        f"wheels/{agent_wheel.name}",
        "wheels/tinybin-0.5.0-cp311-cp311-manylinux_2_17_aarch64.whl",
        "wheels/tinydep-1.2.0-py3-none-any.whl",
        "wheels/tinysub-2.0.0-py3-none-any.whl",
        "models/yolox_nano_416.onnx",
        "models/manifests/yolox_nano_416.toml",
        "models/manifests/classes/coco80.txt",
        "plans/trt10.3-sm87-tegra234/yolox.json",
        "plans/trt10.3-sm87-tegra234/yolox.plan",
        "config/agent.toml",
        "hooks/pre-install",
        "models/extra/notes.txt",
    ]
    assert manifest.agent_version == "0.1.0"
    assert manifest.compat.machine == "aarch64"
    assert manifest.compat.python == "3.11"
    assert manifest.compat.boards == ["rpi5", "generic-arm64"]
    assert manifest.compat.min_agent_version == "0.1.0"
    model = manifest.file("models/yolox_nano_416.onnx")
    assert model is not None
    assert model.sha256 == "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14"

    with open_bundle(out) as reader:
        assert reader.verify(bundle_keys.trusted) == "release"
        reader.extract_to(tmp_path / "slot")
    assert (tmp_path / "slot/config/agent.toml").read_bytes() == (
        ROOT / "deploy/agent.example.toml"
    ).read_bytes()
    assert (tmp_path / "slot/plans/trt10.3-sm87-tegra234/yolox.plan").read_bytes() == b"plan bytes"
    assert (
        tmp_path / "slot" / "wheels" / agent_wheel.name
    ).read_bytes() == agent_wheel.read_bytes()
    assert not (tmp_path / "out" / "street-counter-1.4.0.bundle.part").exists()


def test_x86_64_target_gets_the_x86_64_wheel(tmp_path: Path, wheelhouse: Path) -> None:
    spec = BuildSpec.model_validate(
        {
            "name": "pc",
            "version": "2.0",
            "target": {"boards": ["x86_64"], "machine": "x86_64", "python": "3.11"},
            "wheels": {"requirements": ["tinybin"], "find_links": [wheelhouse], "no_index": True},
        }
    )
    result = build_bundle(spec, tmp_path / "pc.bundle", progress=lambda _line: None)
    assert [f.path for f in result.manifest.files] == [
        "wheels/tinybin-0.5.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    ]
    assert result.signed_with is None
    assert [m.name for m in read_members(tmp_path / "pc.bundle")][:2] == [
        "manifest.json",
        "payload/wheels/tinybin-0.5.0-cp311-cp311-manylinux_2_17_x86_64.whl",
    ]


def test_agent_wheel_built_from_the_project(tmp_path: Path) -> None:
    """wheels.project: the agent wheel is built from the checkout (uv build, else pip wheel)."""
    spec = load_spec(base_spec(tmp_path, f'[wheels]\nproject = "{ROOT}"\nrequirements = []\n'))
    lines: list[str] = []
    result = build_bundle(spec, tmp_path / "a.bundle", progress=lines.append)
    (wheel,) = result.manifest.wheels
    assert wheel.path == "wheels/edge_agent-0.1.0-py3-none-any.whl"
    assert result.manifest.agent_version == "0.1.0"
    assert any(line.startswith(f"building the agent wheel from {ROOT}") for line in lines)


def test_agent_requirements_for_the_target(agent_wheel: Path) -> None:
    with zipfile.ZipFile(agent_wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    keep, excluded = target_requirements(requires, AARCH64, extras=[], exclude=["llama-cpp-python"])
    names = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for r in keep}
    assert {"numpy", "pydantic", "zstandard", "cryptography", "packaging"} <= names
    assert "llama-cpp-python" not in names
    assert excluded == ["llama-cpp-python"]
    assert "tomli" not in names  # python_version < '3.11' is false on the target
    assert "tensorrt" not in names  # only with the jetson extra
    assert all(";" not in r for r in keep)  # markers evaluated here, not left to pip
    py310 = AARCH64.model_copy(update={"python": "3.10"})
    keep310, _ = target_requirements(requires, py310, extras=["jetson"], exclude=[])
    names310 = {r.split(">")[0].split("<")[0].split("=")[0] for r in keep310}
    assert {"tomli", "tensorrt", "pycuda", "llama-cpp-python"} <= names310
    x86 = AARCH64.model_copy(update={"machine": "x86_64"})
    keep_x86, _ = target_requirements(requires, x86, extras=["jetson"], exclude=[])
    assert not any(r.startswith(("tensorrt", "pycuda")) for r in keep_x86)


@pytest.mark.parametrize(
    ("filename", "fits"),
    [
        ("numpy-2.1.0-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl", True),
        ("numpy-2.1.0-cp311-cp311-manylinux_2_28_aarch64.whl", True),
        ("numpy-2.1.0-cp311-cp311-manylinux_2_34_aarch64.whl", False),  # newer glibc
        ("numpy-2.1.0-cp310-cp310-manylinux_2_17_aarch64.whl", False),
        ("numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),
        ("cryptography-44.0.0-cp39-abi3-manylinux_2_28_aarch64.whl", True),
        ("six-1.16.0-py2.py3-none-any.whl", True),
        ("not-a-wheel.zip", False),
    ],
)
def test_wheel_fits(filename: str, fits: bool) -> None:
    assert wheel_fits(filename, AARCH64) is fits


def base_spec(tmp_path: Path, extra: str = "") -> Path:
    return write_spec(
        tmp_path,
        'name = "n"\nversion = "1.0"\n'
        + extra
        + '\n[target]\nboards = ["rpi5"]\nmachine = "aarch64"\npython = "3.11"\n',
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name = ", "not valid TOML"),
        ('name = "n"\nversion = "1.0"\ncolour = 1\n', "colour"),
        ('name = "n"\nversion = "one"\n[target]\nboards=["rpi5"]\nmachine="aarch64"\n', "PEP 440"),
        (
            'name = "n"\nversion = "1"\n[target]\nboards=["pc"]\nmachine="aarch64"\n',
            r"target\.boards",
        ),
        (
            (
                'name = "n"\nversion = "1"\n[target]\nboards=["rpi5"]\nmachine="aarch64"\n'
                '[files]\n"../evil" = "x"\n'
            ),
            "traversal",
        ),
    ],
)
def test_bad_spec_is_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(BundleError, match=fragment) as info:
        load_spec(write_spec(tmp_path, text))
    assert "\n" not in str(info.value)


def test_invalid_config_is_refused_before_packing(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('[agent]\nlog_level = "loud"\nnot_a_key = 1\n')
    spec = load_spec(base_spec(tmp_path, 'config = "agent.toml"'))
    with pytest.raises(BundleError, match="does not validate") as info:
        build_bundle(spec, tmp_path / "x.bundle", progress=lambda _line: None)
    assert "agent.toml" in str(info.value)
    assert not (tmp_path / "x.bundle").exists()
    assert not (tmp_path / "x.bundle.part").exists()


def test_missing_inputs_are_named(tmp_path: Path, wheelhouse: Path) -> None:
    spec = load_spec(base_spec(tmp_path, '[hooks]\npre_install = "nope.sh"\n'))
    with pytest.raises(BundleError, match=r"nope\.sh not found \(hooks/pre-install\)"):
        build_bundle(spec, tmp_path / "x.bundle", progress=lambda _line: None)
    spec = load_spec(base_spec(tmp_path, '[models]\nnames = ["no_such_model"]\n'))
    with pytest.raises(BundleError, match="no_such_model"):
        build_bundle(spec, tmp_path / "x.bundle", progress=lambda _line: None)


def test_no_wheel_for_target_says_what_to_do(tmp_path: Path, wheelhouse: Path) -> None:
    make_wheel(wheelhouse, "x86only", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    spec = load_spec(
        base_spec(
            tmp_path,
            '[wheels]\nrequirements = ["x86only"]\nfind_links = ["wheelhouse"]\nno_index = true\n',
        )
    )
    with pytest.raises(BundleError, match=r"add it to wheels\.exclude") as info:
        build_bundle(spec, tmp_path / "x.bundle", progress=lambda _line: None)
    assert "x86only" in str(info.value)


def test_extra_wheel_for_another_platform_is_refused(tmp_path: Path, wheelhouse: Path) -> None:
    spec = load_spec(
        base_spec(
            tmp_path,
            "[wheels]\nrequirements = []\n"
            'extra = ["wheelhouse/tinybin-0.5.0-cp311-cp311-manylinux_2_17_x86_64.whl"]\n',
        )
    )
    with pytest.raises(BundleError, match="does not install on aarch64"):
        build_bundle(spec, tmp_path / "x.bundle", progress=lambda _line: None)


@pytest.mark.slow
def test_real_aarch64_wheel_from_pypi(tmp_path: Path) -> None:
    """pip downloads a real binary manylinux aarch64 wheel for Python 3.11 on this x86-64 host."""
    spec = load_spec(base_spec(tmp_path, '[wheels]\nrequirements = ["markupsafe==3.0.2"]\n'))
    result = build_bundle(spec, tmp_path / "arm.bundle", progress=lambda _line: None)
    (wheel,) = result.manifest.wheels
    assert wheel.path.startswith("wheels/MarkupSafe-3.0.2-cp311-cp311-manylinux")
    assert "aarch64" in wheel.path
    assert wheel.size > 10_000
