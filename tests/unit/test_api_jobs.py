"""The jobs routes in-process (TestClient) over a real migrated SQLite database, with the analyze job's child pipeline
injected (tests/unit/test_jobs.py's FakeChild; the real one: tests/integration/test_jobs_run.py)."""

from __future__ import annotations

import stat
import threading
import uuid
from pathlib import Path
from typing import Iterator

from tests.sse import sse_events as _events
import pytest
from fastapi.testclient import TestClient

from pipeline.metrics import StageCounters
from storage.db import open_engine
from storage.writer import EventWriter
from tests.integration.conftest import write_clip
from tests.unit.test_api import Api, analyzer  # noqa: F401 (fixture)
from tests.unit.test_jobs import Spawner
from tests.unit.test_storage import update


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clips") / "c12.avi", 12)


@pytest.fixture()
def job_dir(tmp_path: Path, clip: Path) -> Path:
    d = tmp_path / "clips"
    d.mkdir()
    (d / "c12.avi").write_bytes(clip.read_bytes())
    (d / "notes.txt").write_text("not a clip")
    return d


class Jobs:
    """An api over the test's data dir whose analyze jobs start a :class:`Spawner`'s fake pipelines."""

    def __init__(self, api: Api, job_dir: Path) -> None:
        self.api, self.job_dir, self.spawner = api, job_dir, Spawner()
        self.counters = StageCounters("api", 0)
        self.clients: list[TestClient] = []

    def client(self, start: bool = True, **api: object) -> TestClient:
        c = self.api.client(counters=self.counters, job_dirs=[str(self.job_dir)], **api)
        runner = c.app.state.ctx.jobs
        runner.poll_s = 0.02
        runner.handlers["analyze"].spawner, runner.handlers["analyze"].poll_s = self.spawner, 0.02
        if start:
            runner.start()
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.app.state.ctx.jobs.stop()


@pytest.fixture()
def jobs(data_dir: Path, models: Path, videos: Path, analyzer, job_dir: Path) -> Iterator[Jobs]:  # noqa: F811
    j = Jobs(Api(data_dir, models, videos, analyzer), job_dir)
    yield j
    j.close()


def _finish_when_started(spawner: Spawner, code: int = 0) -> threading.Thread:
    def run() -> None:
        assert spawner.started.wait(20)
        spawner.children[-1].finish(code, frames=12)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_an_uploaded_clip_is_analysed_and_its_progress_streamed(jobs: Jobs, clip: Path) -> None:
    c = jobs.client(start=False)
    r = c.post("/api/uploads", files={"file": ("door cam.avi", clip.read_bytes(), "video/x-msvideo")})
    assert r.status_code == 201, r.text
    up = r.json()
    assert (up["name"], up["size"], up["frames"], up["width"], up["height"]) == ("door cam.avi", clip.stat().st_size, 12, 480, 360)
    stored = next((jobs.api.data_dir / "uploads").glob(f"{up['upload']}.*avi"))
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600 and stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    r = c.post("/api/jobs", json={"type": "analyze", "upload": up["upload"]})
    assert r.status_code == 202 and r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    job = r.json()
    assert (job["state"], job["source"], job["frames_total"], job["events"]) == (
        "queued", "upload:door cam.avi", 12, f"/api/events?job={job['id']}")
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = s.iter_lines()
        first = _events(iter([next(lines), next(lines)]))
        c.app.state.ctx.jobs.start()
        _finish_when_started(jobs.spawner)
        events = first + _events(lines)
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "complete" and set(names[1:-1]) <= {"progress"}, names
    assert events[-1][1]["state"] == "done" and events[-1][1]["progress"] == 1.0 and events[-1][1]["frames_done"] == 12
    assert not stored.exists()  # an upload is used by one job


def test_jobs_survive_a_reload_and_a_new_api_process(jobs: Jobs) -> None:
    c = jobs.client()
    first = c.post("/api/jobs", json={"type": "analyze", "source": str(jobs.job_dir / "c12.avi")}).json()
    _finish_when_started(jobs.spawner).join(20)
    with c.stream("GET", f"/api/jobs/{first['id']}/events") as s:
        assert _events(s.iter_lines())[-1][0] == "complete"
    done = c.get(f"/api/jobs/{first['id']}")
    c.app.state.ctx.jobs.stop()
    again = jobs.client(start=False)  # a restarted api process: a new app over the same database
    assert again.get(f"/api/jobs/{first['id']}").json() == done.json()
    assert [j["id"] for j in again.get("/api/jobs").json()["jobs"]] == [first["id"]]


