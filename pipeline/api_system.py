"""HTTP API routes on the running pipeline: health, status, Prometheus metrics, scale, cameras and their latest frame.

Status and scale are the CLI's control-socket requests (:class:`pipeline.api.PipelineLink`); ``/metrics``
renders the supervisor's Prometheus collector (:class:`pipeline.metrics.StatusCollector`, the same metric
names and figures as the supervisor's exporter on ``runtime.metrics_port``) from a fresh status reply, so
it works with that port switched off; its ``facepro_alert`` states are evaluated by this process over its
own scrapes, with the same thresholds (``runtime.alerts``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import cv2
from fastapi import APIRouter, Depends, Path
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from pipeline.api import ApiContext, ApiError, context
from pipeline.api_models import (CameraDoc, CamerasDoc, ErrorBody, Health, HealthFailure, ScaleBody, ScaleDoc,
                                 StatusDoc)
from pipeline.config import CameraConfig
from pipeline.messages import StatusReply
from pipeline.metrics import StatusCollector
from pipeline.status import status_json

#: States of a stage that count as healthy (``done``: a file source that ended).
HEALTHY_STATES: frozenset[str] = frozenset({"running", "done"})
JPEG_QUALITY = 85


def errors(*codes: int, **models: Any) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: each code with the :class:`ErrorBody` model (or a model in ``models``,
    keyed ``e<code>``); 401 and 422 are added for every route (token, invalid fields)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 401, 422}):
        out[code] = {"model": models.get(f"e{code}", ErrorBody), "description": _DESCRIPTIONS.get(code, "error")}
    return out


_DESCRIPTIONS = {400: "bad parameters", 401: "missing or wrong bearer token", 404: "not found",
                 409: "refused in the current state", 413: "body larger than api.max_upload_mb",
                 415: "not a decodable image", 422: "invalid request fields",
                 503: "no pipeline running, the supervisor or the database does not answer, or no frame"}

system = APIRouter(tags=["system"])
cameras = APIRouter(tags=["cameras"])


@system.get("/api/health", response_model=Health, responses=errors(503, e503=HealthFailure))
def health(ctx: ApiContext = Depends(context)) -> Health:
    """200 when every stage of the pipeline runs (a file source that ended counts: ``done``); 503 naming the
    first stage that does not (``stage``). Under ``facepro serve``: 200 when the database opens."""
    if ctx.alone:
        ctx.backend.check_database()
        return Health(status="ok", mode="alone", stages={})
    reply = ctx.link.status()
    for st in reply.stages:
        if st.state not in HEALTHY_STATES:
            why = f": {st.last_error}" if st.last_error else ""
            raise ApiError(503, f"stage {st.stage} is {st.state}{why}", stage=st.stage)
    return Health(status="ok", mode="pipeline", stages={st.stage: st.state for st in reply.stages})


def status_body(reply: StatusReply) -> bytes:
    """The JSON body of ``GET /api/status`` for ``reply``: :func:`pipeline.status.status_json` as :class:`StatusDoc`."""
    return StatusDoc.model_validate(status_json(reply)).model_dump_json().encode()


@system.get("/api/status", response_model=StatusDoc, responses=errors(503))
async def status(ctx: ApiContext = Depends(context)) -> Response:
    """Exactly what ``facepro status --json`` prints (per stage: processes, rates, queues, drops, latency, CPU, memory)."""
    # polled by every open page: a reply younger than the link's max age is answered on the event loop, its
    # JSON rendered once; only a new reply goes to a thread (it waits on the supervisor's socket)
    reply = ctx.link.fresh_status() or await run_in_threadpool(ctx.link.status)
    return Response(ctx.link.status_body(reply, status_body), media_type="application/json")


@system.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **errors(503)})
def metrics(ctx: ApiContext = Depends(context)) -> Response:
    """The Prometheus metrics of the running pipeline (``facepro_stage_*``, ``facepro_alert``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    reply = ctx.link.status()
    collector = StatusCollector(ctx.alerts)  # type: ignore[arg-type]
    with ctx.lock:
        ctx.alerts.update(reply)  # type: ignore[union-attr]
        collector.reply = reply
        registry = CollectorRegistry()
        registry.register(collector)
        text = generate_latest(registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@system.post("/api/scale", response_model=ScaleDoc, responses=errors(400, 409, 503))
def scale(body: ScaleBody, ctx: ApiContext = Depends(context)) -> ScaleDoc:
    """Change a stage's process count, as ``facepro scale STAGE=N`` (the same request to the supervisor);
    409 with the supervisor's reason when it refuses (a fixed stage, busy)."""
    ack = ctx.link.scale(body.stage, body.processes)
    if not ack.ok:
        raise ApiError(409, ack.message)
    return ScaleDoc(ok=True, message=ack.message)


def source_kind(cam: CameraConfig) -> str:
    """``file``, ``rtsp``, ``http``, ``usb`` (a device index) or ``other``."""
    src = cam.source.strip().lower()
    if src.isdigit():
        return "usb"
    if src.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if src.startswith(("http://", "https://")):
        return "http"
    return "other" if "://" in src else "file"


def _camera_doc(ctx: ApiContext, cam: CameraConfig) -> CameraDoc:
    latest, size = ctx.link.latest(cam.name, copy=False)
    doc = CameraDoc(name=cam.name, source_kind=source_kind(cam), mode=cam.resolved_mode(), live=latest is not None)  # type: ignore[arg-type]
    if size is not None:
        doc.height, doc.width = size
    if latest is not None:
        doc.frame_index = latest.frame_index
        doc.captured_at = datetime.fromtimestamp(latest.captured_at_ns / 1e9, timezone.utc).isoformat()
        doc.age_s = round(max(0.0, time.time() - latest.captured_at_ns / 1e9), 3)
    return doc


def _camera(ctx: ApiContext, name: str) -> CameraConfig:
    for cam in ctx.cfg.cameras:
        if cam.name == name:
            return cam
    raise ApiError(404, f"no camera named {name!r}; configured: {', '.join(c.name for c in ctx.cfg.cameras)}")


@cameras.get("/api/cameras", response_model=CamerasDoc, responses=errors())
def list_cameras(ctx: ApiContext = Depends(context)) -> CamerasDoc:
    """The configured cameras with their ring's figures: frame size, newest frame index and its age."""
    return CamerasDoc(cameras=[_camera_doc(ctx, cam) for cam in ctx.cfg.cameras])


@cameras.get("/api/cameras/{name}/latest.jpg", response_class=Response, responses={
    200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}, "description": "JPEG"},
    **errors(404, 503)})
def latest_jpg(name: str = Path(min_length=1, max_length=32), ctx: ApiContext = Depends(context)) -> Response:
    """The newest published frame of camera ``name`` as a JPEG, at the camera's frame size (a frame overwritten
    while it was copied is skipped, never served torn). 503 when no pipeline runs or no frame is available."""
    cam = _camera(ctx, name)
    latest, _ = ctx.link.latest(cam.name)
    if latest is None or latest.frame is None:
        raise ApiError(503, f"camera {cam.name}: no frame available (no pipeline running, the camera is not "
                            "delivering, or every frame tried was overwritten while read); try again")
    ok, jpeg = cv2.imencode(".jpg", latest.frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ApiError(500, f"camera {cam.name}: JPEG encoding failed")
    return Response(jpeg.tobytes(), media_type="image/jpeg",
                    headers={"Cache-Control": "no-store", "X-Frame-Index": str(latest.frame_index)})


ROUTERS = (system, cameras)
