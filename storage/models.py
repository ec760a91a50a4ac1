"""Database schema: SQLAlchemy 2 typed models and float32 vector helpers.

Tables (the Alembic migrations in ``alembic/versions`` create exactly these;
``alembic check`` must report no drift):

- ``cameras``: one row per camera name, created on demand by the writer.
- ``identities``: enrolled people; only enrollment creates them.
- ``face_embeddings``: gallery vectors of an identity (``ON DELETE CASCADE``).
- ``events``: one row per tracked object (primary key: the 32-hex UUID of
  :attr:`pipeline.messages.TrackUpdate.event_id`).
- ``track_embeddings``: face vectors computed for an event (``kind = 'face'``;
  revision 0001 also kept Re-ID and gait vectors here).
- ``reid_embeddings``: Re-ID (appearance) vectors computed for an event.
- ``gait_embeddings``: gait vectors computed for an event.
- ``snapshots``: JPEG snapshot files of an event (path and size on disk).
- ``mqtt_outbox``: event changes (new / update / end) to publish over MQTT,
  written in the transaction that commits the change (only with ``mqtt``
  configured); ``sent_at`` is set on the broker's acknowledgement
  (:mod:`storage.outbox`, revision 0005).
- ``unknown_clusters``: anonymous identities (``unknown-<id>``) of faces nobody enrolled: the sum of their
  tracks' unit face vectors (the centroid's direction), track count, first/last seen (revision 0008);
  ``events.unknown_id`` names an event's cluster. Ids come from an AUTOINCREMENT key (SQLite) or a
  sequence (PostgreSQL), so a number is never reused. ``events.unknown_id`` is not a foreign key (no
  table rebuild of ``events`` on SQLite, no lookup on the write path): every code path that deletes a
  cluster moves or clears its events first (:mod:`storage.unknowns`).
- ``face_negatives``: face vectors an identity must *not* match (``facepro events relabel EVENT --not NAME``;
  ``ON DELETE CASCADE`` with the identity; revision 0008).
- ``jobs``: background jobs of the HTTP API (analyze a clip, backup, enroll) with their
  state, progress and result (revision 0006); ``events.job_id`` names the analysis job
  that produced an event (NULL for live cameras). It is not a foreign key: events
  outlive the job rows, and the write path pays no lookup for it.
- ``events.box_id`` / ``events.box_seq`` (revision 0007): on a fleet hub (``facepro hub``,
  :mod:`storage.hub`), the box that reported the event and the ``seq`` of its message the
  row holds; NULL for a box's own events.

Every per-event table (``track_embeddings``, ``reid_embeddings``,
``gait_embeddings``, ``snapshots``) references ``events.id`` with
``ON DELETE CASCADE``: deleting an event deletes its vectors and snapshot
rows (the snapshot files are removed by :mod:`storage.retention`).

Vectors are stored as raw little-endian float32 bytes (``dim * 4`` bytes,
never pickled); use :func:`vector_to_bytes` and :func:`bytes_to_vector`.
Timestamps are timezone-aware UTC :class:`datetime.datetime` values
(:class:`UTCDateTime`). Constraint and index names follow
:data:`NAMING_CONVENTION`, so migrations can address them on every backend.

ORM classes are internal to the ``storage`` package: public functions return
frozen dataclasses or plain values.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Constraint/index names: ``ix_<table>_<cols>``, ``uq_<table>_<cols>``,
#: ``ck_<table>_<name>``, ``fk_<table>_<col>_<referred table>``, ``pk_<table>``.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Column sizes; writers validate against them before a batch reaches the database.
NAME_LEN = 128
LABEL_LEN = 64
MODEL_LEN = 128
PATH_LEN = 1024
EVENT_ID_LEN = 32
JOB_ID_LEN = 36
BOX_ID_LEN = 64
SHA256_LEN = 64

#: Allowed values of ``events.method`` and of ``EmbeddingRecord.kind``.
METHODS: tuple[str, ...] = ("face", "reid", "gait")
_METHODS_SQL = ", ".join(f"'{m}'" for m in METHODS)

#: Kinds and states of ``jobs`` rows (the state machine itself is :data:`storage.jobs.TRANSITIONS`).
JOB_TYPES: tuple[str, ...] = ("analyze", "backup", "enroll")
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that only accepts and returns aware UTC datetimes.

    SQLite has no time zone type: values are stored as naive UTC text and
    given ``tzinfo=UTC`` back on load. PostgreSQL stores ``timestamptz``.

    Raises:
        ValueError: on bind, when a naive datetime is given (ambiguous zone).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (e.g. tzinfo=timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Camera(Base):
    __tablename__ = "cameras"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Identity(Base):
    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sample: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)  # JPEG sample face (revision 0009)


class FaceEmbedding(Base):
    __tablename__ = "face_embeddings"
    __table_args__ = (
        CheckConstraint("dim > 0", name="dim_positive"),
        CheckConstraint("length(vector) = dim * 4", name="vector_size"),
        Index("ix_face_embeddings_model_identity_id", "model", "identity_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    image_path: Mapped[str | None] = mapped_column(String(PATH_LEN))
    image_sha256: Mapped[str | None] = mapped_column(String(SHA256_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(f"method IN ({_METHODS_SQL})", name="method"),
        CheckConstraint("last_frame >= first_frame", name="frame_order"),
        # list_events(camera=...) newest first
        Index("ix_events_camera_id_started_at", "camera_id", "started_at"),
        # list_events(identity=...) newest first, and ON DELETE SET NULL from identities; partial
        # (revision 0004): events nobody was recognised in, most of them, skip this index entry
        Index("ix_events_identity_id_started_at", "identity_id", "started_at",
              sqlite_where=text("identity_id IS NOT NULL"), postgresql_where=text("identity_id IS NOT NULL")),
        # list_events() newest first
        Index("ix_events_started_at", "started_at"),
        # list_events(job=...) newest first; partial (revision 0006): live events pay no index entry
        Index("ix_events_job_id_started_at", "job_id", "started_at",
              sqlite_where=text("job_id IS NOT NULL"), postgresql_where=text("job_id IS NOT NULL")),
        # list_events(box=...) newest first; partial (revision 0007): a box's own events pay no index entry
        Index("ix_events_box_id_started_at", "box_id", "started_at",
              sqlite_where=text("box_id IS NOT NULL"), postgresql_where=text("box_id IS NOT NULL")),
        # list_events(unknown=...), naming and retention of clusters; partial (revision 0008)
        Index("ix_events_unknown_id_started_at", "unknown_id", "started_at",
              sqlite_where=text("unknown_id IS NOT NULL"), postgresql_where=text("unknown_id IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(EVENT_ID_LEN), primary_key=True)
    camera_id: Mapped[int] = mapped_column(ForeignKey("cameras.id"))
    track_id: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str] = mapped_column(String(LABEL_LEN))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime)
    first_frame: Mapped[int] = mapped_column(BigInteger)
    last_frame: Mapped[int] = mapped_column(BigInteger)
    best_score: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id", ondelete="SET NULL"))
    method: Mapped[str | None] = mapped_column(String(16))
    identity_score: Mapped[float] = mapped_column(Float)
    snapshot_path: Mapped[str | None] = mapped_column(String(PATH_LEN))
    ended: Mapped[bool] = mapped_column(Boolean)
    job_id: Mapped[str | None] = mapped_column(String(JOB_ID_LEN))  # the analysis job (revision 0006), NULL: live
    box_id: Mapped[str | None] = mapped_column(String(BOX_ID_LEN))  # hub: the reporting box (0007), NULL: own event
    box_seq: Mapped[int | None] = mapped_column(Integer)  # hub: seq of the box's message the row holds (0007)
    unknown_id: Mapped[int | None] = mapped_column(Integer)  # its anonymous cluster (revision 0008), not a foreign key


class UnknownCluster(Base):
    """An anonymous identity ``unknown-<id>``: tracks of one unenrolled face (revision 0008, :mod:`storage.unknowns`).

    ``vector`` is the sum of the member tracks' unit face vectors (its direction is the centroid), ``tracks``
    how many were added. ``sqlite_autoincrement``: an id is never given again, even after its cluster is gone.
    """

    __tablename__ = "unknown_clusters"
    __table_args__ = (
        CheckConstraint("dim > 0", name="dim_positive"),
        CheckConstraint("length(vector) = dim * 4", name="vector_size"),
        CheckConstraint("tracks >= 1", name="tracks_positive"),
        # the assigner's fingerprint (count, max id, sum of tracks per model) reads this index only
        Index("ix_unknown_clusters_model_dim_tracks", "model", "dim", "tracks"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    tracks: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FaceNegative(Base):
    """A face vector identity ``identity_id`` must not be given (revision 0008): from ``facepro events relabel
    EVENT --not NAME``; ``event_id`` is where it came from (no foreign key: the negative outlives the event)."""

    __tablename__ = "face_negatives"
    __table_args__ = (
        CheckConstraint("dim > 0", name="dim_positive"),
        CheckConstraint("length(vector) = dim * 4", name="vector_size"),
        Index("ix_face_negatives_model_identity_id", "model", "identity_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    event_id: Mapped[str | None] = mapped_column(String(EVENT_ID_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class _EventVector:
    """Columns shared by the per-event vector tables: one embedding computed for an event's track."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # no index of its own (revision 0004): the unique (event_id, model, frame_index) serves event_id lookups
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    frame_index: Mapped[int] = mapped_column(BigInteger)
    quality: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def _vector_checks() -> tuple[CheckConstraint, CheckConstraint, UniqueConstraint]:
    return (
        CheckConstraint("dim > 0", name="dim_positive"),
        CheckConstraint("length(vector) = dim * 4", name="vector_size"),
        # natural key: a re-sent embedding (storage delivery is at-least-once) is ignored
        UniqueConstraint("event_id", "model", "frame_index"),
    )


