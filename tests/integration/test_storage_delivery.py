"""Storage killed with SIGKILL mid-run: after the run the events equal those of an undisturbed run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.integration.conftest import pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 700  # the first three people of the one-by-one video


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "one-by-one-person-detection.mp4", tmp_path_factory.mktemp("clip") / "one700.avi", FRAMES)


def _events(data_dir: Path) -> list[tuple]:
    con = sqlite3.connect(data_dir / "facepro.db")
    try:
        rows = con.execute("select e.id, c.name, e.track_id, e.label, e.first_frame, e.last_frame, e.ended "
                           "from events e join cameras c on c.id = e.camera_id").fetchall()
        embeddings = con.execute("select count(*), count(distinct event_id || model || frame_index) from reid_embeddings").fetchone()
    finally:
        con.close()
    assert len({r[0] for r in rows}) == len(rows)
    assert embeddings[0] == embeddings[1]  # no duplicated embedding
    return sorted(r[1:] for r in rows)


def _run(clip: Path, models: Path, data_dir: Path, kill_storage: bool) -> list[tuple]:
    tree = pipeline_config(models, {"room": clip}, storage__resend_after_s=1.0,
                           recognition__reid={"path": str(models / "osnet_x0_25_msmt17.onnx")})
    tree["cameras"][0]["max_fps"] = 40
    tree["storage"]["batch_ms"] = 100
    cfg = save_config(tree, data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        if kill_storage:
            storage = lambda d: next(s for s in d["stages"] if s["stage"] == "storage")  # noqa: E731
            doc = wait_status(proc, timeout_s=120, until=lambda d: storage(d)["rate_fps"] > 0 and d["uptime_s"] > 8)
            os.kill(storage(doc)["pids"][0], signal.SIGKILL)
            wait_status(proc, until=lambda d: storage(d)["restarts"] >= 1 and storage(d)["processes"] == 1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((data_dir / "last_run.json").read_text())
    assert summary["stages"]["recognition"]["frames_out"] == FRAMES
    counts = summary["stages"]["recognition"]["counts"]
    assert counts["storage_unacked"] == 0  # everything was acknowledged before recognition exited
    if kill_storage:
        assert summary["stages"]["storage"]["restarts"] == 1
        print("items re-sent after the storage restart:", counts["storage_resent"])
    return _events(data_dir)


def test_killed_storage_loses_and_duplicates_nothing(clip: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    runs = []
    for kill in (False, True):
        d = Path(tempfile.mkdtemp(prefix="fps-", dir="/tmp"))
        monkeypatch.setenv("FACEPRO_DATA_DIR", str(d))
        try:
            runs.append(_run(clip, models, d, kill))
        finally:
            os.system(f"rm -rf {d}")
    undisturbed, disturbed = runs
    assert 3 <= len(undisturbed) <= 6, undisturbed  # three people walk through these frames
    assert disturbed == undisturbed
