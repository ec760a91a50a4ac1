"""HTTP API routes on the database and the face models: events, identities, recognition, backups.

Every route calls the injected :class:`pipeline.api.Backend` (the CLI's code paths, wired in
:mod:`pipeline.services`): ``GET /api/events`` gives what ``facepro events --json`` prints for the same
filters, enrollment runs ``facepro enroll``'s checks, recognition is ``facepro identify``, backups are
``facepro backup``'s (restore refused while a pipeline runs).

Uploads (multipart) are checked here before any model sees them: JPEG, PNG, BMP or WebP by their first
bytes (415 otherwise), at most :data:`MAX_PIXELS` pixels by their header (413; a small file may declare a
huge image), then decoded (415 when that fails); the body size limit is the gate's (``api.max_upload_mb``).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import struct
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import cv2
import numpy as np
from fastapi import APIRouter, Depends, File, Path, Query, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BeforeValidator

from pipeline.api import ApiContext, ApiError, EventQuery, Upload, context
from pipeline.api_models import (BackupDoc, BackupsDoc, DeletedDoc, EnrolledDoc, EventDoc, EventPage, IdentitiesDoc,
                                 IdentityDoc, NameBody, NamedDoc, RecognizeDoc, RelabelBody, RelabelDoc, RestoredDoc,
                                 UnknownDoc, UnknownsDoc)
from pipeline.api_system import errors

#: Largest image accepted for enrollment or recognition, pixels (width x height, from the file's header).
MAX_PIXELS = 50_000_000
#: Largest page of ``GET /api/events``.
MAX_PAGE = 10_000
EVENT_ID = r"^[0-9a-f]{32}$"
JOB_ID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
BOX_ID = r"^[A-Za-z0-9_.-]{1,64}$"
BACKUP_NAME = r"^facepro-backup-[0-9A-Za-z-]{1,40}\.tar\.gz$"
UNKNOWN_NAME = r"^unknown-[1-9][0-9]{0,17}$"
#: CSV columns of ``GET /api/events?format=csv`` (the JSON keys, ``xyxy`` as four columns).
CSV_COLUMNS: tuple[str, ...] = tuple(k for k in EventDoc.model_fields if k != "xyxy") + ("x1", "y1", "x2", "y2")

events = APIRouter(tags=["events"])
identities = APIRouter(tags=["identities"])
backups = APIRouter(tags=["backups"])


# ------------------------------------------------------------------ events
def encode_cursor(event: dict[str, Any]) -> str:
    """The cursor after ``event`` (a dict of ``facepro events --json``): base64url of ``[started_at, event_id]``."""
    return base64.urlsafe_b64encode(json.dumps([event["started_at"], event["event_id"]]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`: ``(aware started_at, event_id)``.

    Raises:
        ApiError: 400, not a cursor of this API.
    """
    try:
        started, event_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(started)
        if when.tzinfo is None or not isinstance(event_id, str) or len(event_id) != 32:
            raise ValueError(cursor)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise ApiError(400, "cursor: not a cursor of this API (pass the 'next' value of the previous page)") from None
    return when, event_id


def _iso_time(value: Any) -> Any:
    """Query times are ISO-8601 text with a time of day (a number is not taken as a Unix time)."""
    if not isinstance(value, str) or not ISO_TIME.match(value):
        raise ValueError("expected an ISO-8601 date and time, e.g. 2024-05-01T08:00:00+00:00")
    return value


ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")
QueryTime = Annotated[datetime, BeforeValidator(_iso_time)]