class TrackEmbedding(_EventVector, Base):
    """Face vectors of an event (``kind`` is always ``'face'`` since revision 0002)."""

    __tablename__ = "track_embeddings"
    __table_args__ = (CheckConstraint("kind = 'face'", name="kind"), *_vector_checks())

    kind: Mapped[str] = mapped_column(String(16))


class ReidEmbedding(_EventVector, Base):
    """Re-ID (whole-body appearance) vectors of an event."""

    __tablename__ = "reid_embeddings"
    __table_args__ = _vector_checks()


class GaitEmbedding(_EventVector, Base):
    """Gait vectors of an event."""

    __tablename__ = "gait_embeddings"
    __table_args__ = _vector_checks()


class Snapshot(Base):
    """A JPEG snapshot file of an event; one row per distinct ``(event_id, path)``."""

    __tablename__ = "snapshots"
    __table_args__ = (
        UniqueConstraint("event_id", "path"),  # also the index behind "snapshots of an event"
        CheckConstraint("bytes >= 0", name="bytes_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(PATH_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    bytes: Mapped[int | None] = mapped_column(BigInteger)


#: Allowed values of ``mqtt_outbox.type``.
OUTBOX_TYPES: tuple[str, ...] = ("new", "update", "end")
_OUTBOX_TYPES_SQL = ", ".join(f"'{t}'" for t in OUTBOX_TYPES)


class MqttOutbox(Base):
    """One event change to publish on ``<prefix>/events`` (see :mod:`storage.outbox`).

    ``event_id`` has no foreign key on purpose: a committed change stays publishable after retention
    deleted its event. ``(event_id, seq)`` is unique: ``seq`` counts the messages of one event from 1.
    ``payload`` is the JSON text published verbatim.
    """

    __tablename__ = "mqtt_outbox"
    __table_args__ = (
        CheckConstraint(f"type IN ({_OUTBOX_TYPES_SQL})", name="type"),
        CheckConstraint("seq >= 1", name="seq_positive"),
        UniqueConstraint("event_id", "seq"),  # also the index behind "last seq of an event"
        # the publisher's "unsent rows in order" and the pending count read only the unsent rows
        Index("ix_mqtt_outbox_unsent", "id", sqlite_where=text("sent_at IS NULL"),
              postgresql_where=text("sent_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LEN))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(8))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    """A background job of the HTTP API (revision 0006); ``params`` and ``result`` are JSON text."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"type IN ({', '.join(repr(t) for t in JOB_TYPES)})", name="type"),
        CheckConstraint(f"state IN ({', '.join(repr(s) for s in JOB_STATES)})", name="state"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        Index("ix_jobs_state_created_at", "state", "created_at"),  # the queue (oldest queued first)
    )

    id: Mapped[str] = mapped_column(String(JOB_ID_LEN), primary_key=True)  # canonical UUID text
    type: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    params: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(PATH_LEN))
    progress: Mapped[float] = mapped_column(Float)
    frames_done: Mapped[int] = mapped_column(BigInteger)
    frames_total: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


#: The vector table of each ``EmbeddingRecord.kind``.
EMBEDDING_TABLES: dict[str, str] = {"face": "track_embeddings", "reid": "reid_embeddings", "gait": "gait_embeddings"}

#: Every FacePro table, parents before children.
TABLES: tuple[str, ...] = (
    "cameras",
    "identities",
    "face_embeddings",
    "events",
    "track_embeddings",
    "reid_embeddings",
    "gait_embeddings",
    "snapshots",
    "mqtt_outbox",
    "jobs",
    "unknown_clusters",
    "face_negatives",
)

#: The tables whose rows belong to one event (deleted with it by ``ON DELETE CASCADE``).
EVENT_CHILD_TABLES: tuple[str, ...] = ("track_embeddings", "reid_embeddings", "gait_embeddings", "snapshots")


def vector_to_bytes(vector: np.ndarray, dim: int | None = None) -> bytes:
    """Encode a 1-D float32 vector as raw little-endian float32 bytes.

    Args:
        vector: ``(d,) float32``, finite values.
        dim: expected ``d``; None accepts any ``d >= 1``.

    Returns:
        ``d * 4`` bytes.

    Raises:
        ValueError: not a numpy array, not float32, not 1-D, empty, wrong
            dimension or non-finite values; the message says which.
    """
    if not isinstance(vector, np.ndarray):
        raise ValueError(f"vector: expected a numpy.ndarray, got {type(vector).__name__}")
    if vector.dtype != np.float32:
        raise ValueError(f"vector: expected dtype float32, got {vector.dtype}; convert with .astype(np.float32)")
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise ValueError(f"vector: expected shape (d,) with d >= 1, got {vector.shape}")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(f"vector: expected dimension {dim}, got {vector.shape[0]}")
    if not np.isfinite(vector).all():
        raise ValueError("vector: contains NaN or infinite values")
    return vector.astype("<f4", copy=False).tobytes()


def bytes_to_vector(data: bytes, dim: int) -> np.ndarray:
    """Decode raw little-endian float32 bytes into a writable ``(dim,) float32`` array.

    Raises:
        ValueError: ``dim < 1`` or ``len(data) != dim * 4`` (a truncated or
            foreign blob); the message gives both sizes.
    """
    if dim < 1:
        raise ValueError(f"dim: expected >= 1, got {dim}")
    if len(data) != dim * 4:
        raise ValueError(f"vector blob: expected {dim * 4} bytes for dim {dim}, got {len(data)}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
