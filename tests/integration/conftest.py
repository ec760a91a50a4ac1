"""Helpers for integration tests: short video clips, configs, running ``facepro`` as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pytest
import yaml


def write_clip(src: Path, dst: Path, frames: int) -> Path:
    """Copy the first ``frames`` frames of ``src`` into ``dst`` (MJPG AVI)."""
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    out = None
    for _ in range(frames):
        ok, frame = cap.read()
        if not ok:
            break
        if out is None:
            out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frame.shape[1], frame.shape[0]))
        out.write(frame)
    cap.release()
    assert out is not None, f"cannot read {src}"
    out.release()
    return dst


def pipeline_config(models: Path, sources: dict[str, Path], **overrides: object) -> dict:
    """A config tree for the given cameras with the real models."""
    cfg = {
        "cameras": [{"name": name, "source": str(path), "mode": "file"} for name, path in sources.items()],
        "ring": {"slots": 16},
        "detection": {"processes": 1, "detector": {"type": "onnx", "path": str(models / "yolox_nano.onnx"), "layout": "yolox"}},
        "recognition": {"processes": 1, "face": {
            "detector": {"type": "onnx", "path": str(models / "scrfd_500m.onnx")},
            "embedder": {"type": "onnx", "path": str(models / "mobilefacenet_128d.onnx")}}},
        "runtime": {"stats_interval_s": 0.2, "metrics_port": 0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        cfg.setdefault(section, {})[field] = value
    return cfg


@pytest.fixture()
def short_data_dir(monkeypatch: pytest.MonkeyPatch):
    """A FACEPRO_DATA_DIR with a short path (ipc:// socket paths are limited to ~100 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    monkeypatch.setenv("FACEPRO_DATA_DIR", str(d))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def facepro(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline.cli ARGS`` with the test's environment."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=check, env=dict(os.environ))


def start_run(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                            start_new_session=True)


def wait_status(proc: subprocess.Popen, timeout_s: float = 60.0, until=lambda doc: True) -> dict:
    """Poll ``facepro status --json`` until it answers with a document satisfying ``until``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pipeline exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        res = facepro("status", "--json", timeout=20)
        if res.returncode == 0:
            last = json.loads(res.stdout)
            if until(last):
                return last
        time.sleep(0.3)
    raise AssertionError(f"no matching status within {timeout_s} s; last: {last}")


def save_config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def finish_run(proc: subprocess.Popen, data_dir: Path, timeout_s: float = 300, codes: tuple[int, ...] = (0,)) -> dict:
    """Wait for a run started by :func:`start_run`, assert its exit code is in ``codes``, return its summary (``last_run.json``)."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in codes, out[-3000:]
    return json.loads((data_dir / "last_run.json").read_text())


@pytest.fixture()
def cfg(models: Path, videos: Path, data_dir: Path) -> str:
    """A saved config with the asset models and vtest.avi as its camera (the face CLI tests' default)."""
    return str(save_config(pipeline_config(models, {"campus": videos / "vtest.avi"}), data_dir / "cfg.yaml"))


def identify_faces(cfg: str, image: Path, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    """``facepro identify --json`` of ``image`` in-process: its ``faces`` list."""
    from pipeline.cli import main

    assert main(["identify", "--config", cfg, str(image), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["faces"]
