"""The real multi-process pipeline on a part of vtest.avi: events, status, shared-memory hygiene."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.ring import list_segments
from tests.integration.conftest import facepro, pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 200


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clip") / "vtest200.avi", FRAMES)


def test_pipeline_stores_person_events_and_reports_status(clip: Path, models: Path, short_data_dir: Path) -> None:
    before = set(list_segments())
    cfg = save_config(pipeline_config(models, {"campus": clip}), short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        status = wait_status(proc, until=lambda d: all(s["processes"] >= 1 for s in d["stages"]) and list_segments(d["run_id"]))
        assert [s["stage"] for s in status["stages"]] == ["capture", "detection", "recognition", "storage"]
        for s in status["stages"]:
            assert set(s) >= {"stage", "processes", "rate_fps", "queue_depth", "dropped"}
        run_id = status["run_id"]
        assert list_segments(run_id), "the capture's ring should exist in /dev/shm while running"
        port = json.loads((short_data_dir / "run" / "current.json").read_text())["metrics_port"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for stage in ("capture", "detection", "recognition", "storage"):
            assert f'facepro_stage_queue_depth{{stage="{stage}"}}' in metrics
        assert 'facepro_alert{alert="backlog",stage="recognition"}' in metrics
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((short_data_dir / "last_run.json").read_text())
    stages = summary["stages"]
    assert stages["capture"]["frames_out"] == FRAMES
    assert stages["detection"]["frames_out"] == FRAMES
    assert stages["recognition"]["frames_out"] == FRAMES  # every frame of the file, exactly once
    assert not stages["recognition"]["dropped"]

    res = facepro("events", "--config", str(cfg), "--json", "--limit", "1000", check=True)
    events = [json.loads(line) for line in res.stdout.splitlines()]
    # 200 frames of a path with 3-9 people at a time: a handful of tracks, not hundreds.
    assert 4 <= len(events) <= 40, len(events)
    for e in events:
        assert e["camera"] == "campus" and e["label"] == "person"
        assert 0 <= e["first_frame"] <= e["last_frame"] < FRAMES
        x1, y1, x2, y2 = e["xyxy"]
        assert 0 <= x1 < x2 <= 480 and 0 <= y1 < y2 <= 360
        assert e["started_at"] <= e["ended_at"]
        assert e["ended"] is True
        assert e["snapshot_path"] and Path(e["snapshot_path"]).is_file()
    assert len({e["event_id"] for e in events}) == len(events)
    assert max(e["last_frame"] - e["first_frame"] for e in events) > 50  # someone is tracked for seconds

    assert list_segments(run_id) == []
    assert set(list_segments()) <= before
    assert not (short_data_dir / "run" / "current.json").exists()


def test_status_without_pipeline_fails_clearly(short_data_dir: Path) -> None:
    res = facepro("status")
    assert res.returncode != 0
    assert "no pipeline is running" in res.stderr


def test_killed_run_leaves_nothing_after_next_start(clip: Path, models: Path, short_data_dir: Path) -> None:
    cfg = save_config(pipeline_config(models, {"campus": clip}), short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        status = wait_status(proc, until=lambda d: d["stages"][0]["processes"] == 1 and d["stages"][2]["rate_fps"] > 0)
        old_run = status["run_id"]
        assert list_segments(old_run)
    finally:
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        psutil.wait_procs([psutil.Process(p) for p in tree if psutil.pid_exists(p)], timeout=10)
    assert list_segments(old_run), "SIGKILL leaves the segments behind (nothing ran to unlink them)"

    proc2 = start_run(cfg)
    try:
        wait_status(proc2, until=lambda d: d["run_id"] != old_run)
        assert list_segments(old_run) == [], "a new run must remove the killed run's segments"
    finally:
        proc2.send_signal(signal.SIGINT)
        out, _ = proc2.communicate(timeout=120)
    losses = json.loads((short_data_dir / "last_run.json").read_text())["losses"]
    assert proc2.returncode == (3 if losses else 0), out[-3000:]  # 3: frames announced before the stop were lost
    assert list_segments(old_run) == []


def test_second_signal_forces_exit_and_still_cleans_up(clip: Path, models: Path, short_data_dir: Path) -> None:
    tree = pipeline_config(models, {"campus": clip})
    tree["cameras"][0]["max_fps"] = 10  # a 20 s run: the signals arrive well before the end
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    status = wait_status(proc, until=lambda d: d["stages"][2]["rate_fps"] > 0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert time.monotonic() - t0 < 15  # no drain of the remaining ~150 frames
    assert list_segments(status["run_id"]) == []
    assert not (short_data_dir / "run" / "current.json").exists()
