"""Analyze jobs with their real child pipeline (``python -m pipeline.jobrun``) on short vtest clips: a job reaches done
and its events carry its id; a bad source fails clearly and the next job runs; a cancel takes effect within 2 s and
keeps what was stored; killing the api process (``facepro serve``) mid-job loses no job state."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.config import parse_config
from pipeline.job_analyze import job_paths
from pipeline.ring import list_segments
from pipeline.runs import pid_alive
from pipeline.services import api_context
from storage.db import open_engine, upgrade
from storage.jobs import JobTable
from tests.integration.conftest import pipeline_config, save_config, write_clip
from tests.sse import sse_events as _events

ROOT = Path(__file__).resolve().parents[2]
#: The issue's bound on a cancel is 2 s (by design at most DRAIN_S + FORCE_S + a poll, ~1.7 s); the assertion allows
#: 1 s more because the 2-core test machine runs other developers' work at the same time.
CANCEL_LIMIT_S = 2.0 + 1.0


@pytest.fixture(scope="module")
def clips(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    write_clip(videos / "vtest.avi", folder / "c100.avi", 100)
    write_clip(videos / "vtest.avi", folder / "c150.avi", 150)
    (folder / "broken.avi").write_bytes(b"RIFF0000AVI not really a video" * 100)
    return folder


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job pipeline runs this checkout's code (the editable install may point elsewhere)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def _tree(models: Path, clips: Path) -> dict:
    tree = pipeline_config(models, {"campus": clips / "c100.avi"}, api__job_dirs=[str(clips)], api__port=0)
    tree["runtime"]["metrics_port"] = None
    return tree


@pytest.fixture()
def client(models: Path, clips: Path, short_data_dir: Path, env: None) -> Iterator[TestClient]:
    cfg = parse_config(_tree(models, clips))
    upgrade(f"sqlite:///{short_data_dir / 'facepro.db'}")
    ctx = api_context(cfg, alone=True, config_path=None, threads=1)
    ctx.jobs.start()
    try:
        yield TestClient(create_app(ctx))
    finally:
        ctx.jobs.stop()


def _follow(c: TestClient, job_id: str) -> list[tuple[str, dict]]:
    with c.stream("GET", f"/api/jobs/{job_id}/events") as s:
        return _events(s.iter_lines())


def _gone(data_dir: Path, job: dict) -> None:
    """The job's pipeline left no process and no shared memory behind."""
    summary = json.loads((job_paths(data_dir, job["id"]).summary).read_text())
    assert list_segments(summary["run_id"]) == []
    for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines():
        assert str(job_paths(data_dir, job["id"]).config) not in line, line


def test_a_bad_source_fails_clearly_then_a_clip_is_analysed_with_its_events(client: TestClient, clips: Path,
                                                                             short_data_dir: Path) -> None:
    bad = client.post("/api/jobs", json={"type": "analyze", "source": str(clips / "broken.avi")}).json()
    good = client.post("/api/jobs", json={"type": "analyze", "source": str(clips / "c100.avi")}).json()
    assert (bad["state"], good["state"]) == ("queued", "queued")
    assert _follow(client, bad["id"])[-1] == ("error", client.get(f"/api/jobs/{bad['id']}").json())
    assert client.get(f"/api/jobs/{bad['id']}").json()["error"] == \
        f"source {clips / 'broken.avi'}: not a video FacePro can decode (OpenCV read no frame)"
    events = _follow(client, good["id"])
    assert [n for n, _ in events][-1] == "complete" and {n for n, _ in events[:-1]} <= {"queued", "progress"}
    progress = [d["progress"] for _, d in events]
    assert progress == sorted(progress) and len(set(progress)) > 2  # pushed as it went, never backwards
    done = events[-1][1]
    assert (done["state"], done["progress"], done["frames_done"], done["frames_total"]) == ("done", 1.0, 100, 100)
    stored = client.get(f"{done['events']}&limit=1000").json()["events"]
    assert done["result"]["events"] == len(stored) > 0 and done["result"]["exit_code"] == 0
    camera = "job-" + good["id"].replace("-", "")[:8]
    assert {(e["job_id"], e["camera"]) for e in stored} == {(good["id"], camera)}
    shot = next(e for e in stored if e["has_snapshot"])
    r = client.get(f"/api/events/{shot['event_id']}/snapshot.jpg")
    assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff"
    _gone(short_data_dir, done)


