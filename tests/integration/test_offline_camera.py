"""A live camera that is down at start is offline and retried; the file camera beside it completes."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from tests.integration.conftest import finish_run, pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 80


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _capture(doc: dict) -> dict:
    return next(s for s in doc["stages"] if s["stage"] == "capture")


def _count(doc: dict, name: str) -> int:
    return int(_capture(doc)["counts"].get(name, 0))


def test_unreachable_live_camera_is_offline_and_retried_while_the_file_camera_completes(videos: Path, models: Path,
                                                                                        short_data_dir: Path) -> None:
    clip = write_clip(videos / "vtest.avi", short_data_dir / "clip.avi", FRAMES)
    tree = pipeline_config(models, {"campus": clip})
    tree["cameras"].append({"name": "door", "source": f"rtsp://127.0.0.1:{_closed_port()}/none", "mode": "live",
                            "reconnect_s": 0.2})
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        wait_status(proc, timeout_s=120, until=lambda d: _capture(d)["processes"] == 2)
        # the file camera's capture exits at its end of file; the live one stays, offline, reopening
        doc = wait_status(proc, timeout_s=120, until=lambda d: _capture(d)["processes"] == 1 and _count(d, "reconnects") >= 3)
        assert _count(doc, "offline") == 1
        assert _capture(doc)["restarts"] == 0  # retried in place, never restarted (no restart budget spent)
        assert "door" in _capture(doc)["last_error"] and "cannot be opened" in _capture(doc)["last_error"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        summary = finish_run(proc, short_data_dir)
    assert summary["stages"]["capture"]["frames_out"] == FRAMES  # every frame of the file camera
    assert summary["stages"]["recognition"]["frames_out"] == FRAMES