def _utc(when: datetime | None) -> datetime | None:
    """A query time as aware UTC (a time without offset is taken as UTC)."""
    if when is None:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def events_csv(docs: list[dict[str, Any]]) -> str:
    """``docs`` (``facepro events --json`` dicts) as CSV with a header row of :data:`CSV_COLUMNS`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for d in docs:
        row = {**d, **dict(zip(("x1", "y1", "x2", "y2"), d["xyxy"]))}
        writer.writerow(["" if row[k] is None else row[k] for k in CSV_COLUMNS])
    return out.getvalue()


_EXPORT = {200: {"description": "json: an EventPage; ndjson: one event per line; csv: a header row, then one event "
                                "per row (the next cursor in the X-Next-Cursor header when there are more)",
                 "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                             "text/csv": {"schema": {"type": "string"}}}}}


@events.get("/api/events", response_model=EventPage, responses={**_EXPORT, **errors(400, 503)})
def list_events(camera: str | None = Query(None, max_length=64), identity: str | None = Query(None, max_length=128),
                label: str | None = Query(None, max_length=64), method: Literal["face", "reid", "gait"] | None = None,
                since: QueryTime | None = Query(None, description="started at or after (ISO-8601; no offset: UTC)"),
                until: QueryTime | None = Query(None, description="started before (ISO-8601; no offset: UTC)"),
                cursor: str | None = Query(None, max_length=256, description="'next' of the previous page"),
                limit: int = Query(100, ge=1, le=MAX_PAGE),
                format: Literal["json", "ndjson", "csv"] = "json",  # noqa: A002 - the query parameter's name
                job: str | None = Query(None, pattern=JOB_ID, description="only the events of this analysis job"),
                unknown: str | None = Query(None, pattern=UNKNOWN_NAME, description="only the events of this anonymous identity"),
                box: str | None = Query(None, pattern=BOX_ID, description="fleet hub: only the events of this box"),
                ctx: ApiContext = Depends(context)) -> Any:
    """Stored events, newest first, filtered; each as ``facepro events --json`` prints it (with the same filters,
    the same events in the same order)."""
    query = EventQuery(camera=camera, identity=identity, label=label, method=method, since=_utc(since), until=_utc(until),
                       before=decode_cursor(cursor) if cursor else None, job=job, unknown=unknown, box=box)
    docs = ctx.backend.list_events(query, limit + 1)
    nxt = encode_cursor(docs[limit - 1]) if len(docs) > limit else None
    docs = docs[:limit]
    if format == "json":
        return EventPage(events=[EventDoc(**d) for d in docs], next=nxt)
    headers = {"X-Next-Cursor": nxt} if nxt else {}
    if format == "ndjson":
        return Response("".join(json.dumps(d) + "\n" for d in docs), media_type="application/x-ndjson", headers=headers)
    return Response(events_csv(docs), media_type="text/csv", headers=headers)


def _event(ctx: ApiContext, event_id: str) -> dict[str, Any]:
    doc = ctx.backend.get_event(event_id)
    if doc is None:
        raise ApiError(404, f"no event {event_id}")
    return doc


@events.get("/api/events/{event_id}", response_model=EventDoc, responses=errors(404, 503))
def get_event(event_id: str = Path(pattern=EVENT_ID), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """One event (32-hex id)."""
    return _event(ctx, event_id)


@events.get("/api/events/{event_id}/snapshot.jpg", response_class=Response, responses={
    200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}, "description": "JPEG"},
    **errors(404, 503)})
def snapshot(event_id: str = Path(pattern=EVENT_ID), ctx: ApiContext = Depends(context)) -> Response:
    """The event's stored snapshot (JPEG); 404 when the event has none or retention removed it."""
    _event(ctx, event_id)
    path = ctx.backend.snapshot_file(event_id)
    try:
        data = path.read_bytes() if path is not None else None
    except OSError:
        data = None
    if data is None:
        raise ApiError(404, f"event {event_id} has no snapshot (none was taken, or retention removed it)")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@events.post("/api/events/{event_id}/relabel", response_model=RelabelDoc, responses=errors(400, 404, 503))
def relabel_event(body: RelabelBody, event_id: str = Path(pattern=EVENT_ID), ctx: ApiContext = Depends(context)) -> Any:
    """Correct one event (``facepro events relabel``): ``{"not": "Bob"}`` stores its face as a negative example of
    Bob (a face at least as similar to it as to Bob's template is no longer named Bob; the event becomes
    unknown if it was Bob's), ``{"as": "Carol"}`` adds its face to Carol and gives the event to Carol; both may
    be sent. 404: no such event or ``not`` identity; 400: neither field, or the event has no face embedding."""
    if body.not_ is None and body.as_ is None:
        raise ApiError(400, "relabel needs 'not' (a wrong name) and/or 'as' (the right one)")
    return ctx.backend.relabel_event(event_id, body.not_, body.as_)


