"""Shared helpers for the pipeline benchmarks: a config tree for the asset models, one real run, video copies
(clipped, resized) and decoded frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import yaml

#: The repository root (scripts/..): prepended to PYTHONPATH of the processes the benchmarks start, so they run
#: this checkout's pipeline, not another installed copy.
ROOT = Path(__file__).resolve().parents[1]


def assets_dir(arg: str | None) -> Path:
    """``--assets`` or ``FACEPRO_ASSETS``; exits with a clear message when neither is set."""
    value = arg or os.environ.get("FACEPRO_ASSETS")
    if not value:
        raise SystemExit("set FACEPRO_ASSETS or pass --assets (the folder holding models/ and data/)")
    return Path(value).resolve()


def pipeline_tree(assets: Path, video: str = "vtest.avi", detection: dict | None = None,
                  recognition: dict | None = None, storage: dict | None = None) -> dict:
    """A config tree for one file camera with the asset models; sections are merged over the defaults."""
    models = assets / "models"
    tree = {
        "cameras": [{"name": "campus", "source": str(assets / "data" / "videos" / video), "mode": "file"}],
        "detection": {"detector": {"type": "onnx", "path": str(models / "yolox_nano.onnx"), "layout": "yolox"}},
        "recognition": {"face": {"detector": {"type": "onnx", "path": str(models / "scrfd_500m.onnx")},
                                 "embedder": {"type": "onnx", "path": str(models / "mobilefacenet_128d.onnx")}}},
        "storage": {"snapshots": False},
        "runtime": {"metrics_port": None},
    }
    for key, extra in (("detection", detection), ("recognition", recognition), ("storage", storage)):
        tree[key].update(extra or {})
    return tree


def child_env(**extra: str) -> dict:
    """This process's environment with :data:`ROOT` first on ``PYTHONPATH`` (and ``extra`` set)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_pipeline(tree: dict, timeout_s: float = 1200, after: Callable[[Path], Any] | None = None) -> dict:
    """Run ``facepro run`` on ``tree`` in a fresh data dir; returns the run summary (``last_run.json``).

    Args:
        after: called with the run's data dir (database, snapshots) before it is removed; its result is
            the summary's ``"after"`` entry.

    Raises:
        SystemExit: the pipeline failed (its stderr tail is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="fpb-", dir="/tmp") as d:
        path = Path(d) / "cfg.yaml"
        path.write_text(yaml.safe_dump(tree))
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], env=child_env(FACEPRO_DATA_DIR=d),
                             capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"pipeline failed ({res.returncode}): {res.stderr[-2000:]}")
        summary = json.loads((Path(d) / "last_run.json").read_text())
        if after is not None:
            summary["after"] = after(Path(d))
        return summary


def active_fps(summary: dict, stage: str = "detection") -> float:
    """Frames/s of ``stage`` over the run's active period (first frame → every frame processed)."""
    return summary["stages"][stage]["frames_out"] / summary["active_s"]


def parse_size(text: str) -> tuple[int, int]:
    """``"1920x1080"`` → ``(1920, 1080)`` (width, height in pixels).

    Raises:
        SystemExit: not ``WxH`` with positive integers.
    """
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise SystemExit(f"--resize: expected WIDTHxHEIGHT in pixels such as 1920x1080, got {text!r}")
    return int(w), int(h)


def write_copy(src: Path, dst: Path, max_frames: int | None = None, size: tuple[int, int] | None = None) -> int:
    """Write the first ``max_frames`` frames of ``src`` (all when None), resized to ``size`` (width, height
    pixels) when given, to ``dst`` as an MJPG AVI at the source's frames/s; returns the frames written.

    Raises:
        SystemExit: ``src`` cannot be read.
    """
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    out, n = None, 0
    while max_frames is None or n < max_frames:
        ok, frame = cap.read()
        if not ok:
            break
        if size is not None and (frame.shape[1], frame.shape[0]) != size:
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
        if out is None:
            out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frame.shape[1], frame.shape[0]))
        out.write(frame)
        n += 1
    cap.release()
    if out is None:
        raise SystemExit(f"cannot read a frame of {src}")
    out.release()
    return n


def decode_frames(paths: list[Path], budget_bytes: int = 2 * 2**30) -> list[np.ndarray]:
    """Decode the videos' frames into memory, at most ``budget_bytes`` (bytes of ``(H, W, 3) uint8`` frames)
    in all, split evenly over the videos: each gives its first frames that fit."""
    frames: list[np.ndarray] = []
    share = budget_bytes // max(1, len(paths))
    for path in paths:
        cap = cv2.VideoCapture(str(path))
        used = 0
        while True:
            ok, frame = cap.read()
            if not ok or used + frame.nbytes > share:
                break
            frames.append(frame)
            used += frame.nbytes
        cap.release()
    return frames
