"""Request and response bodies of the HTTP API (:mod:`pipeline.api`), as pydantic models: the OpenAPI schema
at ``/openapi.json`` is built from them, and every answer is checked against its model.

Times are ISO-8601 text with an offset (UTC, ``+00:00``); sizes in bytes unless a name says otherwise;
boxes ``[x1, y1, x2, y2]`` in image pixels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Body):
    """Every error answer."""

    error: str = Field(description="what went wrong, one line")


class HealthFailure(_Body):
    """503 of ``GET /api/health``."""

    error: str
    stage: str | None = Field(None, description="the first stage that does not run (pipeline mode)")


class Health(_Body):
    status: Literal["ok"]
    mode: Literal["pipeline", "alone"] = Field(description="pipeline: inside facepro run; alone: facepro serve")
    stages: dict[str, str] = Field(description="stage → state (running, done...); empty when alone")


class StageDoc(_Body):
    """One stage of ``facepro status --json``."""

    stage: str
    processes: int
    rate_fps: float = Field(description="items passed on per second")
    queue_depth: int
    dropped: int
    drops: dict[str, int] = Field(description="drop reason → count")
    pids: list[int]
    state: str
    oldest_wait_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    cpu_percent: float = Field(description="100 = one core")
    rss_mb: float = Field(description="resident memory, MiB")
    restarts: int
    last_error: str
    counts: dict[str, int] = Field(description="stage-specific counters")


class StatusDoc(_Body):
    """``facepro status --json``."""

    run_id: str
    uptime_s: float
    stages: list[StageDoc]


class ScaleBody(_Body):
    """``POST /api/scale``: what ``facepro scale STAGE=N`` sends."""

    stage: str = Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$", examples=["detection"])
    processes: int = Field(ge=1, le=64, examples=[2])


class ScaleDoc(_Body):
    ok: bool
    message: str = Field(description="the supervisor's answer, as facepro scale prints it")


class CameraDoc(_Body):
    name: str
    source_kind: Literal["file", "rtsp", "http", "usb", "other"] = Field(description="the source URI itself is not shown (it may hold credentials)")
    mode: Literal["file", "live"]
    live: bool = Field(description="a frame is published in the camera's ring")
    width: int | None = Field(None, description="frame width, pixels (from the ring)")
    height: int | None = None
    frame_index: int | None = Field(None, description="index of the newest published frame in its source")
    captured_at: str | None = Field(None, description="when the newest frame was read")
    age_s: float | None = Field(None, description="seconds since captured_at")


class CamerasDoc(_Body):
    cameras: list[CameraDoc]


class EventDoc(_Body):
    """One event: exactly a line of ``facepro events --json``."""

    event_id: str = Field(description="32 hex digits")
    camera: str
    track_id: int
    label: str
    identity: str | None
    method: str | None = Field(description="face, reid, gait or null")
    identity_score: float = Field(description="cosine similarity behind the identity")
    best_score: float = Field(description="highest detector confidence, 0..1")
    started_at: str
    ended_at: str
    first_frame: int
    last_frame: int
    xyxy: list[float] = Field(description="last box [x1, y1, x2, y2], frame pixels")
    snapshot_path: str | None
    ended: bool
    job_id: str | None = Field(description="the analysis job that stored it (GET /api/jobs/{id}), null for live cameras")
    unknown: str | None = Field(None, description="its anonymous identity unknown-<n> (a face nobody enrolled; identity is then null)")
    has_snapshot: bool = Field(description="GET /api/events/{event_id}/snapshot.jpg has an image (on a fleet hub: "
                               "the box that reported the event has one; the hub itself serves none)")
    box_id: str | None = Field(description="fleet hub: the box that reported the event; null: this box's own event")


class EventPage(_Body):
    events: list[EventDoc] = Field(description="newest first")
    next: str | None = Field(description="cursor of the next page (pass as cursor=), null on the last page")


class IdentityDoc(_Body):
    name: str
    embeddings: int = Field(description="gallery embeddings stored")
    has_face: bool = Field(description="a sample face was stored at enrollment (identities enrolled before "
                                       "FacePro kept samples have none)")
    face_url: str | None = Field(description="its JPEG (GET /api/identities/{name}/face.jpg), null when none")


class IdentitiesDoc(_Body):
    identities: list[IdentityDoc]


class UnknownDoc(_Body):
    """One anonymous identity (``facepro identities list --unknown --json``)."""

    name: str = Field(description="unknown-<n>: n is never given again")
    model: str = Field(description="face embedder model of its vectors")
    tracks: int = Field(description="tracks assigned to it since it was created")
    events: int = Field(description="its events still stored")
    first_seen: str
    last_seen: str
    sample_event: str | None = Field(description="the sample face: GET /api/events/{sample_event}/snapshot.jpg")
    sample_snapshot: str | None


class UnknownsDoc(_Body):
    unknowns: list[UnknownDoc] = Field(description="most recently seen first")


class NameBody(_Body):
    """``POST /api/identities/{unknown}/name``."""

    name: str = Field(min_length=1, max_length=128, examples=["Alice"])


class NamedDoc(_Body):
    unknown: str = Field(description="the cluster named (now deleted)")
    name: str
    created: bool = Field(description="the identity is new (else the cluster's faces were added to it)")
    embeddings: int = Field(description="gallery embeddings added")
    events: int = Field(description="events relabelled")


class RelabelBody(_Body):
    """``POST /api/events/{event_id}/relabel``: at least one of the two."""

    not_: str | None = Field(None, alias="not", min_length=1, max_length=128, description="the event is not this identity")
    as_: str | None = Field(None, alias="as", min_length=1, max_length=128, description="the event is this identity")


class RelabelDoc(_Body):
    event_id: str
    identity: str | None = Field(description="its identity afterwards")
    unknown: str | None = Field(description="its anonymous identity afterwards")
    negative_of: str | None
    added_to: str | None


class EnrolledDoc(_Body):
    name: str
    added: int = Field(description="images enrolled by this request")
    model: str = Field(description="face embedder model of the embeddings")


class DeletedDoc(_Body):
    deleted: str


class FaceDoc(_Body):
    bbox: list[float] = Field(min_length=4, max_length=4, description="[x1, y1, x2, y2], image pixels")
    identity: str | None
    similarity: float = Field(description="cosine similarity to the best template")


class RecognizeDoc(_Body):
    """Every face in the image, as ``facepro identify --json`` prints it."""

    faces: list[FaceDoc]


class BackupDoc(_Body):
    name: str = Field(description="archive file name (facepro-backup-<UTC time>.tar.gz)")
    size: int
    created_at: str | None
    schema_revision: str | None
    files: int = Field(description="files listed in the archive's manifest")
    error: str | None = Field(description="why the archive cannot be read, null when it can")


class BackupsDoc(_Body):
    backups: list[BackupDoc] = Field(description="newest first")


class RestoredDoc(_Body):
    restored: str = Field(description="the archive")
    schema_revision: str | None = Field(description="schema of the restored database before the upgrade")
    revision: str = Field(description="schema revision after the upgrade")
    faces: int = Field(description="face images restored")
    config: str | None = Field(description="the restored config file (the current one is never overwritten)")
    previous: str | None = Field(description="copy of the replaced database")