def test_a_cancel_takes_effect_within_2_s_keeps_what_was_stored_and_the_next_job_runs(
        client: TestClient, clips: Path, short_data_dir: Path) -> None:
    job = client.post("/api/jobs", json={"type": "analyze", "source": str(clips / "c150.avi")}).json()
    after = client.post("/api/jobs", json={"type": "backup"}).json()
    stored: list = []
    while not stored:  # cancel once the job's pipeline has stored events
        state = client.get(f"/api/jobs/{job['id']}").json()
        assert state["state"] in ("queued", "running"), f"the job ended before it could be cancelled: {state}"
        stored = client.get(f"/api/events?job={job['id']}&limit=1000").json()["events"]
        time.sleep(0.1)
    started = time.monotonic()
    r = client.post(f"/api/jobs/{job['id']}/cancel")
    took = time.monotonic() - started
    cancelled = r.json()
    assert r.status_code == 200 and cancelled["state"] == "cancelled", cancelled
    assert took < CANCEL_LIMIT_S, f"cancel took {took:.2f} s"
    assert 0 < cancelled["frames_done"] < 150 and cancelled["error"] == "cancelled by request"
    kept = client.get(f"/api/events?job={job['id']}&limit=1000").json()["events"]
    assert {e["event_id"] for e in stored} <= {e["event_id"] for e in kept}  # nothing stored was taken back
    assert cancelled["result"]["events"] == len(kept)
    assert _follow(client, after["id"])[-1][0] == "complete"  # the runner went on
    assert len(client.get(f"/api/events?job={job['id']}&limit=1000").json()["events"]) == len(kept)  # and it stopped
    _gone(short_data_dir, cancelled)


def _serve(cfg: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--config", str(cfg), "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())
        if match and proc.poll() is None:
            return proc, f"http://127.0.0.1:{match.group(1)}"
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"facepro serve did not start: {log.read_text()[-3000:]}")


def _call(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_killing_the_api_process_mid_job_loses_no_job_state(models: Path, clips: Path, short_data_dir: Path,
                                                             env: None) -> None:
    cfg = save_config(_tree(models, clips), short_data_dir / "cfg.yaml")
    proc, base = _serve(cfg, short_data_dir / "serve1.log")
    try:
        job = _call(base, "/api/jobs", {"type": "analyze", "source": str(clips / "c150.avi")})
        queued = _call(base, "/api/jobs", {"type": "backup"})
        while (now := _call(base, f"/api/jobs/{job['id']}"))["frames_done"] == 0:
            assert now["state"] in ("queued", "running"), now
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the api process dies mid-job
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    engine = open_engine(f"sqlite:///{short_data_dir / 'facepro.db'}")
    row = JobTable(engine).get(job["id"])
    engine.dispose()
    assert row.state == "running" and pid_alive(row.pid)  # recorded, and its pipeline went on without the api
    proc, base = _serve(cfg, short_data_dir / "serve2.log")  # a new api process over the same data dir
    try:
        again = _call(base, f"/api/jobs/{job['id']}")
        assert {k: again[k] for k in ("id", "type", "source", "created_at", "started_at", "frames_total")} == \
            {k: now[k] for k in ("id", "type", "source", "created_at", "started_at", "frames_total")}
        while (again := _call(base, f"/api/jobs/{job['id']}"))["state"] == "running":
            assert again["frames_done"] >= now["frames_done"]  # continued, never reset
            time.sleep(0.2)
        assert (again["state"], again["progress"], again["frames_done"], again["error"]) == ("done", 1.0, 150, None), again
        stored = _call(base, f"/api/events?job={job['id']}&limit=1000")["events"]
        assert again["result"]["events"] == len(stored) > 0
        while _call(base, f"/api/jobs/{queued['id']}")["state"] != "done":  # the queued job stayed queued, then ran
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(20)
