"""URL installs: download_bundle against a real HTTP server (http.server on 127.0.0.1, a thread).

The server (http_support.py) honours ``Range`` (or ignores it on demand), can drop the
connection part-way through a body, leave out or lie about ``Content-Length``, answer a status
instead of the body (404, 503), and be slow. A downloading subprocess is killed with SIGKILL to
show that the next call resumes the partial file where the dead one stopped.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_support import BundleKeys, make_bundle
from http_support import BundleServer, serving
from wait_support import wait_for

from agent.bundles.archive import open_bundle, verify_signature
from agent.bundles.download import download_bundle, download_paths
from agent.errors import BundleBusyError, BundleDownloadError
from engines import fetch

ROOT = Path(__file__).resolve().parents[2]
BODY = os.urandom(1_000_000)  # what the device downloads; its content does not matter here
LIMIT = 4_000_000


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with serving({"/b.bundle": BODY}) as srv:
        yield srv


def _download(srv: BundleServer, dest: Path, **kwargs: object) -> Path:
    options: dict[str, object] = {"max_bytes": LIMIT, "timeout": 10.0, "backoff_s": 0.01}
    options.update(kwargs)
    return download_bundle(srv.url(), dest, **options)  # type: ignore[arg-type]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_writes_the_file_under_the_url_key(server: BundleServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    path = _download(server, tmp_path / "dl", progress=lambda d, t: seen.append((d, t)))
    key = hashlib.sha256(server.url().encode()).hexdigest()[:16]
    assert path == tmp_path / "dl" / f"{key}.bundle"
    assert _sha(path.read_bytes()) == _sha(BODY)
    assert not download_paths(server.url(), tmp_path / "dl")[0].exists()
    assert seen[-1] == (len(BODY), len(BODY))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert server.requests == [None]


def test_dropped_connection_is_resumed_within_the_call(
    server: BundleServer, tmp_path: Path
) -> None:
    server.drops = [300_000, 250_000]
    path = _download(server, tmp_path)
    assert path.read_bytes() == BODY
    assert server.requests == [None, "bytes=300000-", "bytes=550000-"]


def test_no_progress_gives_up_and_the_next_call_resumes(
    server: BundleServer, tmp_path: Path
) -> None:
    server.drops = [200_000, 0, 0]
    with pytest.raises(BundleDownloadError) as info:
        _download(server, tmp_path, attempts_without_progress=2)
    message = str(info.value)
    assert "no progress in 2 attempts" in message
    assert "at byte 200000" in message
    assert "\n" not in message
    assert info.value.reason == "bundle_download_failed"
    partial, final = download_paths(server.url(), tmp_path)
    assert partial.stat().st_size == 200_000
    assert not final.exists()

    assert _download(server, tmp_path).read_bytes() == BODY
    assert server.requests == [None, *["bytes=200000-"] * 3]


def test_resume_after_the_downloading_process_is_killed(
    server: BundleServer, tmp_path: Path
) -> None:
    server.delay_s = 0.05  # ~0.6 MB/s: the child is still downloading when it is killed
    partial, final = download_paths(server.url(), tmp_path)
    script = (
        "import sys; from pathlib import Path; from agent.bundles.download import "
        "download_bundle; download_bundle(sys.argv[1], Path(sys.argv[2]), "
        "max_bytes=4_000_000, timeout=10)"
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            server.url(),
            str(tmp_path),
        ],
        cwd=ROOT,
    )
    try:
        wait_for(
            lambda: partial.exists() and partial.stat().st_size >= 100_000,
            "the child's partial download",
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    have = partial.stat().st_size
    assert 0 < have < len(BODY)
    assert not final.exists()

    server.delay_s = 0.0
    assert _download(server, tmp_path).read_bytes() == BODY
    assert server.requests == [None, f"bytes={have}-"]


def test_content_length_over_the_limit_is_refused_before_downloading(
    server: BundleServer, tmp_path: Path
) -> None:
    with pytest.raises(BundleDownloadError) as info:
        _download(server, tmp_path, max_bytes=len(BODY) - 1)
    message = str(info.value)
    assert f"is {len(BODY)} bytes, over the limit of {len(BODY) - 1} bytes" in message
    assert "max_download_bytes" in message
    assert "\n" not in message
    assert server.requests == [None]  # not retried
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_body_running_past_the_limit_is_aborted_and_removed(
    server: BundleServer, tmp_path: Path
) -> None:
    server.send_length = False  # no Content-Length: the limit is only seen while reading
    with pytest.raises(BundleDownloadError) as info:
        _download(server, tmp_path, max_bytes=500_000)
    assert "sent more than the limit of 500000 bytes" in str(info.value)
    partial, final = download_paths(server.url(), tmp_path)
    assert not partial.exists()
    assert not final.exists()


def test_body_without_length_is_complete_when_the_server_ends_it(
    server: BundleServer, tmp_path: Path
) -> None:
    server.send_length = False
    assert _download(server, tmp_path).read_bytes() == BODY


def test_content_length_larger_than_the_body_is_resumed_to_the_real_end(
    server: BundleServer, tmp_path: Path
) -> None:
    # The server announces more than it has, then hangs up: an early end each time; the
    # resume at the real end is answered 416 with the real length, so the file is complete
    # (the installer still verifies it, as any bundle).
    server.announce = len(BODY) + 1000
    assert _download(server, tmp_path).read_bytes() == BODY
    assert server.requests == [None, f"bytes={len(BODY)}-"]


def test_server_ignoring_range_restarts_from_zero(server: BundleServer, tmp_path: Path) -> None:
    server.honour_range = False
    server.drops = [400_000]
    assert _download(server, tmp_path).read_bytes() == BODY
    assert server.requests == [None, "bytes=400000-"]


def test_http_404_is_one_line_and_not_retried(server: BundleServer, tmp_path: Path) -> None:
    with pytest.raises(BundleDownloadError) as info:
        download_bundle(server.url("/missing.bundle"), tmp_path, max_bytes=LIMIT, timeout=10)
    message = str(info.value)
    assert message == (
        f"download of {server.url('/missing.bundle')} failed: HTTP 404 Not Found; check the URL"
    )
    assert server.requests == [None]


def test_http_503_is_retried(server: BundleServer, tmp_path: Path) -> None:
    server.statuses = [503, 503]
    assert _download(server, tmp_path).read_bytes() == BODY
    assert server.requests == [None, None, None]


def test_unreachable_host_gives_up_after_the_attempts(tmp_path: Path) -> None:
    with pytest.raises(BundleDownloadError) as info:
        download_bundle(
            "http://127.0.0.1:9/b.bundle",
            tmp_path,
            max_bytes=LIMIT,
            timeout=5,
            attempts_without_progress=2,
            backoff_s=0.01,
        )
    assert "no progress in 2 attempts" in str(info.value)
    assert "cannot reach" in str(info.value)


def test_not_an_http_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleDownloadError, match="not http:// or https://"):
        download_bundle("ftp://example.com/b.bundle", tmp_path, max_bytes=LIMIT, timeout=5)


def test_a_second_download_of_the_same_url_is_busy(server: BundleServer, tmp_path: Path) -> None:
    partial, _ = download_paths(server.url(), tmp_path)
    with (
        fetch.exclusive_lock(partial.with_suffix(".lock"), "held by the test"),
        pytest.raises(BundleBusyError) as info,
    ):
        _download(server, tmp_path)
    assert info.value.reason == "busy"
    assert server.requests == []
    assert _download(server, tmp_path).read_bytes() == BODY


def test_a_real_bundle_resumed_after_a_drop_verifies(
    bundle_keys: BundleKeys, tmp_path: Path
) -> None:
    model = os.urandom(600_000)
    bundle = make_bundle(
        tmp_path / "street-1.2.0.bundle",
        {"models/m.onnx": model, "config/agent.toml": b'device_id = "cam-1"\n'},
        version="1.2.0",
        key=bundle_keys.key,
    )
    data = bundle.read_bytes()
    with serving({"/street-1.2.0.bundle": data}) as srv:
        srv.drops = [len(data) // 2]
        path = download_bundle(
            srv.url("/street-1.2.0.bundle"),
            tmp_path / "dl",
            max_bytes=LIMIT,
            timeout=10,
            backoff_s=0.01,
        )
        assert srv.requests == [None, f"bytes={len(data) // 2}-"]
    with open_bundle(path) as reader:
        assert verify_signature(reader, bundle_keys.trusted) == "release"
        assert reader.manifest.version == "1.2.0"
        reader.extract_to(tmp_path / "files")
    assert (tmp_path / "files" / "models" / "m.onnx").read_bytes() == model


def test_planted_symlinks_are_removed_not_followed(server: BundleServer, tmp_path: Path) -> None:
    dest = tmp_path / "dl"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    partial, final = download_paths(server.url(), dest)
    for path in (partial, final, partial.with_suffix(".lock")):
        path.symlink_to(victim)
    path = _download(server, dest)
    assert victim.read_bytes() == b"keep me"
    assert not path.is_symlink()
    assert _sha(path.read_bytes()) == _sha(BODY)
    assert server.requests == [None]  # the link was not taken for a partial download


def test_symlinked_download_folder_is_refused(server: BundleServer, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dl").symlink_to(real)
    with pytest.raises(BundleDownloadError, match="symbolic link"):
        _download(server, tmp_path / "dl")
    assert list(real.iterdir()) == []
