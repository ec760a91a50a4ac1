"""Shared helpers for the pipeline benchmarks: a config tree for the asset models, one real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


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


def run_pipeline(tree: dict, timeout_s: float = 1200) -> dict:
    """Run ``facepro run`` on ``tree`` in a fresh data dir; returns the run summary (``last_run.json``).

    Raises:
        SystemExit: the pipeline failed (its stderr tail is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="fpb-", dir="/tmp") as d:
        path = Path(d) / "cfg.yaml"
        path.write_text(yaml.safe_dump(tree))
        env = dict(os.environ, FACEPRO_DATA_DIR=d)
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], env=env,
                             capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise SystemExit(f"pipeline failed ({res.returncode}): {res.stderr[-2000:]}")
        return json.loads((Path(d) / "last_run.json").read_text())


def active_fps(summary: dict, stage: str = "detection") -> float:
    """Frames/s of ``stage`` over the run's active period (first frame → every frame processed)."""
    return summary["stages"][stage]["frames_out"] / summary["active_s"]