# --------------------------------------------------------------- uploads
def image_kind(data: bytes) -> str | None:
    """``jpeg``, ``png``, ``bmp`` or ``webp`` from the first bytes, None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """``(width, height)`` declared by an image's header, pixels; None when the header cannot be parsed."""
    try:
        if kind == "png":
            return struct.unpack(">II", data[16:24])
        if kind == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if kind == "webp":
            return _webp_size(data)
        return _jpeg_size(data)
    except struct.error:
        return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def read_upload(f: UploadFile) -> Upload:
    """Check and decode one uploaded image (module docstring).

    Raises:
        ApiError: 400 empty, 415 not an image of a known kind or not decodable, 413 too many pixels.
    """
    return check_image((f.filename or "upload")[:128], f.file.read())


def check_image(name: str, data: bytes) -> Upload:
    """Check and decode the image bytes ``data`` (``name``: for messages), as :func:`read_upload` (also used for
    the image files of enroll jobs).

    Raises:
        ApiError: 400 empty, 415 not an image of a known kind or not decodable, 413 too many pixels.
    """
    if not data:
        raise ApiError(400, f"{name}: empty file")
    kind = image_kind(data)
    if kind is None:
        raise ApiError(415, f"{name}: not a JPEG, PNG, BMP or WebP image")
    size = image_size(data, kind)
    if size is None:
        raise ApiError(415, f"{name}: damaged {kind} header")
    if size[0] * size[1] > MAX_PIXELS:
        raise ApiError(413, f"{name}: {size[0]}x{size[1]} pixels, more than {MAX_PIXELS} allowed")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or 0 in image.shape:
        raise ApiError(415, f"{name}: cannot be decoded as a {kind} image")
    return Upload(name, data, image)


# ------------------------------------------------------------- identities
UPLOAD_ERRORS = errors(400, 413, 415, 503)


def face_url(name: str) -> str:
    """The URL of identity ``name``'s sample face (the name percent-encoded as one path segment)."""
    from urllib.parse import quote

    return f"/api/identities/{quote(name, safe='')}/face.jpg"


@identities.get("/api/identities", response_model=IdentitiesDoc, responses=errors(503))
def list_identities(ctx: ApiContext = Depends(context)) -> IdentitiesDoc:
    """Enrolled identities with their number of gallery embeddings, by name (``facepro identities list``), and
    whether each has a sample face (``face_url``)."""
    return IdentitiesDoc(identities=[IdentityDoc(name=n, embeddings=k, has_face=f, face_url=face_url(n) if f else None)
                                     for n, k, f in ctx.backend.list_identities()])


@identities.get("/api/identities/{name}/face.jpg", response_class=Response, responses={
    200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}, "description": "JPEG"},
    **errors(404, 503)})
def identity_face(name: str = Path(min_length=1, max_length=128), ctx: ApiContext = Depends(context)) -> Response:
    """The identity's sample face (a 112x112 JPEG cut from an enrollment photo at enrollment); 404 when there is
    no such identity or it has none (enrolled before FacePro kept samples). With ``api.token`` set, ``?token=``
    may replace the header (for an ``<img>``)."""
    data = ctx.backend.identity_face(name)
    if data is None:
        raise ApiError(404, f"identity {name!r} has no sample face (no such identity, or it was enrolled before "
                            "FacePro kept samples: enroll one more photo of it to add one)")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, no-cache"})


@identities.get("/api/unknowns", response_model=UnknownsDoc, responses=errors(503))
def list_unknowns(ctx: ApiContext = Depends(context)) -> UnknownsDoc:
    """The anonymous identities (``unknown-<n>``, faces nobody enrolled), most recently seen first, with track and
    event counts, first/last seen and a sample face (``facepro identities list --unknown``)."""
    return UnknownsDoc(unknowns=[UnknownDoc(**d) for d in ctx.backend.list_unknowns()])


