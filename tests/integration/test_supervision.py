"""Supervisor health: a killed process is restarted, shown in status, and the run completes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pipeline.ring import list_segments
from tests.integration.conftest import pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 300


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clip") / "vtest300.avi", FRAMES)


def _stage(doc: dict, name: str) -> dict:
    return next(s for s in doc["stages"] if s["stage"] == name)


def test_killed_detection_process_is_restarted_and_run_completes(clip: Path, models: Path, short_data_dir: Path) -> None:
    tree = pipeline_config(models, {"campus": clip}, ring__release_timeout_s=2.0, tracking__reorder_timeout_s=1.0)
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        doc = wait_status(proc, until=lambda d: _stage(d, "detection")["rate_fps"] > 0 and _stage(d, "detection")["pids"])
        victim = _stage(doc, "detection")["pids"][0]
        os.kill(victim, signal.SIGKILL)
        doc = wait_status(proc, until=lambda d: _stage(d, "detection")["restarts"] >= 1 and _stage(d, "detection")["processes"] == 1)
        assert victim not in _stage(doc, "detection")["pids"]
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    stages = json.loads((short_data_dir / "last_run.json").read_text())["stages"]
    assert stages["capture"]["frames_out"] == FRAMES
    assert stages["detection"]["restarts"] == 1
    lost = stages["recognition"]["dropped"].get("lost", 0)
    # Frames the killed process held are counted as lost, never silently missing.
    assert stages["recognition"]["frames_out"] + lost >= FRAMES - 2 * 16
    assert stages["recognition"]["frames_out"] > FRAMES // 2
    assert list_segments(json.loads((short_data_dir / "last_run.json").read_text())["run_id"]) == []
