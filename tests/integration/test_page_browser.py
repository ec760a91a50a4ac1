"""The page in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright's Python API with
``executable_path``; Playwright's own browser download is not used) on a running ``facepro run`` with the api
over a short vtest clip.

Checked: the stage table changes between two polls, the charts draw, the camera's MJPEG image loads (and the
stream carries drawn track boxes), events are listed newest first with snapshots, identities and backups
render; when the server has jobs (``/api/jobs``), a clip uploaded as a job reaches 100 % and is still done
after a reload (else that part is skipped, saying so). Screenshots go to the test's tmp dir and, when
``FACEPRO_ARTIFACTS`` is set, are copied there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest
from fastapi import APIRouter, Body, File, UploadFile

from pipeline.api import ApiError
from tests.integration.conftest import finish_run, pipeline_config, save_config, start_run, wait_status, write_clip

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

FRAMES = 300  # at 5 frames/s: a minute of running pipeline for the browser to look at
WAIT_MS = 60_000  # longest wait for something to appear on the page (the machine may be loaded)


def chromium() -> str:
    """The system Chromium (``FACEPRO_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH)."""
    path = os.environ.get("FACEPRO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium binary (apt-get install -y chromium, or set FACEPRO_CHROMIUM)")
    return path


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _api_ready(doc: dict) -> bool:
    api = next((s for s in doc["stages"] if s["stage"] == "api"), None)
    return bool(api and api["counts"].get("ready") and all(s["processes"] >= 1 for s in doc["stages"]))


class Shots:
    """Screenshots of the test, kept under its tmp dir and copied to ``$FACEPRO_ARTIFACTS`` when set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken: list[Path] = []

    def take(self, page: object, name: str) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        self.taken.append(path)
        out = os.environ.get("FACEPRO_ARTIFACTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(out) / f"page-{name}.png")
        return path


@pytest.fixture(scope="module")
def pipeline(videos: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A running ``facepro run`` (api enabled, any free port) on a 300-frame vtest clip at 5 frames/s: its
    base URL and the clip."""
    import tempfile

    clip = write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clip") / "vtest300.avi", FRAMES)
    data = Path(tempfile.mkdtemp(prefix="fpb-", dir="/tmp"))  # short: ipc:// socket paths
    old = os.environ.get("FACEPRO_DATA_DIR")
    os.environ["FACEPRO_DATA_DIR"] = str(data)
    tree = pipeline_config(models, {"campus": clip}, api__enabled=True, api__port=0)
    tree["cameras"][0]["max_fps"] = 5
    proc = start_run(save_config(tree, data / "cfg.yaml"))
    try:
        doc = wait_status(proc, timeout_s=180, until=_api_ready)
        port = next(s for s in doc["stages"] if s["stage"] == "api")["counts"]["port"]
        yield f"http://127.0.0.1:{port}", clip
        finish_run(proc, data, timeout_s=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if old is None:
            os.environ.pop("FACEPRO_DATA_DIR", None)
        else:
            os.environ["FACEPRO_DATA_DIR"] = old
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture()
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))  # uncaught exceptions of the page's scripts
    yield page
    context.close()
    assert errors == [], f"script errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Shots:
    return Shots(tmp_path_factory.mktemp("screenshots"))


def _polls(page: object) -> int:
    return int(page.get_attribute("#status-table", "data-polls") or 0)  # type: ignore[attr-defined]


def test_status_table_charts_stream_and_events(pipeline: tuple[str, Path], page: object, shots: Shots,
                                               faces: Path) -> None:
    base, _ = pipeline
    page.goto(base + "/")  # type: ignore[attr-defined]
    page.wait_for_function("Number(document.querySelector('#status-table').dataset.polls) >= 1")  # type: ignore[attr-defined]
    first, polls = page.inner_text("#status-table"), _polls(page)  # type: ignore[attr-defined]
    page.wait_for_function("([n, text]) => Number(document.querySelector('#status-table').dataset.polls) > n && "  # type: ignore[attr-defined]
                           "document.querySelector('#status-table').innerText !== text", arg=[polls, first])
    stages = page.eval_on_selector_all("#status-table tbody tr", "rows => rows.map(r => r.dataset.stage)")  # type: ignore[attr-defined]
    assert stages == ["capture", "detection", "recognition", "storage", "api"]
    assert page.locator("#charts svg polyline").count() >= 5  # type: ignore[attr-defined]  (a line per chart at least)
    assert page.inner_text("#gpu").strip()  # type: ignore[attr-defined]  (a GPU, or "no GPU" with the reason)
    shots.take(page, "system")

    page.click("#tabs button[data-tab=cameras]")  # type: ignore[attr-defined]
    page.wait_for_function("(() => { const i = document.querySelector('#camera-grid img'); "  # type: ignore[attr-defined]
                           "return i && i.complete && i.naturalWidth > 0; })()")
    assert page.eval_on_selector("#camera-grid img", "i => [i.naturalWidth, i.naturalHeight]") == [480, 360]  # type: ignore[attr-defined]
    _boxes_in_the_stream(base)  # the page's viewer shares these renderings: it shows boxes now too
    shots.take(page, "cameras")

    page.click("#tabs button[data-tab=events]")  # type: ignore[attr-defined]
    page.wait_for_selector("#events-table tbody tr[data-event] img.thumb")  # type: ignore[attr-defined]
    page.wait_for_function("[...document.querySelectorAll('#events-table img.thumb')].some(i => i.complete && i.naturalWidth > 0)")  # type: ignore[attr-defined]
    shown = page.eval_on_selector_all("#events-table tbody tr[data-event]", "rows => rows.map(r => r.dataset.event)")  # type: ignore[attr-defined]
    status, body = _get(f"{base}/api/events?limit={len(shown)}")
    assert status == 200 and shown == [e["event_id"] for e in json.loads(body)["events"]]  # newest first, as the API
    assert "format=csv" in page.get_attribute("#events-csv", "href")  # type: ignore[attr-defined]
    shots.take(page, "events")

    import httpx

    image = faces / "obama" / "obama.jpg"
    r = httpx.post(f"{base}/api/identities/Barack Obama/faces", files={"files": (image.name, image.read_bytes(), "image/jpeg")},
                   timeout=120)
    assert r.status_code == 201, r.text
    page.click("#tabs button[data-tab=identities]")  # type: ignore[attr-defined]
    page.wait_for_selector("#identities-table tbody tr[data-identity='Barack Obama'] img.face")  # type: ignore[attr-defined]
    page.wait_for_function("(() => { const i = document.querySelector('#identities-table img.face'); "  # type: ignore[attr-defined]
                           "return i && i.complete && i.naturalWidth > 0; })()")
    assert page.eval_on_selector("#identities-table img.face", "i => [i.naturalWidth, i.naturalHeight]") == [112, 112]  # type: ignore[attr-defined]
    shots.take(page, "identities")
    page.click("#tabs button[data-tab=backups]")  # type: ignore[attr-defined]
    page.click("#backup-create")  # type: ignore[attr-defined]
    page.wait_for_selector("#backups-table tbody tr[data-backup]")  # type: ignore[attr-defined]
    shots.take(page, "backups")


def _boxes_in_the_stream(base: str, frames: int = 60, boxed: int = 3) -> None:
    """Recognition's live tracks reach the api: the stream's parts have increasing frame indices, and ``boxed``
    of them (within ``frames``) have boxes drawn on the very frame they belong to (a browser shows an MJPEG part
    once the next one arrives: by then a viewer of the same camera shows boxes too)."""
    parts, seen = [], 0
    with urllib.request.urlopen(f"{base}/api/cameras/campus/stream.mjpeg?frames={frames}", timeout=60) as r:
        while len(parts) < frames:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"X-Frame-Index: "):
                index = int(line.split()[1])
                tracks, exact = int(r.readline().split()[1]), r.readline().split()[1] == b"1"
                parts.append((index, tracks, exact))
                seen += bool(tracks and exact)
                if seen == boxed:
                    break  # vtest always has people walking
    indices = [i for i, _, _ in parts]
    assert indices == sorted(set(indices)), indices
    assert seen == boxed, parts


def _job_reaches_100_and_survives_a_reload(page: object, clip: Path, shots: Shots, name: str) -> str:
    """Upload ``clip`` in the Jobs panel, wait for its row to be done at 100 %, reload, see it again; its id."""
    page.wait_for_selector("#jobs-body:not([hidden])")  # type: ignore[attr-defined]
    page.set_input_files("#job-form input[name=file]", str(clip))  # type: ignore[attr-defined]
    page.click("#job-form button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_function("document.querySelector('#job-result').textContent.startsWith('job ')")  # type: ignore[attr-defined]
    done = "#jobs-table tr[data-state=done] .pct"
    page.wait_for_selector(done, timeout=300_000)  # type: ignore[attr-defined]
    job = page.get_attribute("#jobs-table tr[data-state=done]", "data-job")  # type: ignore[attr-defined]
    assert page.inner_text(done) == "100 %"  # type: ignore[attr-defined]
    shots.take(page, f"{name}-done")
    page.reload()  # type: ignore[attr-defined]
    row = f"#jobs-table tr[data-job='{job}'][data-state=done] .pct"
    page.wait_for_selector(row)  # type: ignore[attr-defined]
    assert page.inner_text(row) == "100 %"  # type: ignore[attr-defined]
    shots.take(page, f"{name}-after-reload")
    return str(job)


def test_jobs_upload_progress_and_reload(pipeline: tuple[str, Path], page: object, shots: Shots) -> None:
    base, clip = pipeline
    page.goto(base + "/#jobs")  # type: ignore[attr-defined]
    status, _ = _get(f"{base}/api/jobs")
    if status == 404:
        page.wait_for_selector("#jobs-unavailable:not([hidden])")  # type: ignore[attr-defined]
        assert "Jobs not available" in page.inner_text("#jobs-unavailable")  # type: ignore[attr-defined]
        shots.take(page, "jobs-unavailable")
        pytest.skip("GET /api/jobs answered 404: this build has no analysis jobs (they land separately); "
                    "the page says 'Jobs not available'")
    job = _job_reaches_100_and_survives_a_reload(page, clip, shots, "jobs")
    page.on("dialog", lambda dialog: dialog.accept())  # type: ignore[attr-defined]  (the confirm of Delete)
    page.click(f"#jobs-table tr[data-job='{job}'] button[data-action=delete]")  # type: ignore[attr-defined]
    page.wait_for_selector(f"#jobs-table tr[data-job='{job}']", state="detached")  # type: ignore[attr-defined]
    assert _get(f"{base}/api/jobs/{job}")[0] == 404  # gone on the server, not only from the page


# ------------------------------------------------- the Jobs panel against the contract
def _contract_jobs() -> tuple[object, dict[str, dict]]:
    """A stand-in for the jobs API (:mod:`pipeline.api_jobs`: ``POST /api/uploads`` multipart ``file`` →
    ``{upload}``, then ``POST /api/jobs`` ``{"type": "analyze", "upload": id}`` → ``{id, state}``; ``GET /api/jobs``,
    ``GET /api/jobs/{id}`` with state and progress 0-1): each read of a job advances it by 10 of its 40 frames, so
    progress moves with the page's polls, not with time."""
    router, jobs, uploads = APIRouter(), {}, {}

    def advance(job: dict) -> dict:
        if job["state"] in ("queued", "running"):
            job["frames_done"] = min(job["frames_total"], job["frames_done"] + 10)
            job["progress"] = job["frames_done"] / job["frames_total"]
            job["state"] = "done" if job["frames_done"] == job["frames_total"] else "running"
            job["result"] = {"events": 3} if job["state"] == "done" else None
        return job

    @router.post("/api/uploads", status_code=201)
    def upload(file: UploadFile = File()) -> dict:
        key = uuid.uuid4().hex
        uploads[key] = (file.filename, len(file.file.read()))
        return {"upload": key, "name": file.filename, "size": uploads[key][1], "frames": 40}

    @router.post("/api/jobs", status_code=202)
    def create(body: dict = Body()) -> dict:
        job = {"id": str(uuid.uuid4()), "type": body["type"], "state": "queued", "progress": 0.0, "frames_done": 0,
               "frames_total": 40, "created_at": datetime.now(timezone.utc).isoformat(), "result": None, "error": None,
               "upload": uploads[body["upload"]]}
        jobs[job["id"]] = job
        return {"id": job["id"], "state": "queued"}

    @router.get("/api/jobs")
    def listing() -> dict:
        return {"jobs": [advance(j) for j in jobs.values()]}

    @router.get("/api/jobs/{job_id}")
    def one(job_id: str) -> dict:
        if job_id not in jobs:
            raise ApiError(404, f"no job {job_id}")
        return advance(jobs[job_id])

    return router, jobs


TOKEN = "page-test-token-0123456789"


@pytest.fixture(params=[None], ids=["no-token"])
def contract_server(request: pytest.FixtureRequest, models: Path, videos: Path, data_dir: Path) -> Iterator[tuple[str, dict]]:
    """``facepro serve``'s app (no pipeline) with the page and the stand-in jobs API, on uvicorn in a thread;
    ``api.token`` is the fixture's param."""
    import threading

    from pipeline import api_data, api_live, api_page, api_system
    from pipeline.api import bind, create_app, serve
    from pipeline.config import parse_config
    from pipeline.runner import StopFlag
    from pipeline.services import api_context

    router, jobs = _contract_jobs()
    cfg = parse_config(pipeline_config(models, {"campus": videos / "vtest.avi"}, api__token=request.param))
    app = create_app(api_context(cfg, alone=True, config_path=None, threads=1), routers=(
        *api_system.ROUTERS, *api_data.ROUTERS, *api_live.ROUTERS, *api_page.ROUTERS, router))
    sock, stop = bind("127.0.0.1", 0), StopFlag()
    port = sock.getsockname()[1]
    thread = threading.Thread(target=serve, args=(app, sock, stop), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", jobs
    finally:
        stop.set()
        thread.join(timeout=30)


def test_jobs_panel_follows_the_jobs_contract(contract_server: tuple[str, dict], page: object, shots: Shots,
                                              videos: Path, tmp_path: Path) -> None:
    base, jobs = contract_server
    clip = write_clip(videos / "vtest.avi", tmp_path / "job.avi", 20)
    page.goto(base + "/#jobs")  # type: ignore[attr-defined]
    job = _job_reaches_100_and_survives_a_reload(page, clip, shots, "jobs-contract")
    assert jobs[job]["type"] == "analyze" and jobs[job]["upload"] == ("job.avi", clip.stat().st_size)
    assert page.inner_text(f"#jobs-table tr[data-job='{job}'] td:nth-child(5)") == "40 / 40"  # type: ignore[attr-defined]


@pytest.mark.parametrize("contract_server", [TOKEN], ids=["token"], indirect=True)
def test_the_page_asks_for_the_token_once_and_sends_it(contract_server: tuple[str, dict], page: object) -> None:
    base, _ = contract_server
    page.goto(base + "/#jobs")  # type: ignore[attr-defined]
    page.wait_for_selector("#token-dialog[open]")  # type: ignore[attr-defined]  (the first API call answered 401)
    page.fill("#token-dialog input[name=token]", "wrong-token-0123456789")  # type: ignore[attr-defined]
    page.click("#token-dialog button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_function("document.querySelector('#token-error').textContent.includes('refused')")  # type: ignore[attr-defined]
    page.fill("#token-dialog input[name=token]", TOKEN)  # type: ignore[attr-defined]
    page.click("#token-dialog button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector("#jobs-body:not([hidden])")  # type: ignore[attr-defined]  (GET /api/jobs with the header)
    page.wait_for_function("document.querySelector('#run-info').textContent === 'no pipeline'")  # type: ignore[attr-defined]
    assert page.evaluate("sessionStorage.getItem('facepro.token')") == TOKEN  # type: ignore[attr-defined]
    page.reload()  # type: ignore[attr-defined]
    page.wait_for_selector("#jobs-body:not([hidden])")  # type: ignore[attr-defined]
    assert not page.is_visible("#token-dialog")  # type: ignore[attr-defined]  (asked once per tab)
