"""Another process holds the database's write lock for longer than the busy timeout while a pipeline runs."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 200


def _stage(doc: dict, name: str) -> dict:
    return next(s for s in doc["stages"] if s["stage"] == name)


def _events(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "facepro.db") as db:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]


def test_a_held_write_lock_delays_storage_but_loses_nothing_and_readers_go_on(videos: Path, models: Path,
                                                                              short_data_dir: Path) -> None:
    clip = write_clip(videos / "vtest.avi", short_data_dir / "clip.avi", FRAMES)
    clean_dir = short_data_dir / "clean"
    tree = pipeline_config(models, {"campus": clip})
    tree["cameras"][0]["max_fps"] = 20  # ~10 s of video: the lock is taken early and held 8 s
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    holder = None
    try:
        wait_status(proc, until=lambda d: _stage(d, "storage")["rate_fps"] > 0)  # events are being written
        holder = sqlite3.connect(short_data_dir / "facepro.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool; longer than the 5 s busy timeout
        taken = time.monotonic()
        doc = wait_status(proc, timeout_s=60, until=lambda d: _stage(d, "storage")["counts"].get("lock_wait_ms", 0) > 0)
        assert "locked" in _stage(doc, "storage")["last_error"]  # status shows what storage waits for
        res = facepro("events", "--config", str(cfg), "--json", timeout=30)  # a reader is not blocked
        assert res.returncode == 0, res.stderr
        assert all(json.loads(line)["camera"] == "campus" for line in res.stdout.splitlines())  # one event per line
        time.sleep(max(0.0, 8.0 - (time.monotonic() - taken)))
        doc = wait_status(proc, until=lambda d: True)
        assert all(_stage(doc, s)["restarts"] == 0 for s in ("capture", "detection", "recognition", "storage"))
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        summary = finish_run(proc, short_data_dir)
    assert all(st["restarts"] == 0 for st in summary["stages"].values())
    assert summary["stages"]["recognition"]["frames_out"] == FRAMES
    locked_count = _events(short_data_dir)
    import os

    os.environ["FACEPRO_DATA_DIR"] = str(clean_dir)
    clean = start_run(save_config(pipeline_config(models, {"campus": clip}), short_data_dir / "clean.yaml"))
    finish_run(clean, clean_dir)
    assert locked_count == _events(clean_dir) > 0  # once the lock was released every event was stored