@identities.post("/api/identities/{unknown}/name", response_model=NamedDoc, responses=errors(400, 404, 503))
def name_unknown(body: NameBody, unknown: str = Path(pattern=UNKNOWN_NAME), ctx: ApiContext = Depends(context)) -> Any:
    """Name an anonymous identity (``facepro identities name unknown-17 NAME``): its faces become NAME's gallery
    embeddings (NAME is created, or added to), its events are relabelled NAME, the cluster is deleted. 404: no such
    cluster; 400: a bad name."""
    return ctx.backend.name_unknown(unknown, body.name)


@identities.post("/api/identities/{name}/faces", status_code=201, response_model=EnrolledDoc, responses=UPLOAD_ERRORS)
def enroll(name: str = Path(min_length=1, max_length=128),
           files: list[UploadFile] = File(min_length=1, description="one or more images, each with exactly one face"),
           ctx: ApiContext = Depends(context)) -> EnrolledDoc:
    """Enroll images of ``name`` (creating the identity if new), with ``facepro enroll``'s checks: every image
    must show exactly one face (400 naming the image otherwise; nothing is stored then)."""
    uploads = [read_upload(f) for f in files]
    added, model = ctx.backend.enroll(name, uploads)
    return EnrolledDoc(name=name, added=added, model=model)


@identities.delete("/api/identities/{name}", response_model=DeletedDoc, responses=errors(404, 503))
def delete_identity(name: str = Path(min_length=1, max_length=128), ctx: ApiContext = Depends(context)) -> DeletedDoc:
    """Delete an identity and its embeddings (its events keep no name); 404 when unknown."""
    if not ctx.backend.delete_identity(name):
        raise ApiError(404, f"no identity named {name!r}")
    return DeletedDoc(deleted=name)


@identities.post("/api/recognize", response_model=RecognizeDoc, responses=UPLOAD_ERRORS)
def recognize(file: UploadFile = File(description="an image"), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """Every face in the image with its identity (null: unknown) and similarity, as ``facepro identify --json``."""
    return ctx.backend.recognize(read_upload(file).image)


# ---------------------------------------------------------------- backups
@backups.get("/api/backups", response_model=BackupsDoc, responses=errors())
def list_backups(ctx: ApiContext = Depends(context)) -> BackupsDoc:
    """Backup archives in ``<data dir>/backups``, newest first (``facepro backup list``)."""
    return BackupsDoc(backups=[BackupDoc(**b) for b in ctx.backend.list_backups()])


@backups.post("/api/backups", status_code=201, response_model=BackupDoc, responses=errors(409, 503))
def create_backup(ctx: ApiContext = Depends(context)) -> BackupDoc:
    """Write a backup archive (database, enrolled face images, config), as ``facepro backup create``."""
    return BackupDoc(**ctx.backend.create_backup())


def _backup_path(ctx: ApiContext, name: str) -> Any:
    path = ctx.backend.backup_file(name)
    if path is None:
        raise ApiError(404, f"no backup named {name}")
    return path


@backups.get("/api/backups/{name}", response_class=FileResponse, responses={
    200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}, "description": "the archive"},
    **errors(404)})
def download_backup(name: str = Path(pattern=BACKUP_NAME), ctx: ApiContext = Depends(context)) -> FileResponse:
    """Download one archive."""
    return FileResponse(_backup_path(ctx, name), media_type="application/gzip", filename=name)


@backups.post("/api/backups/{name}/restore", response_model=RestoredDoc, responses=errors(404, 409, 503))
def restore_backup(name: str = Path(pattern=BACKUP_NAME), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
    """Restore an archive with ``facepro backup restore``'s checks, then upgrade the schema: every member is
    verified first (422 when the archive cannot be trusted; nothing changed); 409 while a pipeline runs on
    this data dir or when the archive's schema is newer than this FacePro's."""
    _backup_path(ctx, name)
    return ctx.backend.restore_backup(name, running=ctx.link.running())


ROUTERS = (events, identities, backups)
