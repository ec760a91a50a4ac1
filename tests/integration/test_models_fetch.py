"""``facepro models fetch`` against a real local HTTP server (http.server in a thread) serving the asset models."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from pipeline import models as mm
from pipeline.cli import main


class _Mirror:
    """Serves ``<models>/<file>``; ``modes[file]`` makes it misbehave: ``flip`` (one byte changed, same size),
    ``truncate`` (full Content-Length, half the body, then the connection closes), ``error`` (HTTP 500)."""

    def __init__(self, models: Path) -> None:
        self.models, self.modes, self.requests = models, {}, []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                name = self.path.rsplit("/", 1)[-1]
                mirror.requests.append(name)
                mode = mirror.modes.get(name)
                path = mirror.models / name
                if mode == "error" or not path.is_file():
                    self.send_error(500 if mode == "error" else 404)
                    return
                body = bytearray(path.read_bytes())
                if mode == "flip":
                    body[len(body) // 2] ^= 0xFF
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "truncate" else body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models"


@pytest.fixture()
def mirror(models: Path) -> Iterator[_Mirror]:
    m = _Mirror(models)
    thread = threading.Thread(target=m.server.serve_forever, daemon=True)
    thread.start()
    yield m
    m.server.shutdown()
    m.server.server_close()


def test_good_file_is_installed_verified_and_private(mirror: _Mirror, tmp_path: Path, models: Path) -> None:
    target = tmp_path / "models"
    spec = mm.get_spec("yolox_nano")
    assert mm.fetch(spec, target, mirror.url, progress=False) is True
    assert (target / spec.file).read_bytes() == (models / spec.file).read_bytes()
    assert mm.status(spec, target) == "present"
    assert (target / spec.file).stat().st_mode & 0o777 == 0o600
    assert target.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in target.iterdir()) == [spec.file]


@pytest.mark.parametrize("mode, message", [("flip", "sha256"), ("truncate", "bytes, expected"), ("error", "HTTP 500")])
def test_bad_downloads_leave_nothing(mirror: _Mirror, tmp_path: Path, mode: str, message: str) -> None:
    target = tmp_path / "models"
    spec = mm.get_spec("scrfd_500m")
    mirror.modes[spec.file] = mode
    with pytest.raises(mm.ModelFetchError, match=message):
        mm.fetch(spec, target, mirror.url, progress=False)
    assert not target.exists() or list(target.iterdir()) == []
    assert mirror.requests == [spec.file]


def test_second_fetch_of_a_verified_model_downloads_nothing(mirror: _Mirror, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "models"
    args = ["models", "fetch", "yolox_nano", "osnet_x0_25_msmt17", "--base-url", mirror.url, "--models-dir", str(target)]
    assert main(args) == 0
    assert sorted(mirror.requests) == ["osnet_x0_25_msmt17.onnx", "yolox_nano.onnx"]
    mirror.requests.clear()
    assert main(args) == 0
    assert mirror.requests == []
    assert "already present, verified" in capsys.readouterr().out


def test_a_wrong_local_file_is_replaced_by_a_verified_download(mirror: _Mirror, tmp_path: Path, models: Path) -> None:
    target = tmp_path / "models"
    target.mkdir()
    spec = mm.get_spec("yolox_nano")
    (target / spec.file).write_bytes(b"not a model")
    assert mm.status(spec, target) == "wrong-checksum"
    assert mm.fetch(spec, target, mirror.url, progress=False) is True
    assert mm.status(spec, target) == "present"


def test_mirror_env_and_cli_failure(mirror: _Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(mm.MIRROR_ENV, mirror.url)
    target = tmp_path / "models"
    mirror.modes["mobilefacenet_128d.onnx"] = "truncate"
    assert main(["models", "fetch", "mobilefacenet_128d", "yolox_nano", "--models-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "mobilefacenet_128d" in err and "not installed" in err.splitlines()[-1]
    assert sorted(p.name for p in target.iterdir()) == ["yolox_nano.onnx"]


def test_import_from_a_local_folder_checks_the_same(tmp_path: Path, models: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    spec = mm.get_spec("scrfd_500m")
    (bad / spec.file).write_bytes((models / spec.file).read_bytes()[:-1] + b"\0")
    target = tmp_path / "models"
    with pytest.raises(mm.ModelFetchError, match="sha256"):
        mm.import_file(spec, target, bad)
    assert list(target.iterdir()) == []
    with pytest.raises(mm.ModelFetchError, match="does not exist"):
        mm.import_file(mm.get_spec("yolox_nano"), target, bad)
    assert mm.import_file(spec, target, models) is True
    assert mm.status(spec, target) == "present"


def test_no_official_download_says_where_to_get_it() -> None:
    spec = mm.get_spec("scrfd_500m")
    assert spec.url is None
    with pytest.raises(mm.ModelFetchError, match="--from DIR"):
        mm.download_url(spec)
    assert mm.download_url(mm.get_spec("yolox_nano")).startswith("https://github.com/Megvii-BaseDetection/")


def test_manifest_matches_the_asset_checksums(assets: Path) -> None:
    sums = dict(reversed(line.split()) for line in (assets / "SHA256SUMS").read_text().splitlines() if line.strip())
    for spec in mm.manifest().values():
        assert sums[f"models/{spec.file}"] == spec.sha256
        assert (assets / "models" / spec.file).stat().st_size == spec.size