@pytest.mark.parametrize("body, status, match", [
    ({"type": "transcode"}, 422, "type"),
    ({"type": "analyze"}, 400, "exactly one of source"),
    ({"type": "analyze", "source": "/etc/passwd"}, 403, "outside api.job_dirs"),
    ({"type": "analyze", "source": "JOB/../c12.avi"}, 403, "'..' is not allowed"),
    ({"type": "analyze", "source": "JOB/none.avi"}, 404, "no such file"),
    ({"type": "analyze", "upload": "00000000-0000-4000-8000-000000000000"}, 404, "no upload"),
    ({"type": "analyze", "source": "JOB/c12.avi", "upload": "00000000-0000-4000-8000-000000000000"}, 400, "exactly one"),
    ({"type": "enroll", "name": "bob", "images": []}, 422, "images"),
    ({"type": "enroll", "name": "bob", "images": ["/etc/hostname"]}, 403, "outside api.job_dirs"),
    ({"type": "backup", "extra": 1}, 422, "extra"),
])
def test_bad_job_requests_are_refused(jobs: Jobs, body: dict, status: int, match: str) -> None:
    c = jobs.client(start=False)
    body = {k: v.replace("JOB", str(jobs.job_dir)) if isinstance(v, str) else v for k, v in body.items()}
    r = c.post("/api/jobs", json=body)
    assert (r.status_code, list(r.json())) == (status, ["error"]), r.text
    assert match in r.json()["error"]
    assert c.get("/api/jobs").json() == {"jobs": []}


def test_uploads_must_be_decodable_videos_within_the_size_limit(jobs: Jobs, faces: Path) -> None:
    c = jobs.client(start=False, max_upload_mb=0.05)
    image = next(faces.rglob("*.jpg")).read_bytes()[:40_000]
    cases = [(b"", 400, "empty file"), (b"\x00" * 1000, 415, "not a video"), (image, 415, "an image, not a video"),
             (b"\x00" * 60_000, 413, "api.max_upload_mb")]
    for data, status, match in cases:
        r = c.post("/api/uploads", files={"file": ("x.avi", data, "video/x-msvideo")})
        assert r.status_code == status and match in r.json()["error"], r.text
    folder = jobs.api.data_dir / "uploads"
    assert (list(folder.iterdir()) if folder.exists() else []) == []  # nothing refused is kept


def test_cancel_and_get_answer_with_their_codes(jobs: Jobs) -> None:
    c = jobs.client(start=False)
    job = c.post("/api/jobs", json={"type": "backup"}).json()
    r = c.post(f"/api/jobs/{job['id']}/cancel")
    assert (r.status_code, r.json()["state"], r.json()["error"]) == (200, "cancelled", "cancelled by request")
    r = c.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and "cancelled job cannot become cancelled" in r.json()["error"]
    unknown = str(uuid.uuid4())
    for method, path in (("GET", f"/api/jobs/{unknown}"), ("POST", f"/api/jobs/{unknown}/cancel"),
                         ("GET", f"/api/jobs/{unknown}/events")):
        r = c.request(method, path)
        assert r.status_code == 404 and r.json() == {"error": f"no job {unknown}"}
    assert c.get("/api/jobs/not-a-uuid").status_code == 422
    assert [j["state"] for j in c.get("/api/jobs?state=cancelled").json()["jobs"]] == ["cancelled"]


def test_backup_and_enroll_jobs_reuse_the_routes_code(jobs: Jobs, faces: Path) -> None:
    (jobs.job_dir / "obama.jpg").write_bytes((faces / "obama" / "obama.jpg").read_bytes())
    import cv2
    import numpy as np

    cv2.imwrite(str(jobs.job_dir / "wall.jpg"), np.full((200, 200, 3), 120, np.uint8))  # no face
    c = jobs.client()
    backup = c.post("/api/jobs", json={"type": "backup"}).json()
    good = c.post("/api/jobs", json={"type": "enroll", "name": "Barack Obama", "images": [str(jobs.job_dir / "obama.jpg")]}).json()
    bad = c.post("/api/jobs", json={"type": "enroll", "name": "wall", "images": [str(jobs.job_dir / "wall.jpg")]}).json()
    states = {}
    for job in (backup, good, bad):
        with c.stream("GET", f"/api/jobs/{job['id']}/events") as s:
            states[job["id"]] = _events(s.iter_lines())[-1]
    assert states[backup["id"]][0] == "complete"
    assert states[backup["id"]][1]["result"]["name"] in [b["name"] for b in c.get("/api/backups").json()["backups"]]
    assert states[good["id"]][1]["result"] == {"name": "Barack Obama", "added": 1, "model": "mobilefacenet_128d"}
    assert states[bad["id"]][0] == "error" and "face" in states[bad["id"]][1]["error"]
    assert c.get("/api/identities").json()["identities"] == [{"name": "Barack Obama", "embeddings": 1, "has_face": True, "face_url": "/api/identities/Barack%20Obama/face.jpg"}]
    counts = jobs.counters.extra
    assert counts["jobs_queued"] == 0 and "jobs_running" in counts and "job_frames" in counts


