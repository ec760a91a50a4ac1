"""Live cameras lose no frame at start (they wait for the stages to load their models) nor at a source reopen."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.conftest import finish_run, pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 50  # a 5 s clip at 10 fps, played live: it ends and is reopened during the run


def _stage(doc: dict, name: str) -> dict:
    return next(s for s in doc["stages"] if s["stage"] == name)


def test_live_cameras_lose_nothing_at_start_or_at_a_reopen(videos: Path, models: Path, short_data_dir: Path) -> None:
    clip = write_clip(videos / "one-by-one-person-detection.mp4", short_data_dir / "clip.avi", FRAMES)
    tree = pipeline_config(models, {"cam1": clip, "cam2": clip})
    for cam in tree["cameras"]:
        cam.update(mode="live", max_fps=10, reconnect_s=0.2)
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        doc = wait_status(proc, timeout_s=120, until=lambda d: _stage(d, "capture")["counts"].get("reconnects", 0) >= 2)
        assert _stage(doc, "capture")["counts"]["waited_for_gate_ms"] > 0  # held back while the models loaded
        time.sleep(2.0)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        summary = finish_run(proc, short_data_dir)
    stages = summary["stages"]
    for name in ("capture", "detection", "recognition"):
        dropped = {r: n for r, n in stages[name]["dropped"].items() if r != "motion_skipped"}
        assert dropped == {}, (name, stages[name]["dropped"])  # no queue_full, behind, overwritten or lost
    assert stages["capture"]["frames_out"] >= 2 * FRAMES + 2  # both cameras passed their end and were reopened
    assert stages["recognition"]["frames_out"] == stages["capture"]["frames_out"]


def test_file_cameras_also_wait_for_the_stages_to_be_ready(videos: Path, models: Path, short_data_dir: Path) -> None:
    """A file's first frame is read once every stage has loaded and warmed its models, so the run's active time
    (first frame to the last processed) measures processing, not loading; every frame still arrives."""
    clip = write_clip(videos / "vtest.avi", short_data_dir / "clip.avi", 20)
    cfg = save_config(pipeline_config(models, {"cam1": clip}), short_data_dir / "cfg.yaml")
    summary = finish_run(start_run(cfg), short_data_dir)
    stages = summary["stages"]
    assert stages["capture"]["counts"]["waited_for_gate_ms"] > 0  # held back while detection and recognition loaded
    assert stages["recognition"]["frames_out"] == stages["capture"]["frames_out"] == 20
    assert summary["active_s"] < summary["wall_s"]
