"""Model store on local files: search path, checks, the verified cache, unreadable files.

All on the real model files (../shared/models through the ``models_dir`` fixture) and real
copies of them in a temporary folder; nothing is mocked.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.errors import (
    ChecksumMismatchError,
    DownloadError,
    ModelFileError,
    ModelNotFoundError,
    ModelStoreError,
)
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig

YOLOX = "yolox_nano_416"


def _store(tmp_path: Path, env: dict[str, str] | None = None, **config: object) -> ModelStore:
    cfg = ModelStoreConfig.model_validate({"store_dir": tmp_path / "store", **config})
    return ModelStore(cfg, tmp_path / "state", env={} if env is None else env)


def _corrupt_copy(source: Path, folder: Path) -> Path:
    """A real copy of ``source`` with one byte in the middle flipped (same size)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_resolve_through_env_model_path_without_copying(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_MODEL_PATH", f"{tmp_path / 'nowhere'}{os.pathsep}{models_dir}")
    cfg = ModelStoreConfig(store_dir=tmp_path / "store", allow_download=False)
    store = ModelStore(cfg, tmp_path / "state")  # reads the real environment
    assert store.resolve(YOLOX) == models_dir / "yolox_nano_416.onnx"
    assert not (tmp_path / "store" / "yolox_nano_416.onnx").exists()
    assert store.state(YOLOX).state == "verified"


def test_search_order_env_then_config_then_store(tmp_path: Path, models_dir: Path) -> None:
    config_dir = tmp_path / "configured"
    config_dir.mkdir()
    shutil.copy(models_dir / "nanodet_m_416.onnx", config_dir)
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(models_dir)}, search_path=[config_dir])
    assert store.locate("nanodet_m_416") == models_dir / "nanodet_m_416.onnx"
    store = _store(tmp_path, {}, search_path=[config_dir])
    assert store.locate("nanodet_m_416") == config_dir / "nanodet_m_416.onnx"
    assert store.search_dirs("nanodet_m_416") == (config_dir, tmp_path / "store")


def test_data_manifest_found_in_data_path_subfolder(tmp_path: Path, data_dir: Path) -> None:
    store = _store(tmp_path, {"EDGE_AGENT_DATA_PATH": str(data_dir)}, allow_download=False)
    assert store.resolve("bikes-video") == data_dir / "videos" / "bikes.mp4"
    # A model manifest does not look in the data path.
    assert data_dir not in store.search_dirs(YOLOX)


def test_sha256_mismatch_names_file_expected_actual_and_fix(
    tmp_path: Path, models_dir: Path
) -> None:
    bad = _corrupt_copy(models_dir / "yolox_nano_416.onnx", tmp_path / "search")
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(bad.parent)})
    with pytest.raises(ChecksumMismatchError) as info:
        store.resolve(YOLOX)
    text = str(info.value)
    manifest = store.manifest(YOLOX)
    assert str(bad) in text
    assert manifest.sha256 in text
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in text
    assert "remove it from the search path" in text
    assert "\n" not in text
    assert info.value.reason == "checksum_mismatch"


def test_wrong_size_is_reported_before_hashing(tmp_path: Path, models_dir: Path) -> None:
    folder = tmp_path / "search"
    folder.mkdir()
    truncated = folder / "yolox_nano_416.onnx"
    truncated.write_bytes((models_dir / "yolox_nano_416.onnx").read_bytes()[:1000])
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(folder)})
    with pytest.raises(
        ChecksumMismatchError, match=r"is 1000 bytes but manifest .* expects 3660092"
    ):
        store.resolve(YOLOX)
    assert store.state(YOLOX).state == "wrong_size"


def test_corrupt_file_in_store_says_pull_again(tmp_path: Path, models_dir: Path) -> None:
    _corrupt_copy(models_dir / "nanodet_m_416.onnx", tmp_path / "store")
    store = _store(tmp_path, allow_download=False)
    with pytest.raises(ChecksumMismatchError, match="run `edge-agent models pull nanodet_m_416`"):
        store.resolve("nanodet_m_416")


def test_directory_named_as_the_model_is_unreadable(tmp_path: Path) -> None:
    # Tests run as root, which reads a chmod-000 file anyway; a folder where the file should be
    # is a filesystem object no one can read as a model.
    (tmp_path / "search" / "yolox_nano_416.onnx").mkdir(parents=True)
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(tmp_path / "search")})
    with pytest.raises(
        ModelFileError, match=r"yolox_nano_416\.onnx \(model yolox_nano_416\) is a folder"
    ):
        store.resolve(YOLOX)
    assert store.state(YOLOX).state == "unreadable"


def test_fifo_named_as_the_model_is_refused_without_blocking(tmp_path: Path) -> None:
    # Opening a FIFO with no writer would block for ever; the store must refuse it from stat().
    folder = tmp_path / "search"
    folder.mkdir()
    os.mkfifo(folder / "yolox_nano_416.onnx")
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(folder)})
    with pytest.raises(ModelFileError, match="is not a regular file"):
        store.resolve(YOLOX)


