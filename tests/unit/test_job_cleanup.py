"""Job deletion and retention (:mod:`pipeline.job_cleanup`) over a real migrated SQLite database and real job
folders; the clock is injected (jobs "ended" 40 days ago), and the runner's thread runs the retention pass."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pipeline.job_cleanup import JobCleanup
from pipeline.jobs import JobConflict, JobRunner
from storage.jobs import JobTable
from storage.writer import EventWriter
from tests.unit.test_storage import update

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


def _job(table: JobTable, data: Path, state: str, ended_days_ago: float | None, upload: bool = False) -> str:
    """A job in ``state`` that ended that many days before NOW, with a job folder (and an upload file)."""
    job_id = str(uuid.uuid4())
    params = {"path": "/x.avi", **({"upload": str(uuid.uuid4())} if upload else {})}
    table.create(job_id, "analyze", params)
    ended = NOW - timedelta(days=ended_days_ago) if ended_days_ago is not None else None
    if state != "queued":
        table.set_state(job_id, "running", {"queued"}, started_at=ended or NOW)
    if state not in ("queued", "running"):
        table.set_state(job_id, state, {"running"}, ended_at=ended)
    folder = data / "jobs" / job_id
    (folder / "run").mkdir(parents=True)
    (folder / "job.log").write_text("log")
    if upload:
        (data / "uploads").mkdir(exist_ok=True)
        (data / "uploads" / f"{params['upload']}.avi").write_bytes(b"clip")
    return job_id


def _event(engine: Engine, job_id: str, data: Path) -> str:
    """An event of the job, its snapshot in the job's folder."""
    shot = data / "jobs" / job_id / "snapshots" / f"{uuid.uuid4().hex}.jpg"
    shot.parent.mkdir(exist_ok=True)
    shot.write_bytes(b"\xff\xd8\xff")
    event_id = uuid.uuid4().hex
    w = EventWriter(engine, job_id=job_id)
    w.add_update(update(event_id, camera="job-x", ended=True, snapshot_path=str(shot)))
    w.flush()
    return event_id


def test_retention_removes_old_finished_jobs_keeps_their_events_then_sweeps_their_folders(engine: Engine,
                                                                                        data_dir: Path) -> None:
    table = JobTable(engine)
    cleanup = JobCleanup(table, data_dir, retention_days=30, clock=lambda: NOW)
    old_done = _job(table, data_dir, "done", 40, upload=True)
    old_failed = _job(table, data_dir, "failed", 31)
    recent = _job(table, data_dir, "done", 29)
    old_running = _job(table, data_dir, "running", 40)  # started 40 days ago, never finished: not touched
    queued = _job(table, data_dir, "queued", None)
    stray = data_dir / "jobs" / str(uuid.uuid4())  # a folder nothing refers to (a job deleted by hand)
    stray.mkdir()
    (data_dir / "jobs" / "notes").mkdir()  # not a job's folder: never touched
    _event(engine, old_done, data_dir)

    got = cleanup.prune()
    assert (got.jobs, got.folders) == (2, 1)  # old_done, old_failed (its folder with it: no events); the sweep: stray
    assert {j.id for j in table.list()} == {recent, old_running, queued}
    assert table.count_events(old_done) == 1  # events follow storage.retention_days, not the job's
    assert [p.name for p in (data_dir / "jobs" / old_done).iterdir()] == ["snapshots"]
    assert not (data_dir / "uploads").exists() or not list((data_dir / "uploads").iterdir())
    assert not (data_dir / "jobs" / old_failed).exists() and not stray.exists()
    assert (data_dir / "jobs" / "notes").is_dir()
    for job_id in (recent, old_running, queued):
        assert (data_dir / "jobs" / job_id / "job.log").is_file()

    assert cleanup.prune().jobs == 0  # nothing more is old
    assert table.delete_events(old_done) == 1 and table.count_events(old_done) == 0  # as event retention would
    assert cleanup.prune().folders == 1 and not (data_dir / "jobs" / old_done).exists()


def test_delete_refuses_unfinished_jobs_and_unknown_ids(engine: Engine, data_dir: Path) -> None:
    table = JobTable(engine)
    cleanup = JobCleanup(table, data_dir, retention_days=30)
    for state in ("queued", "running"):
        job_id = _job(table, data_dir, state, None)
        with pytest.raises(JobConflict, match=f"a {state} job cannot be deleted; cancel it first"):
            cleanup.delete(job_id)
        assert table.get(job_id).state == state and (data_dir / "jobs" / job_id / "job.log").is_file()
    with pytest.raises(KeyError):
        cleanup.delete(str(uuid.uuid4()))
    with pytest.raises(ValueError, match="retention_days"):
        JobCleanup(table, data_dir, retention_days=0)


def test_delete_with_events_deletes_them_in_chunks(engine: Engine, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.jobs

    monkeypatch.setattr(storage.jobs, "EVENT_CHUNK", 2)  # 5 events: 3 transactions
    table = JobTable(engine)
    job_id, other = _job(table, data_dir, "done", 1), _job(table, data_dir, "done", 1)
    for _ in range(5):
        _event(engine, job_id, data_dir)
    _event(engine, other, data_dir)
    got = JobCleanup(table, data_dir, retention_days=30).delete(job_id, events=True)
    assert (got.events_deleted, got.events_kept) == (5, 0) and not (data_dir / "jobs" / job_id).exists()
    assert table.count_events(other) == 1 and table.get(other) is not None


def test_the_runner_thread_prunes_at_start_and_then_every_interval(engine: Engine) -> None:
    class Cleanup:
        def __init__(self) -> None:
            self.calls = 0
            self.ran = threading.Event()

        def prune(self) -> None:
            self.calls += 1
            self.ran.set()
            if self.calls == 2:
                raise OSError("disk gone")  # logged; the runner goes on

    clock = [0.0]
    cleanup = Cleanup()
    runner = JobRunner(JobTable(engine), {}, poll_s=0.01, cleanup=cleanup, prune_every_s=100.0, clock=lambda: clock[0])
    runner.start()
    try:
        assert cleanup.ran.wait(10) and cleanup.calls == 1
        threading.Event().wait(0.1)
        assert cleanup.calls == 1  # not again within the interval
        clock[0] = 150.0
        cleanup.ran.clear()
        assert cleanup.ran.wait(10)
        clock[0] = 300.0
        cleanup.ran.clear()
        assert cleanup.ran.wait(10) and cleanup.calls == 3  # a failed pass did not stop the runner
    finally:
        runner.stop()
    with pytest.raises(JobConflict, match="cannot be deleted in this process"):
        JobRunner(JobTable(engine), {}).delete(str(uuid.uuid4()))
