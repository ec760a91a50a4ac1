"""Jobs without processes: the state machine, the jobs table, the job_dirs path rule, the runner with an injected
child pipeline (cancel, escalation, failures, restart recovery, stop), and events carrying their job id."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import Engine

from pipeline.job_analyze import DRAIN_S, FORCE_S, AnalyzeJobs, JobPaths, job_config, job_paths
from pipeline.jobs import (CANCEL_WAIT_S, INTERRUPTED, STATES, STOPPED, TRANSITIONS, JobConflict, JobFailed,
                           JobRequestError, JobRunner, check_job_path, check_transition, predecessors)
from storage.jobs import JobTable
from storage.queries import list_events
from storage.writer import EventWriter
from tests.integration.conftest import write_clip
from tests.unit.test_storage import pg_url, update  # noqa: F401 (pg_url: fixture)

#: The allowed moves, written out (the table in pipeline/jobs.py must say exactly this).
ALLOWED = {("queued", "running"), ("queued", "cancelled"), ("running", "done"), ("running", "failed"),
           ("running", "cancelled")}


# ----------------------------------------------------------- state machine
@pytest.mark.parametrize("old", STATES)
@pytest.mark.parametrize("new", STATES)
def test_state_machine_allows_exactly_the_documented_moves(old: str, new: str) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
        assert old in predecessors(new)
    else:
        with pytest.raises(JobConflict, match=f"a {old} job cannot become {new}"):
            check_transition(old, new)
        assert old not in predecessors(new)


def test_finished_states_are_final() -> None:
    assert {s for s, nxt in TRANSITIONS.items() if not nxt} == {"done", "failed", "cancelled"}


# --------------------------------------------------------------- the table
def _id() -> str:
    return str(uuid.uuid4())


def test_table_set_state_is_compare_and_set(engine: Engine) -> None:
    jobs = JobTable(engine)
    job = jobs.create(_id(), "analyze", {"path": "/x.avi"}, "/x.avi", 100)
    assert (job.state, job.progress, job.frames_total, job.params) == ("queued", 0.0, 100, {"path": "/x.avi"})
    assert jobs.set_state(job.id, "done", {"running"}) is None  # not running: nothing changes
    assert jobs.get(job.id).state == "queued"
    assert not jobs.set_progress(job.id, 5, 100, 0.05)  # progress only while running
    running = jobs.set_state(job.id, "running", {"queued"}, pid=123)
    assert running is not None and running.pid == 123
    assert jobs.set_state(job.id, "running", {"queued"}) is None  # a second claim loses
    assert jobs.set_progress(job.id, 50, 100, 0.5) and jobs.get(job.id).progress == 0.5
    done = jobs.set_state(job.id, "done", {"running"}, progress=1.0, result={"events": 3})
    assert (done.state, done.result, done.pid) == ("done", {"events": 3}, 123)
    with pytest.raises(ValueError, match="unknown field"):
        jobs.set_state(job.id, "failed", {"done"}, nonsense=1)
    with pytest.raises(ValueError, match="job type"):
        jobs.create(_id(), "transcode", {})


def test_table_lists_newest_first_and_the_queue_oldest_first(engine: Engine) -> None:
    jobs = JobTable(engine)
    ids = [jobs.create(_id(), "backup", {}).id for _ in range(3)]
    assert [j.id for j in jobs.list()] == ids[::-1]
    assert [j.id for j in jobs.list("queued", oldest_first=True)] == ids
    jobs.set_state(ids[0], "cancelled", {"queued"})
    assert [j.id for j in jobs.list("queued", oldest_first=True)] == ids[1:]


def test_events_carry_the_job_id_of_their_writer_and_filter_by_it(engine: Engine) -> None:
    job = JobTable(engine).create(_id(), "analyze", {"path": "/x.avi"})
    live, from_job = uuid.uuid4().hex, uuid.uuid4().hex
    w_live, w_job = EventWriter(engine), EventWriter(engine, job_id=job.id)
    w_live.add_update(update(live))
    w_job.add_update(update(from_job, camera="job-1"))
    w_live.flush(), w_job.flush()
    w_live.add_update(update(from_job, camera="job-1", last=20))  # a later update from another writer keeps it
    w_live.flush()
    assert [e.event_id for e in list_events(engine, job=job.id)] == [from_job]
    docs = {e.event_id: e.to_json() for e in list_events(engine)}
    assert docs[from_job]["job_id"] == job.id and docs[from_job]["last_frame"] == 20 and docs[live]["job_id"] is None
    assert JobTable(engine).count_events(job.id) == 1
    with pytest.raises(ValueError, match="canonical UUID"):
        EventWriter(engine, job_id="abc")


# --------------------------------------------------------------- the paths
@pytest.fixture()
def job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "clips"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.avi").write_bytes(b"x")
    (tmp_path / "secret.avi").write_bytes(b"x")
    return d


def test_paths_under_a_job_dir_are_accepted(job_dir: Path) -> None:
    assert check_job_path(str(job_dir / "sub" / "a.avi"), [job_dir]) == job_dir / "sub" / "a.avi"
    assert check_job_path(f"{job_dir}//sub/./a.avi", [Path("/nowhere"), job_dir]) == job_dir / "sub" / "a.avi"
    link = job_dir.parent / "linked-root"
    link.symlink_to(job_dir)  # the job dir itself may be a link the admin configured
    assert check_job_path(str(link / "sub" / "a.avi"), [link]) == link / "sub" / "a.avi"


@pytest.mark.parametrize("how, status, match", [
    ("outside", 403, "outside api.job_dirs"),
    ("dotdot", 403, "'..' is not allowed"),
    ("dotdot_inside", 403, "'..' is not allowed"),
    ("file_link", 403, "symbolic link"),
    ("dir_link", 403, "symbolic link"),
    ("relative", 400, "absolute path"),
    ("missing", 404, "no such file"),
    ("directory", 400, "not a regular file"),
    ("the_dir_itself", 403, "outside"),
    ("no_job_dirs", 403, "api.job_dirs is empty"),
])
def test_paths_outside_with_dotdot_or_links_are_refused(job_dir: Path, how: str, status: int, match: str) -> None:
    secret = job_dir.parent / "secret.avi"
    (job_dir / "ln.avi").symlink_to(secret)
    (job_dir / "lndir").symlink_to(job_dir.parent)
    raw = {"outside": str(secret), "dotdot": f"{job_dir}/../secret.avi", "dotdot_inside": f"{job_dir}/sub/../sub/a.avi",
           "file_link": str(job_dir / "ln.avi"), "dir_link": str(job_dir / "lndir" / "secret.avi"),
           "relative": "sub/a.avi", "missing": str(job_dir / "none.avi"), "directory": str(job_dir / "sub"),
           "the_dir_itself": str(job_dir), "no_job_dirs": str(job_dir / "sub" / "a.avi")}[how]
    with pytest.raises(JobRequestError, match=match) as err:
        check_job_path(raw, [] if how == "no_job_dirs" else [job_dir])
    assert err.value.status == status


# ------------------------------------------------------------ the runner
class FakeChild:
    """A job pipeline standing in for ``python -m pipeline.jobrun``: runs until finished or interrupted.

    ``drains``: a first SIGINT makes it exit 0 (it drained); False: it needs the second SIGINT (exit 130).
    """

    def __init__(self, paths: JobPaths, drains: bool = True) -> None:
        self.pid = os.getpid()  # alive: TreeCpu and the ring lookup have something real to look at
        self.paths = paths
        self.drains = drains
        self.code: int | None = None
        self.signals: list[str] = []
        self.exited = threading.Event()

    def finish(self, code: int, frames: int = 10) -> None:
        self.paths.summary.write_text(json.dumps({"run_id": "r1", "wall_s": 1.0, "exit_code": code,
                                                  "stages": {"capture": {"frames_out": frames}}}))
        self.code = code
        self.exited.set()

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout_s: float) -> int | None:
        self.exited.wait(timeout_s)
        return self.code

    def interrupt(self) -> None:
        self.signals.append("INT")
        if self.drains:
            self.finish(0, frames=4)  # else it ignores SIGINT: only SIGKILL stops it

    def kill(self) -> None:
        self.signals.append("KILL")
        self.code = -9
        self.exited.set()


class Spawner:
    def __init__(self, drains: bool = True) -> None:
        self.children: list[FakeChild] = []
        self.drains = drains
        self.started = threading.Event()

    def __call__(self, paths: JobPaths, job_id: str, nice: int) -> FakeChild:
        assert paths.config.is_file() and nice == 10
        child = FakeChild(paths, self.drains)
        self.children.append(child)
        self.started.set()
        return child


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clip") / "c10.avi", 10)


@pytest.fixture()
def cfg(models: Path, videos: Path):
    from tests.unit.test_api import tree
    from pipeline.config import parse_config

    return parse_config(tree(models, videos))


def _runner(engine: Engine, cfg, data_dir: Path, spawner: Spawner, **handlers) -> JobRunner:
    analyze = AnalyzeJobs(cfg, data_dir, str(engine.url), spawner=spawner, poll_s=0.02)
    return JobRunner(JobTable(engine), {"analyze": analyze, **handlers}, poll_s=0.02)


def _wait(jobs: JobTable, job_id: str, states: set[str], timeout_s: float = 20) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} is {jobs.get(job_id).state}, expected {states}")


@pytest.fixture()
def running(engine: Engine, cfg, data_dir: Path) -> Iterator[list[JobRunner]]:
    runners: list[JobRunner] = []
    yield runners
    for r in runners:
        r.stop()


def test_an_analyze_job_runs_its_pipeline_to_done(engine, cfg, data_dir, clip, running) -> None:
    spawner = Spawner()
    runner = _runner(engine, cfg, data_dir, spawner)
    running.append(runner.start())
    job = runner.submit("analyze", {"path": str(clip)}, str(clip))
    assert job.state == "queued"
    spawner.started.wait(10)
    child = spawner.children[0]
    deadline = time.monotonic() + 10
    while runner.store.get(job.id).pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
    got = runner.store.get(job.id)
    assert got.state == "running" and got.pid == child.pid and got.frames_total == 10  # probed before the start
    derived = json.loads(child.paths.config.read_text())
    (camera,) = derived["cameras"]
    assert (camera["name"], camera["source"], camera["mode"]) == (f"job-{job.id.replace('-', '')[:8]}", str(clip), "file")
    assert derived["storage"]["url"] == str(engine.url) and derived["api"]["enabled"] is False
    assert (child.paths.folder / "trt-cache").resolve() == (data_dir / "trt-cache").resolve()  # engines built once
    child.finish(0, frames=10)
    done = _wait(runner.store, job.id, {"done"})
    assert (done.progress, done.frames_done, done.frames_total, done.pid) == (1.0, 10, 10, None)
    assert done.result == {"events": 0, "frames": 10, "exit_code": 0, "run_id": "r1", "wall_s": 1.0,
                           "camera": f"job-{job.id.replace('-', '')[:8]}"}


def _cancel_a_running_job(runner, running: list, spawner, clip: Path) -> tuple[object, float]:
    """Start the runner, submit an analyze job, wait until its pipeline runs, cancel it: (job, seconds cancel took)."""
    running.append(runner.start())
    job = runner.submit("analyze", {"path": str(clip)})
    spawner.started.wait(10)
    _wait(runner.store, job.id, {"running"})
    started = time.monotonic()
    got = runner.cancel(job.id)
    return got, time.monotonic() - started


def test_cancel_drains_the_pipeline_and_is_cancelled_within_the_limit(engine, cfg, data_dir, clip, running) -> None:
    spawner = Spawner()
    runner = _runner(engine, cfg, data_dir, spawner)
    got, took = _cancel_a_running_job(runner, running, spawner, clip)
    assert took < CANCEL_WAIT_S
    assert (got.state, got.error) == ("cancelled", "cancelled by request")
    assert spawner.children[0].signals == ["INT"]  # it drained: no second signal
    assert got.result["frames"] == 4 and got.result["exit_code"] == 0


def test_a_pipeline_that_does_not_stop_is_escalated_to_sigkill(engine, cfg, data_dir, clip, running) -> None:
    spawner = Spawner(drains=False)
    runner = _runner(engine, cfg, data_dir, spawner)
    got, took = _cancel_a_running_job(runner, running, spawner, clip)
    assert got.state == "cancelled" and spawner.children[0].signals == ["INT", "INT", "KILL"]
    assert DRAIN_S + FORCE_S <= took < CANCEL_WAIT_S  # waited for the drain, then stopped it within the limit


def test_a_bad_source_or_a_crashing_handler_fails_that_job_and_the_next_runs(engine, cfg, data_dir, clip, tmp_path,
                                                                             running) -> None:
    bad = tmp_path / "bad.avi"
    bad.write_text("not a video")
    spawner = Spawner()

    def boom(job, ctl):
        raise RuntimeError("boom")

    runner = _runner(engine, cfg, data_dir, spawner, backup=boom)
    first = runner.submit("analyze", {"path": str(bad)}, str(bad))
    second = runner.submit("backup", {})
    third = runner.submit("analyze", {"path": str(clip)})
    running.append(runner.start())
    assert _wait(runner.store, first.id, {"failed"}).error == \
        f"source {bad}: not a video FacePro can decode (OpenCV read no frame)"
    assert _wait(runner.store, second.id, {"failed"}).error == "internal error: RuntimeError: boom"
    spawner.started.wait(10)
    spawner.children[0].finish(0)
    assert _wait(runner.store, third.id, {"done"}).progress == 1.0
    assert len(spawner.children) == 1  # the bad source never started a pipeline


def test_a_failing_pipeline_fails_the_job_with_its_error_line(engine, cfg, data_dir, clip, running) -> None:
    spawner = Spawner()
    runner = _runner(engine, cfg, data_dir, spawner)
    running.append(runner.start())
    job = runner.submit("analyze", {"path": str(clip)})
    spawner.started.wait(10)
    child = spawner.children[0]
    child.paths.log.write_text("INFO starting\nfacepro run: detection.detector.path: no such file\n")
    child.finish(2)
    got = _wait(runner.store, job.id, {"failed"})
    assert got.error == "facepro run: detection.detector.path: no such file" and got.result["exit_code"] == 2


def test_cancel_of_queued_finished_and_uninterruptible_jobs(engine, cfg, data_dir) -> None:
    gate = threading.Event()
    runner = _runner(engine, cfg, data_dir, Spawner(), backup=lambda job, ctl: gate.wait(10) and {"ok": True})
    queued = runner.submit("analyze", {"path": "/x.avi"})
    got = runner.cancel(queued.id)
    assert (got.state, got.error) == ("cancelled", "cancelled by request")
    with pytest.raises(JobConflict, match="a cancelled job cannot become cancelled"):
        runner.cancel(queued.id)
    with pytest.raises(KeyError):
        runner.cancel(_id())
    backup = runner.submit("backup", {})
    runner.start()
    try:
        _wait(runner.store, backup.id, {"running"})
        with pytest.raises(JobConflict, match="running backup job cannot be cancelled"):
            runner.cancel(backup.id)
    finally:
        gate.set()
        runner.stop()
    assert runner.store.get(backup.id).state == "done"


def test_a_restart_continues_or_fails_running_jobs_and_keeps_queued_ones(engine, cfg, data_dir, clip, running) -> None:
    store = JobTable(engine)
    dead = store.create(_id(), "analyze", {"path": str(clip)})
    store.set_state(dead.id, "running", {"queued"}, pid=2**22 + 7)  # its pipeline is gone, no summary
    ended = store.create(_id(), "analyze", {"path": str(clip)}, frames_total=10)
    store.set_state(ended.id, "running", {"queued"}, pid=2**22 + 9)  # its pipeline ended while the api was down
    paths = job_paths(data_dir, ended.id)
    paths.folder.mkdir(parents=True)
    paths.summary.write_text(json.dumps({"run_id": "r2", "wall_s": 3.0, "exit_code": 0,
                                         "stages": {"capture": {"frames_out": 10}}}))
    backup = store.create(_id(), "backup", {})
    store.set_state(backup.id, "running", {"queued"})
    queued = store.create(_id(), "backup", {})
    runner = _runner(engine, cfg, data_dir, Spawner(), backup=lambda job, ctl: {"ok": True})
    running.append(runner.start())
    assert _wait(store, dead.id, {"failed", "done"}).error == INTERRUPTED
    assert _wait(store, backup.id, {"failed", "done"}).error == INTERRUPTED
    got = _wait(store, ended.id, {"done", "failed"})
    assert (got.state, got.progress, got.frames_done, got.result["run_id"]) == ("done", 1.0, 10, "r2")
    assert _wait(store, queued.id, {"done"}).result == {"ok": True}


def test_stopping_the_api_interrupts_the_running_job(engine, cfg, data_dir, clip) -> None:
    spawner = Spawner()
    runner = _runner(engine, cfg, data_dir, spawner, backup=lambda job, ctl: {"ok": True})
    job = runner.submit("analyze", {"path": str(clip)})
    later = runner.submit("backup", {})
    runner.start()
    spawner.started.wait(10)
    _wait(runner.store, job.id, {"running"})
    runner.stop()
    got = runner.store.get(job.id)
    assert (got.state, got.error, spawner.children[0].signals) == ("failed", STOPPED, ["INT"])
    assert runner.store.get(later.id).state == "queued"  # runs at the next start


def test_job_config_is_a_valid_config_of_one_file_camera(cfg, clip, data_dir) -> None:
    derived = job_config(cfg, clip, "job-12345678", "sqlite:////db/facepro.db")
    assert [(c.name, c.source, c.resolved_mode()) for c in derived.cameras] == [("job-12345678", str(clip), "file")]
    assert (derived.detection.processes, derived.recognition.processes, derived.runtime.metrics_port) == (1, 1, None)
    assert derived.storage.url == "sqlite:////db/facepro.db" and derived.storage.retention_days is None
    assert derived.recognition.face == cfg.recognition.face and not derived.api.enabled


def test_handler_failures_are_one_line(engine, cfg, data_dir, running) -> None:
    def clear(job, ctl):
        raise JobFailed("the archive folder is full")

    runner = _runner(engine, cfg, data_dir, Spawner(), backup=clear)
    running.append(runner.start())
    job = runner.submit("backup", {})
    assert _wait(runner.store, job.id, {"failed"}).error == "the archive folder is full"


@pytest.mark.postgres
def test_postgres_jobs_and_job_events_round_trip_and_0006_downgrades(pg_url) -> None:  # noqa: F811
    from storage.db import downgrade, head_revision, open_engine, upgrade

    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        jobs = JobTable(engine)
        job = jobs.create(_id(), "analyze", {"path": "/x.avi"})
        assert jobs.set_state(job.id, "running", {"queued"}, pid=1).state == "running"
        assert jobs.set_state(job.id, "running", {"queued"}) is None
        w = EventWriter(engine, job_id=job.id)
        w.add_update(update(uuid.uuid4().hex))
        w.flush()
        assert jobs.count_events(job.id) == 1 and [e.job_id for e in list_events(engine, job=job.id)] == [job.id]
    finally:
        engine.dispose()
    assert downgrade(pg_url, "0005") == "0005"
    assert upgrade(pg_url) == head_revision()  # 0006 and the later revisions again


def test_the_runner_does_not_spin_while_a_job_runs_and_others_are_queued(engine, cfg, data_dir, clip, running) -> None:
    spawner = Spawner()
    analyze = AnalyzeJobs(cfg, data_dir, str(engine.url), spawner=spawner, poll_s=0.2)
    runner = JobRunner(JobTable(engine), {"analyze": analyze}, poll_s=0.2)
    running.append(runner.start())
    first = runner.submit("analyze", {"path": str(clip)})
    spawner.started.wait(10)
    child = spawner.children[0]
    polls = []
    child.poll = lambda: polls.append(1)  # type: ignore[method-assign]  (None: still running)
    other = runner.submit("analyze", {"path": str(clip)})  # wakes the runner: the running job must not spin
    runner.cancel(other.id)  # a cancel of another job neither
    time.sleep(1.0)
    assert len(polls) < 50, f"{len(polls)} polls in 1 s at one per 0.2 s"  # a spinning loop makes thousands
    assert runner.store.get(first.id).state == "running"
    child.poll = lambda: child.code  # type: ignore[method-assign]
    child.finish(0)
    assert _wait(runner.store, first.id, {"done"}).state == "done"
