"""HTTP API routes of background jobs (:mod:`pipeline.jobs`): submit, list, get, cancel, delete, follow; clip uploads.

``POST /api/jobs`` answers at once (202, the job ``queued``); the job runner of the api process runs the
queue one job at a time. Job states live in the database, so ``GET /api/jobs/{id}`` after a page reload
or a restart of the api process shows them as they are. ``GET /api/jobs/{id}/events`` pushes the job's
changes as Server-Sent Events (``queued``, ``progress``, ``complete``, ``error``; each ``data`` is the job
document) and ends when the job does.

Files: an analyze job reads a clip uploaded with ``POST /api/uploads`` (``upload``) or a file under one
of ``api.job_dirs`` (``source``); an enroll job reads image files under ``api.job_dirs`` (``images``). The
job_dirs rule (:func:`pipeline.jobs.check_job_path`) refuses ``..``, links and anything outside (403).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Iterator, Literal, Union

from fastapi import APIRouter, Depends, File, Path, Query, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.api import ApiContext, ApiError, context
from pipeline.api_system import errors
from pipeline.job_analyze import find_upload, save_upload
from pipeline.jobs import TERMINAL, JobConflict, JobRecord, JobRequestError, check_job_path

JOB_ID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
#: How often ``GET /api/jobs/{id}/events`` looks at the job, seconds; and sends a keep-alive comment.
STREAM_POLL_S = 0.25
KEEPALIVE_S = 5.0
#: Most images of one enroll job.
MAX_IMAGES = 100

jobs = APIRouter(tags=["jobs"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnalyzeRequest(_Body):
    """Analyze a clip: exactly one of ``source`` (a file under api.job_dirs) and ``upload`` (POST /api/uploads)."""

    type: Literal["analyze"]
    source: str | None = Field(None, min_length=1, max_length=1024, description="absolute path under api.job_dirs")
    upload: str | None = Field(None, pattern=JOB_ID, description="the id of POST /api/uploads")


class BackupRequest(_Body):
    """A backup archive, as ``POST /api/backups``."""

    type: Literal["backup"]


class EnrollRequest(_Body):
    """Enroll image files under api.job_dirs for ``name`` (every image must show one face, else nothing is stored)."""

    type: Literal["enroll"]
    name: str = Field(min_length=1, max_length=128)
    images: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(min_length=1, max_length=MAX_IMAGES)


JobRequest = Annotated[Union[AnalyzeRequest, BackupRequest, EnrollRequest], Field(discriminator="type")]


class JobDoc(_Body):
    """One job. Times are ISO-8601 UTC (null: not yet)."""

    id: str = Field(description="UUID")
    type: Literal["analyze", "backup", "enroll"]
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1, description="0..1 (analyze: frames_done / frames_total)")
    frames_done: int = Field(description="frames analysed so far (enroll: images)")
    frames_total: int | None = Field(description="frames of the clip (enroll: images); null while unknown")
    source: str | None = Field(description="what it reads: a path under api.job_dirs, upload:<file name>, or null")
    result: dict[str, Any] | None = Field(description="analyze: {events, frames, exit_code, run_id, wall_s, camera}; "
                                                      "backup: the archive's entry; enroll: {name, added, model}")
    error: str | None = Field(description="why it failed or was cancelled, one line")
    events: str | None = Field(description="analyze: the URL of its events (GET /api/events?job=<id>)")
    created_at: str
    started_at: str | None
    ended_at: str | None
    updated_at: str


class JobsDoc(_Body):
    """``GET /api/jobs``."""

    jobs: list[JobDoc] = Field(description="newest first")


class JobDeletedDoc(_Body):
    """``DELETE /api/jobs/{id}``: what went with the job."""

    deleted: str = Field(description="the job's id")
    events_deleted: int = Field(description="its events deleted (with ?events=true)")
    events_kept: int = Field(description="its events kept (their snapshots stay in the job's folder)")
    files: int = Field(description="files and folders removed: its upload, its pipeline's files")


class UploadDoc(_Body):
    """``POST /api/uploads``: the stored clip; sizes in bytes and pixels."""

    upload: str = Field(description="pass as upload in POST /api/jobs {type: analyze}")
    name: str = Field(description="the client's file name")
    size: int
    frames: int | None = Field(description="frames of the clip (null: the container does not say)")
    width: int
    height: int


def job_doc(job: JobRecord) -> dict[str, Any]:
    """The :class:`JobDoc` of a stored job."""
    iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
    return {"id": job.id, "type": job.type, "state": job.state, "progress": round(job.progress, 4),
            "frames_done": job.frames_done, "frames_total": job.frames_total, "source": job.source,
            "result": job.result, "error": job.error,
            "events": f"/api/events?job={job.id}" if job.type == "analyze" else None,
            "created_at": iso(job.created_at), "started_at": iso(job.started_at), "ended_at": iso(job.ended_at),
            "updated_at": iso(job.updated_at)}


def _runner(ctx: ApiContext) -> Any:
    if ctx.jobs is None:
        raise ApiError(503, "jobs are not available in this process")
    return ctx.jobs


def _checked(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except JobRequestError as err:
        raise ApiError(err.status, str(err)) from None


def _submission(ctx: ApiContext, body: Any) -> tuple[dict[str, Any], str | None, int | None]:
    """``(params, source shown, frames total)`` of a request, its files checked."""
    dirs = ctx.cfg.api.job_dirs
    if isinstance(body, AnalyzeRequest):
        if (body.source is None) == (body.upload is None):
            raise ApiError(400, "an analyze job needs exactly one of source (a file under api.job_dirs) and upload "
                                "(the id of POST /api/uploads)")
        if body.upload is not None:
            path, note = _checked(find_upload, ctx.link.data_dir, body.upload)
            return {"path": str(path), "upload": body.upload}, f"upload:{note['name']}", note.get("frames")
        path = _checked(check_job_path, body.source, dirs)
        return {"path": str(path)}, str(path), None
    if isinstance(body, EnrollRequest):
        paths = [str(_checked(check_job_path, p, dirs)) for p in body.images]
        return {"name": body.name, "images": paths}, f"{len(paths)} image(s) for {body.name}", len(paths)
    return {}, None, None


@jobs.post("/api/jobs", status_code=202, response_model=JobDoc, responses=errors(400, 403, 404, 503))
def submit(body: JobRequest, ctx: ApiContext = Depends(context)) -> JSONResponse:
    """Queue a job and answer at once (202, ``queued``, ``Location`` of the job): ``{"type": "analyze", "source":
    PATH}`` or ``{"type": "analyze", "upload": ID}``, ``{"type": "backup"}``, ``{"type": "enroll", "name": NAME,
    "images": [PATH, ...]}``. Files must lie under ``api.job_dirs`` (403 for ``..``, links or outside; 404 when
    missing); whether a clip decodes is found when the job runs (it then fails with that error)."""
    runner = _runner(ctx)
    params, source, total = _submission(ctx, body)
    job = _checked(runner.submit, body.type, params, source, total)
    return JSONResponse(job_doc(job), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})


@jobs.get("/api/jobs", response_model=JobsDoc, responses=errors(503))
def list_jobs(state: Literal["queued", "running", "done", "failed", "cancelled"] | None = None,
              limit: int = Query(100, ge=1, le=1000), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """Jobs newest first, optionally of one state."""
    return {"jobs": [job_doc(j) for j in _runner(ctx).list(state, limit)]}


def _job(ctx: ApiContext, job_id: str) -> JobRecord:
    job = _runner(ctx).get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    return job


@jobs.get("/api/jobs/{job_id}", response_model=JobDoc, responses=errors(404, 503))
def get_job(job_id: str = Path(pattern=JOB_ID), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """One job: state, progress, frames done of total, result or error."""
    return job_doc(_job(ctx, job_id))


@jobs.post("/api/jobs/{job_id}/cancel", response_model=JobDoc, responses=errors(404, 409, 503))
def cancel_job(job_id: str = Path(pattern=JOB_ID), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """Cancel a job: a queued one at once; a running analyze job is stopped (what it stored stays) and answered
    once ``cancelled`` (within 2 s). 409 for a finished job or a running backup/enroll job (seconds long)."""
    runner = _runner(ctx)
    try:
        return job_doc(runner.cancel(job_id))
    except KeyError:
        raise ApiError(404, f"no job {job_id}") from None
    except JobConflict as err:
        raise ApiError(409, f"job {job_id}: {err}") from None


@jobs.delete("/api/jobs/{job_id}", response_model=JobDeletedDoc, responses=errors(404, 409, 503))
def delete_job(job_id: str = Path(pattern=JOB_ID),
               events: bool = Query(False, description="also delete the events its analysis stored"),
               ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """Delete a finished job (done, failed, cancelled): its record, its uploaded clip and its pipeline's files;
    its events stay (with their snapshots) unless ``?events=true``. 409 for a queued or running job: cancel it
    first. Finished jobs older than ``api.job_retention_days`` are deleted the same way by the api itself."""
    runner = _runner(ctx)
    try:
        return runner.delete(job_id, events).to_json()
    except KeyError:
        raise ApiError(404, f"no job {job_id}") from None
    except JobConflict as err:
        raise ApiError(409, f"job {job_id}: {err}") from None


def _event_name(state: str) -> str:
    return {"queued": "queued", "running": "progress", "done": "complete"}.get(state, "error")


def job_stream(ctx: ApiContext, job_id: str) -> Iterator[str]:
    """Server-Sent Events of one job (module docstring): an event whenever its state or progress changes, a
    ``: keepalive`` comment every :data:`KEEPALIVE_S` seconds; ends after the job's final event."""
    last: tuple[Any, ...] | None = None
    quiet_since = time.monotonic()
    while True:
        job = _runner(ctx).get(job_id)
        if job is None:
            return
        key = (job.state, job.frames_done, job.progress, job.frames_total)
        if key != last:
            last, quiet_since = key, time.monotonic()
            yield f"event: {_event_name(job.state)}\ndata: {json.dumps(job_doc(job))}\n\n"
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"
        if job.state in TERMINAL:
            return
        time.sleep(STREAM_POLL_S)


@jobs.get("/api/jobs/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "Server-Sent Events: queued, progress, complete, error (data: the job document)"},
    **errors(404, 503)})
def follow_job(job_id: str = Path(pattern=JOB_ID), ctx: ApiContext = Depends(context)) -> StreamingResponse:
    """The job's progress pushed as Server-Sent Events until it ends (``EventSource`` in a browser)."""
    _job(ctx, job_id)
    return StreamingResponse(job_stream(ctx, job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@jobs.post("/api/uploads", status_code=201, response_model=UploadDoc, responses=errors(400, 413, 415, 503))
def upload_clip(file: UploadFile = File(description="a video clip"), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """Upload a clip for an analyze job (at most ``api.max_upload_mb``; it must decode as a video: 415 otherwise).
    Kept owner-only under the data dir until its job ends (a day when no job uses it)."""
    _runner(ctx)
    note = _checked(save_upload, ctx.link.data_dir, (file.filename or "clip")[:128], file.file)
    return {k: note[k] for k in UploadDoc.model_fields}


ROUTERS = (jobs,)