def test_dangling_symlink_is_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "yolox_nano_416.onnx").symlink_to(tmp_path / "gone.onnx")
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(folder)})
    with pytest.raises(ModelFileError, match="No such file or directory"):
        store.resolve(YOLOX)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder that uid 65534 can traverse (pytest's tmp_path is root-only, mode 0700)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="edge-agent-perm-") as name:
        Path(name).chmod(0o755)
        yield Path(name)


def test_chmod_000_file_is_unreadable_for_an_unprivileged_reader(
    world_dir: Path, models_dir: Path
) -> None:
    """chmod 000 stops every user but root (CAP_DAC_OVERRIDE), and the tests run as root.

    So the check runs in a forked child that has dropped to uid/gid 65534 (nobody) first: a
    real permission denial, on a real copy of the model.
    """
    model = world_dir / "yolox_nano_416.onnx"
    shutil.copy(models_dir / "yolox_nano_416.onnx", model)
    model.chmod(0)
    store = ModelStore(
        ModelStoreConfig(store_dir=world_dir / "store", allow_download=False),
        world_dir,
        env={"EDGE_AGENT_MODEL_PATH": str(world_dir)},
    )
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, try, report through the pipe, never return
        code = 3
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                store.resolve(YOLOX)
                os.write(write_end, b"resolved without error")
            except ModelFileError as exc:
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, message
    assert message.startswith("ModelFileError: cannot read ")
    assert "Permission denied" in message
    assert str(model) in message
    # As root the same file reads fine, which is why the child was needed.
    assert stat.S_IMODE(model.stat().st_mode) == 0
    assert store.resolve(YOLOX) == model


def test_verified_cache_skips_rehash_until_size_or_mtime_change(
    tmp_path: Path, models_dir: Path
) -> None:
    folder = tmp_path / "search"
    folder.mkdir()
    model = folder / "yolox_nano_416.onnx"
    shutil.copy(models_dir / "yolox_nano_416.onnx", model)
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(folder)})
    assert store.state(YOLOX).state == "present"
    store.resolve(YOLOX)
    assert store.state(YOLOX).state == "verified"
    # Flip a byte but keep size and mtime: a new store (next start) trusts the cache ...
    before = model.stat()
    _corrupt_copy(model, tmp_path / "flipped")
    shutil.copyfile(tmp_path / "flipped" / model.name, model)
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(folder)})
    assert again.resolve(YOLOX) == model
    # ... an explicit re-hash (`models verify`) does not,
    with pytest.raises(ChecksumMismatchError):
        again.check(YOLOX, model, rehash=True)
    # and a changed mtime invalidates the cache entry.
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    with pytest.raises(ChecksumMismatchError):
        _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(folder)}).resolve(YOLOX)


def test_not_found_and_downloads_off_lists_where_it_looked(tmp_path: Path) -> None:
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(tmp_path / "a")}, allow_download=False)
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve(YOLOX)
    assert str(tmp_path / "a") in str(info.value)
    assert "models.allow_download = true" in str(info.value)


def test_pull_copies_from_search_path_into_store_atomically(
    tmp_path: Path, models_dir: Path
) -> None:
    store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(models_dir)})
    progress: list[tuple[int, int, str]] = []
    final = store.pull("deimv2_hgnetv2_atto_coco", progress=lambda *a: progress.append(a))
    assert final == tmp_path / "store" / "deimv2_hgnetv2_atto_coco.onnx"
    assert final.read_bytes() == (models_dir / final.name).read_bytes()
    assert progress[-1] == (2_248_408, 2_248_408, "copy deimv2_hgnetv2_atto_coco.onnx")
    assert sorted(p.name for p in (tmp_path / "store" / ".partial").iterdir()) == [
        "deimv2_hgnetv2_atto_coco.onnx.lock"
    ]
    # Pulled files are remembered as verified (persisted: a new store without the search path
    # finds the store's copy verified); a second pull is a no-op.
    assert _store(tmp_path).state("deimv2_hgnetv2_atto_coco").state == "verified"
    assert store.pull("deimv2_hgnetv2_atto_coco") == final


def test_pull_with_only_a_wrong_local_copy_fails_with_checksum_error(
    tmp_path: Path, models_dir: Path
) -> None:
    bad = _corrupt_copy(models_dir / "yolox_nano_416.onnx", tmp_path / "search")
    manifest_dir = tmp_path / "manifests"
    manifest_dir.mkdir()
    text = (Path(__file__).parents[1] / "models" / "yolox_nano_416.toml").read_text("utf-8")
    # Keep only the path source: nothing to download.
    (manifest_dir / "yolox_local.toml").write_text(
        text.split("[[sources]]")[0].replace('"yolox_nano_416"', '"yolox_local"')
        + '[[sources]]\ntype = "path"\n',
        encoding="utf-8",
    )
    store = _store(
        tmp_path, {"EDGE_AGENT_MODEL_PATH": str(bad.parent)}, manifest_dirs=[manifest_dir]
    )
    with pytest.raises(ChecksumMismatchError, match=r"search path: .* has size 3660092 and sha256"):
        store.pull("yolox_local")
    assert not (tmp_path / "store" / bad.name).exists()
    assert not (tmp_path / "store" / ".partial" / f"{bad.name}.copy").exists()


def test_store_folder_that_cannot_be_created(tmp_path: Path, models_dir: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ModelStore(
        ModelStoreConfig(store_dir=blocker / "models"),
        tmp_path,
        env={"EDGE_AGENT_MODEL_PATH": str(models_dir)},
    )
    with pytest.raises(ModelStoreError, match="cannot create the model store folder") as info:
        store.pull(YOLOX)
    assert info.value.reason == "model_store_error"


def test_second_pull_of_same_file_while_locked_fails_fast(tmp_path: Path, models_dir: Path) -> None:
    lock = tmp_path / "store" / ".partial" / "yolox_nano_416.onnx.lock"
    lock.parent.mkdir(parents=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the lock like another pulling process would
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(write_end, b"locked")
            signal.pause()
        finally:
            os._exit(0)
    try:
        assert os.read(read_end, 6) == b"locked"
        store = _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(models_dir)})
        with pytest.raises(DownloadError, match="another process is already fetching"):
            store.pull(YOLOX)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    # The kernel released the dead holder's lock: the pull goes through now.
    assert _store(tmp_path, {"EDGE_AGENT_MODEL_PATH": str(models_dir)}).pull(YOLOX).is_file()