def test_events_of_a_job_are_filtered_by_its_id(jobs: Jobs) -> None:
    c = jobs.client(start=False)
    job = c.post("/api/jobs", json={"type": "analyze", "source": str(jobs.job_dir / "c12.avi")}).json()
    engine = open_engine(jobs.api.url)
    mine, live = uuid.uuid4().hex, uuid.uuid4().hex
    for event_id, job_id in ((mine, job["id"]), (live, None)):
        w = EventWriter(engine, job_id=job_id)
        w.add_update(update(event_id, camera="job-x" if job_id else "campus", ended=True))
        w.flush()
    engine.dispose()
    got = c.get(job["events"]).json()["events"]
    assert [(e["event_id"], e["job_id"]) for e in got] == [(mine, job["id"])]
    assert {e["event_id"]: e["job_id"] for e in c.get("/api/events").json()["events"]} == {mine: job["id"], live: None}
    assert c.get("/api/events?job=nope").status_code == 422


def _job_event(jobs: Jobs, job_id: str, snapshot: Path | None = None) -> str:
    """An event stored by job ``job_id``'s pipeline (its snapshot in the job's folder)."""
    event_id = uuid.uuid4().hex
    engine = open_engine(jobs.api.url)
    w = EventWriter(engine, job_id=job_id)
    w.add_update(update(event_id, camera=f"job-{job_id[:8]}", ended=True,
                        snapshot_path=str(snapshot) if snapshot else None))
    w.flush()
    engine.dispose()
    return event_id


def _analysed(jobs: Jobs, c: TestClient, clip: Path) -> dict:
    """An uploaded clip's analyze job, run to done; with one event whose snapshot is in the job's folder."""
    up = c.post("/api/uploads", files={"file": ("clip.avi", clip.read_bytes(), "video/x-msvideo")}).json()
    job = c.post("/api/jobs", json={"type": "analyze", "upload": up["upload"]}).json()
    _finish_when_started(jobs.spawner).join(20)
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as s:
        assert _events(s.iter_lines())[-1][0] == "complete"
    jobs.spawner.started.clear()
    shots = jobs.api.data_dir / "jobs" / job["id"] / "snapshots"
    shots.mkdir()
    (shots / "a.jpg").write_bytes(b"\xff\xd8\xff shot")
    job["event"] = _job_event(jobs, job["id"], shots / "a.jpg")
    return job


def test_a_finished_job_is_deleted_with_its_files_and_its_events_stay_unless_asked(jobs: Jobs, clip: Path) -> None:
    c = jobs.client()
    data = jobs.api.data_dir
    kept, gone = _analysed(jobs, c, clip), _analysed(jobs, c, clip)
    folder = data / "jobs" / kept["id"]
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "last_run.json", "snapshots", "trt-cache"}
    (data / "trt-cache" / "engine.bin").write_bytes(b"built")  # the live data dir's, linked from the job's folder

    r = c.delete(f"/api/jobs/{kept['id']}")
    assert r.status_code == 200 and r.json()["deleted"] == kept["id"]
    assert (r.json()["events_deleted"], r.json()["events_kept"]) == (0, 1) and r.json()["files"] >= 3
    assert c.get(f"/api/jobs/{kept['id']}").status_code == 404
    assert [p.name for p in folder.iterdir()] == ["snapshots"]  # what its kept event shows
    assert c.get(f"/api/events/{kept['event']}/snapshot.jpg").content == b"\xff\xd8\xff shot"
    assert (data / "trt-cache" / "engine.bin").read_bytes() == b"built"  # a link is removed, never followed

    r = c.delete(f"/api/jobs/{gone['id']}?events=true")
    assert (r.status_code, r.json()["events_deleted"], r.json()["events_kept"]) == (200, 1, 0)
    assert not (data / "jobs" / gone["id"]).exists() and c.get(f"/api/events/{gone['event']}").status_code == 404
    assert [e["event_id"] for e in c.get("/api/events").json()["events"]] == [kept["event"]]
    assert c.delete(f"/api/jobs/{gone['id']}").json() == {"error": f"no job {gone['id']}"}


def test_an_unfinished_job_must_be_cancelled_before_it_is_deleted(jobs: Jobs, clip: Path) -> None:
    c = jobs.client(start=False)  # the runner does not run: the job stays queued
    up = c.post("/api/uploads", files={"file": ("clip.avi", clip.read_bytes(), "video/x-msvideo")}).json()
    job = c.post("/api/jobs", json={"type": "analyze", "upload": up["upload"]}).json()
    r = c.delete(f"/api/jobs/{job['id']}")
    assert r.status_code == 409 and r.json()["error"] == (
        f"job {job['id']}: a queued job cannot be deleted; cancel it first (POST /api/jobs/{job['id']}/cancel), "
        "then delete it")
    assert c.get(f"/api/jobs/{job['id']}").json()["state"] == "queued"
    assert list((jobs.api.data_dir / "uploads").glob(f"{up['upload']}*"))  # nothing removed
    assert c.post(f"/api/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    assert c.delete(f"/api/jobs/{job['id']}").status_code == 200
    assert not list((jobs.api.data_dir / "uploads").glob(f"{up['upload']}*"))  # a cancelled job's upload goes too
    assert c.delete("/api/jobs/not-a-uuid").status_code == 422
