"""Read queries and gallery management (enrollment).

Every function takes an engine from :func:`storage.db.open_engine` on a
database at head revision, and returns plain values or frozen dataclasses.

Raises (every function):
    StorageError: locked or unreachable database, failed statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

import numpy as np
from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage.db import StorageError, dialect_insert, storage_errors
from storage.unknowns import parse_unknown
from storage.models import (
    EMBEDDING_TABLES,
    MODEL_LEN,
    NAME_LEN,
    PATH_LEN,
    TABLES,
    Base,
    Camera,
    Event,
    FaceEmbedding,
    FaceNegative,
    Identity,
    bytes_to_vector,
    utcnow,
    vector_to_bytes,
)

#: Largest ``limit`` accepted by :func:`list_events`.
MAX_LIMIT = 100_000
#: Largest identity sample face accepted by :func:`enroll`, bytes (a 112x112 JPEG is a few KiB).
MAX_SAMPLE_BYTES = 256 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = re.compile(r"^unknown-[0-9]+$")  # the anonymous clusters' names (storage.unknowns)


@dataclass(frozen=True)
class EventRow:
    """One event as stored.

    Attributes:
        event_id: 32-hex UUID.
        camera: camera name.
        track_id: tracker id.
        label: class name.
        identity: enrolled name, or None (unknown, or identity since deleted).
        method: ``"face"``, ``"reid"``, ``"gait"`` or None.
        identity_score: cosine similarity behind the identity decision.
        best_score: highest detector confidence, [0, 1].
        started_at, ended_at: aware UTC datetimes of first/last sighting.
        first_frame, last_frame: frame indices.
        xyxy: last box ``(x1, y1, x2, y2)``, frame pixels.
        snapshot_path: JPEG snapshot path or None.
        ended: True once the tracker dropped the track.
        job_id: the analysis job whose pipeline stored it (canonical UUID text), None for live cameras.
        unknown: its anonymous identity ``unknown-<n>`` (a face nobody enrolled, :mod:`storage.unknowns`), else None.
        has_snapshot: a snapshot path is stored (the file itself may since have been removed by retention).
        box_id: on a fleet hub, the box that reported the event (its snapshot, if any, stays on that box:
            ``snapshot_path`` is then ``box:<box_id>``); None for this box's own events.
    """

    event_id: str
    camera: str
    track_id: int
    label: str
    identity: str | None
    method: str | None
    identity_score: float
    best_score: float
    started_at: datetime
    ended_at: datetime
    first_frame: int
    last_frame: int
    xyxy: tuple[float, float, float, float]
    snapshot_path: str | None
    ended: bool
    job_id: str | None = None
    unknown: str | None = None
    box_id: str | None = None

    @property
    def has_snapshot(self) -> bool:
        return self.snapshot_path is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``facepro events --json``, ``GET /api/events``): the attributes, timestamps as
        ISO-8601 with ``+00:00``, ``xyxy`` as a list, and ``has_snapshot``."""
        return {
            "event_id": self.event_id,
            "camera": self.camera,
            "track_id": self.track_id,
            "label": self.label,
            "identity": self.identity,
            "method": self.method,
            "identity_score": self.identity_score,
            "best_score": self.best_score,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "first_frame": self.first_frame,
            "last_frame": self.last_frame,
            "xyxy": list(self.xyxy),
            "snapshot_path": self.snapshot_path,
            "ended": self.ended,
            "job_id": self.job_id,
            "unknown": self.unknown,
            "has_snapshot": self.has_snapshot,
            "box_id": self.box_id,
        }


def list_events(engine: Engine, camera: str | None = None, identity: str | None = None, limit: int = 100, *,
                label: str | None = None, method: str | None = None, since: datetime | None = None,
                until: datetime | None = None, before: tuple[datetime, str] | None = None,
                job: str | None = None, unknown: str | None = None, box: str | None = None) -> list[EventRow]:
    """Events newest first (by ``started_at``, then event id).

    Args:
        camera: only this camera's events (an unknown camera gives ``[]``).
        identity: only events attributed to this enrolled name.
        limit: at most this many rows, 1..:data:`MAX_LIMIT`.
        label: only this class name (``person``...).
        method: only events named by this method (``face``, ``reid``, ``gait``).
        since, until: aware datetimes; only events with ``since <= started_at < until``.
        before: a keyset cursor ``(started_at, event_id)``: only events after it in this order (the next page
            after that event).
        job: only events stored by this analysis job (its id).
        unknown: only the events of this anonymous identity (``unknown-<n>``; any other string gives ``[]``).
        box: only events a fleet hub received from this box (its ``box_id``).

    Raises:
        ValueError: ``limit`` out of range, or a naive datetime.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: expected 1 to {MAX_LIMIT}, got {limit}")
    for name, when in (("since", since), ("until", until), ("before", before[0] if before else None)):
        if when is not None and when.utcoffset() is None:
            raise ValueError(f"{name}: expected a timezone-aware datetime, got {when!r}")
    stmt = (
        select(Event, Camera.name, Identity.name)
        .join(Camera, Event.camera_id == Camera.id)
        .outerjoin(Identity, Event.identity_id == Identity.id)
        .order_by(Event.started_at.desc(), Event.id.desc())
        .limit(limit)
    )
    conditions = [(camera, lambda v: Camera.name == v), (identity, lambda v: Identity.name == v),
                  (label, lambda v: Event.label == v), (method, lambda v: Event.method == v),
                  (since, lambda v: Event.started_at >= v), (until, lambda v: Event.started_at < v),
                  (job, lambda v: Event.job_id == v),
                  (unknown, lambda v: Event.unknown_id == (parse_unknown(v) or -1)),
                  (box, lambda v: Event.box_id == v),
                  (before, lambda v: or_(Event.started_at < v[0], and_(Event.started_at == v[0], Event.id < v[1])))]
    for value, condition in conditions:
        if value is not None:
            stmt = stmt.where(condition(value))
    with storage_errors(engine.url, "listing events"), Session(engine) as session:
        return [_event_row(e, cam, ident) for e, cam, ident in session.execute(stmt).tuples()]


def get_event(engine: Engine, event_id: str) -> EventRow | None:
    """The event ``event_id`` (32 hex digits), None when there is none."""
    stmt = (
        select(Event, Camera.name, Identity.name)
        .join(Camera, Event.camera_id == Camera.id)
        .outerjoin(Identity, Event.identity_id == Identity.id)
        .where(Event.id == event_id)
    )
    with storage_errors(engine.url, "reading an event"), Session(engine) as session:
        row = session.execute(stmt).tuples().first()
    return _event_row(*row) if row is not None else None


def _event_row(e: Event, camera: str, identity: str | None) -> EventRow:
    return EventRow(
        event_id=e.id,
        camera=camera,
        track_id=e.track_id,
        label=e.label,
        identity=identity,
        method=e.method,
        identity_score=e.identity_score,
        best_score=e.best_score,
        started_at=e.started_at,
        ended_at=e.ended_at,
        first_frame=e.first_frame,
        last_frame=e.last_frame,
        xyxy=(e.x1, e.y1, e.x2, e.y2),
        snapshot_path=e.snapshot_path,
        ended=e.ended,
        job_id=e.job_id,
        unknown=f"unknown-{e.unknown_id}" if e.unknown_id is not None else None,
        box_id=e.box_id,
    )


# ------------------------------------------------------------------ gallery


class Gallery(tuple):  # type: ignore[type-arg]
    """``(names, vectors)`` from :func:`load_gallery`, unpackable as a 2-tuple.

    Attributes:
        names: one identity name per row of ``vectors``.
        vectors: ``(k, d) float32`` embeddings of the requested model
            (``(0, 0)`` when there are none).
        skipped: identities that have embeddings, but none of this model
            (they cannot be recognised until re-enrolled with it).
    """

    names: list[str]
    vectors: np.ndarray
    skipped: frozenset[str]

    def __new__(cls, names: list[str], vectors: np.ndarray, skipped: frozenset[str]) -> Gallery:
        self = super().__new__(cls, (names, vectors))
        self.names, self.vectors, self.skipped = names, vectors, skipped
        return self


def check_name(name: str) -> str:
    """``name`` if it is a valid identity name (1..128 characters, no surrounding spaces).

    Raises:
        ValueError: otherwise (the message says why).
    """
    return _check_name(name)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"identity name: expected a non-empty string, got {name!r}")
    if name != name.strip() or len(name) > NAME_LEN:
        raise ValueError(f"identity name {name!r}: expected at most {NAME_LEN} characters without leading/trailing spaces")
    if _RESERVED.match(name):
        raise ValueError(f"identity name {name!r}: names unknown-<number> are the anonymous clusters' "
                         f"(name one with: facepro identities name {name} NAME)")
    return name


def _check_enroll_inputs(vectors: np.ndarray, model: str, image_paths: Sequence[str | None], image_sha256: Sequence[str | None]) -> None:
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2 or 0 in vectors.shape:
        shape = getattr(vectors, "shape", None)
        dtype = getattr(vectors, "dtype", type(vectors).__name__)
        raise ValueError(f"vectors: expected a (k, d) float32 array with k, d >= 1, got shape {shape} dtype {dtype}")
    if not isinstance(model, str) or not 0 < len(model) <= MODEL_LEN:
        raise ValueError(f"model: expected a name of 1 to {MODEL_LEN} characters, got {model!r}")
    k = vectors.shape[0]
    if len(image_paths) != k or len(image_sha256) != k:
        raise ValueError(
            f"enroll: {k} vectors need {k} image_paths and {k} image_sha256 "
            f"(got {len(image_paths)} and {len(image_sha256)}); pass None entries where unknown"
        )
    for p in image_paths:
        if p is not None and not 0 < len(p) <= PATH_LEN:
            raise ValueError(f"image_paths: expected paths of 1 to {PATH_LEN} characters, got {p!r}")
    for h in image_sha256:
        if h is not None and not _SHA256.match(h):
            raise ValueError(f"image_sha256: expected 64 lowercase hex characters, got {h!r}")


def enroll(
    engine: Engine,
    name: str,
    vectors: np.ndarray,
    model: str,
    image_paths: Sequence[str | None] | None = None,
    image_sha256: Sequence[str | None] | None = None,
    sample: bytes | None = None,
) -> int:
    """Add gallery embeddings to an identity, creating the identity if new.

    Args:
        name: identity name (1..128 characters, no surrounding spaces).
        vectors: ``(k, d) float32`` embeddings, finite values.
        model: embedder model name; every embedding of one model must share ``d``.
        image_paths, image_sha256: per-vector source image path and its
            SHA-256 hex digest (None entries allowed; None = all unknown).
        sample: the identity's sample face (JPEG bytes, :mod:`stages.sample`); stored only when the
            identity has none yet (its first sample stays), None: nothing changes.

    Returns:
        The identity's id.

    Raises:
        ValueError: bad name, shape, dtype, non-finite values, list lengths,
            a sample that is not a JPEG of at most :data:`MAX_SAMPLE_BYTES`,
            or ``d`` differs from the model's embeddings already stored.
    """
    _check_name(name)
    if sample is not None and (not isinstance(sample, bytes) or sample[:3] != b"\xff\xd8\xff"
                               or len(sample) > MAX_SAMPLE_BYTES):
        raise ValueError(f"sample: expected JPEG bytes of at most {MAX_SAMPLE_BYTES} bytes")
    k = getattr(vectors, "shape", (0,))[0]
    image_paths = [None] * k if image_paths is None else list(image_paths)
    image_sha256 = [None] * k if image_sha256 is None else list(image_sha256)
    _check_enroll_inputs(vectors, model, image_paths, image_sha256)
    dim = int(vectors.shape[1])
    blobs = [vector_to_bytes(v, dim) for v in vectors]
    with storage_errors(engine.url, f"enrolling {name!r}"), engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        stored = conn.execute(select(FaceEmbedding.dim).where(FaceEmbedding.model == model).limit(1)).scalar()
        if stored is not None and stored != dim:
            raise ValueError(f"enroll {name!r}: model {model!r} embeddings in the database have dimension {stored}, got {dim}; use the same embedder model")
        insert = dialect_insert(conn)
        conn.execute(insert(Identity).on_conflict_do_nothing(index_elements=["name"]), {"name": name, "created_at": utcnow()})
        identity_id = conn.execute(select(Identity.id).where(Identity.name == name)).scalar_one()
        now = utcnow()
        rows = [
            {"identity_id": identity_id, "model": model, "dim": dim, "vector": b, "image_path": p, "image_sha256": h, "created_at": now}
            for b, p, h in zip(blobs, image_paths, image_sha256)
        ]
        conn.execute(FaceEmbedding.__table__.insert(), rows)
        if sample is not None:
            conn.execute(update(Identity).where(Identity.id == identity_id, Identity.sample.is_(None)).values(sample=sample))
    return int(identity_id)


def load_gallery(engine: Engine, model: str) -> Gallery:
    """All gallery embeddings of one model, ordered by identity name then insertion.

    Returns:
        A :class:`Gallery`: ``names, vectors = load_gallery(...)`` gives one
        name per row of the ``(k, d) float32`` array; ``.skipped`` names the
        identities that only have embeddings of other models.

    Raises:
        StorageError: the model's stored embeddings disagree on dimension.
    """
    stmt = (
        select(Identity.name, FaceEmbedding.dim, FaceEmbedding.vector)
        .join(FaceEmbedding, FaceEmbedding.identity_id == Identity.id)
        .where(FaceEmbedding.model == model)
        .order_by(Identity.name, FaceEmbedding.id)
    )
    others = select(Identity.name).join(FaceEmbedding, FaceEmbedding.identity_id == Identity.id).where(FaceEmbedding.model != model).distinct()
    with storage_errors(engine.url, f"loading the {model!r} gallery"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
        other_names = set(conn.execute(others).scalars())
    skipped = frozenset(other_names - {n for n, _, _ in rows})
    dims = {d for _, d, _ in rows}
    if len(dims) > 1:
        raise StorageError(f"gallery of model {model!r} mixes dimensions {sorted(dims)}; delete and re-enroll the affected identities")
    if not rows:
        return Gallery([], np.zeros((0, 0), np.float32), skipped)
    vectors = np.stack([bytes_to_vector(v, d) for _, d, v in rows])
    return Gallery([n for n, _, _ in rows], vectors, skipped)


def load_negatives(engine: Engine, model: str) -> tuple[list[str], np.ndarray]:
    """The negative examples of one model (``facepro events relabel EVENT --not NAME``): the identity name of
    each row and the ``(k, d) float32`` vectors (``(0, 0)`` when there are none), in insertion order."""
    stmt = (select(Identity.name, FaceNegative.dim, FaceNegative.vector)
            .join(FaceNegative, FaceNegative.identity_id == Identity.id)
            .where(FaceNegative.model == model).order_by(FaceNegative.id))
    with storage_errors(engine.url, f"loading the {model!r} negative examples"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if not rows:
        return [], np.zeros((0, 0), np.float32)
    try:
        return [n for n, _, _ in rows], np.stack([bytes_to_vector(v, d) for _, d, v in rows])
    except ValueError as err:  # mixed dimensions or a damaged blob
        raise StorageError(f"face_negatives of model {model!r}: {err}; delete and re-create them") from None


def gallery_version(engine: Engine, model: str) -> tuple[int, ...]:
    """A fingerprint of the ``model`` gallery and its negatives: it changes with every enrollment, deletion,
    merge, naming and negative example (counts, largest ids and the sum of identity ids of both tables).
    One cheap aggregate query: recognition polls it to reload the gallery while it runs."""
    parts = []
    for table in (FaceEmbedding, FaceNegative):
        parts.append(select(func.count(), func.coalesce(func.max(table.id), 0), func.coalesce(func.sum(table.identity_id), 0))
                     .where(table.model == model))
    with storage_errors(engine.url, "reading the gallery version"), engine.connect() as conn:
        return tuple(int(v) for stmt in parts for v in conn.execute(stmt).one())


def delete_identity(engine: Engine, name: str) -> bool:
    """Delete an identity and its gallery embeddings; its events keep a NULL identity.

    Returns:
        True if the identity existed.
    """
    with storage_errors(engine.url, f"deleting {name!r}"), engine.begin() as conn:
        return conn.execute(delete(Identity).where(Identity.name == name)).rowcount > 0


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_identities` moved.

    Attributes:
        embeddings: gallery embeddings (with their image path and hash) moved to the kept identity.
        events: events relabelled to the kept identity.
    """

    embeddings: int
    events: int


def merge_identities(engine: Engine, keep: str, other: str) -> MergeResult:
    """Merge identity ``other`` into ``keep`` in one transaction, then delete ``other``.

    Every gallery embedding of ``other`` (any model, with its enrollment
    image path and SHA-256) and every event attributed to ``other`` move to
    ``keep``; ``keep``'s template is then built from both sets (the outlier
    rule of :class:`stages.gallery.Gallery` applies to the union); ``keep``'s
    sample face stays (``other``'s is taken when ``keep`` has none). Nothing
    changes if any step fails.

    Args:
        keep: name of the identity that stays.
        other: name of the identity merged into it and deleted.

    Returns:
        :class:`MergeResult` with the rows moved.

    Raises:
        ValueError: a name is invalid or not an identity, or both names are the same.
        StorageError: locked or unreachable database (nothing merged).
    """
    _check_name(keep), _check_name(other)
    if keep == other:
        raise ValueError(f"merge: {keep!r} into itself; name two different identities")
    with storage_errors(engine.url, f"merging {other!r} into {keep!r}"), \
            engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        ids = dict(conn.execute(select(Identity.name, Identity.id).where(Identity.name.in_([keep, other]))).tuples().all())
        missing = [n for n in (keep, other) if n not in ids]
        if missing:
            raise ValueError(f"no identity named {missing[0]!r}; see facepro identities list")
        moved = conn.execute(update(FaceEmbedding).where(FaceEmbedding.identity_id == ids[other])
                             .values(identity_id=ids[keep])).rowcount
        relabelled = conn.execute(update(Event).where(Event.identity_id == ids[other]).values(identity_id=ids[keep])).rowcount
        theirs = select(Identity.sample).where(Identity.id == ids[other]).scalar_subquery()
        conn.execute(update(Identity).where(Identity.id == ids[keep], Identity.sample.is_(None)).values(sample=theirs))
        conn.execute(delete(Identity).where(Identity.id == ids[other]))
    return MergeResult(int(moved), int(relabelled))


def list_identities(engine: Engine) -> list[tuple[str, int]]:
    """``(name, number of gallery embeddings)`` for every identity, sorted by name."""
    stmt = (
        select(Identity.name, func.count(FaceEmbedding.id))
        .outerjoin(FaceEmbedding, FaceEmbedding.identity_id == Identity.id)
        .group_by(Identity.name)
        .order_by(Identity.name)
    )
    with storage_errors(engine.url, "listing identities"), engine.connect() as conn:
        return [(n, int(c)) for n, c in conn.execute(stmt)]


def identity_overview(engine: Engine) -> list[tuple[str, int, bool]]:
    """``(name, number of gallery embeddings, has a sample face)`` for every identity, sorted by name."""
    stmt = (
        select(Identity.name, func.count(FaceEmbedding.id), Identity.sample.is_not(None))
        .outerjoin(FaceEmbedding, FaceEmbedding.identity_id == Identity.id)
        .group_by(Identity.id, Identity.name)
        .order_by(Identity.name)
    )
    with storage_errors(engine.url, "listing identities"), engine.connect() as conn:
        return [(n, int(c), bool(s)) for n, c, s in conn.execute(stmt)]


def identity_sample(engine: Engine, name: str) -> bytes | None:
    """The sample face (JPEG bytes) of identity ``name``; None when it has none or there is no such identity."""
    with storage_errors(engine.url, "reading a sample face"), engine.connect() as conn:
        return conn.execute(select(Identity.sample).where(Identity.name == name)).scalar()


def count_rows(engine: Engine) -> dict[str, int]:
    """Row count of every FacePro table (:data:`storage.models.TABLES`: ``cameras``, ``identities``,
    ``face_embeddings``, ``events``, ``track_embeddings``, ``reid_embeddings``, ``gait_embeddings``, ``snapshots``,
    ``mqtt_outbox``)."""
    with storage_errors(engine.url, "counting rows"), engine.connect() as conn:
        return {t: int(conn.execute(select(func.count()).select_from(Base.metadata.tables[t])).scalar_one()) for t in TABLES}


@dataclass(frozen=True)
class NamedTrackVectors:
    """Track-level embeddings of named events, for Re-ID / gait linking across recognition processes.

    Attributes:
        last_id: the largest embedding row id read (pass it back as ``after_id``); unchanged when nothing is new.
        cameras: ``n`` camera names.
        identities: ``n`` identity names.
        methods: ``n`` identity methods (``"face"``, ``"reid"``, ``"gait"``).
        scores: ``n`` identity scores (cosine similarity).
        vectors: ``(n, d) float32`` embeddings, in row order.
    """

    last_id: int
    cameras: tuple[str, ...]
    identities: tuple[str, ...]
    methods: tuple[str, ...]
    scores: tuple[float, ...]
    vectors: np.ndarray


def last_vector_id(engine: Engine, kind: str) -> int:
    """The largest row id of the ``kind`` embedding table (0 when empty): where :func:`named_track_vectors` starts."""
    table = Base.metadata.tables[EMBEDDING_TABLES[kind]]
    with storage_errors(engine.url, f"reading {table.name}"), engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one())


def named_track_vectors(engine: Engine, kind: str, model: str, after_id: int, exclude_cameras: Sequence[str] = (),
                        limit: int = 1000) -> NamedTrackVectors:
    """Track-level (``frame_index = -1``) embeddings of ``kind`` and ``model`` stored after row ``after_id``
    whose event has an identity, oldest first.

    Args:
        kind: ``"reid"`` or ``"gait"`` (a key of :data:`storage.models.EMBEDDING_TABLES`).
        model: embedding model name; other models are not comparable and are skipped.
        after_id: only rows with a larger id (from :func:`last_vector_id` or a previous ``last_id``).
        exclude_cameras: events of these cameras are skipped (the caller already knows them).
        limit: at most this many rows (1..100000).

    Row ids grow with each commit of the one storage process, so polling by id misses nothing on SQLite. On a
    PostgreSQL server written by several edge boxes, a row whose id was taken before another box's commit but
    committed after this read is missed (a lost link hint, never a wrong one).

    Raises:
        ValueError: unknown ``kind`` or ``limit`` out of range.
        StorageError: stored vectors whose dimension disagrees with their bytes.
    """
    if kind not in EMBEDDING_TABLES:
        raise ValueError(f"kind: expected one of {sorted(EMBEDDING_TABLES)}, got {kind!r}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: expected 1 to {MAX_LIMIT}, got {limit}")
    t = Base.metadata.tables[EMBEDDING_TABLES[kind]]
    with storage_errors(engine.url, f"reading named {kind} embeddings"), engine.connect() as conn:
        # the upper bound first: rows skipped by the filters below still move the cursor on, and a row
        # committed after it is read next time
        upper = int(conn.execute(select(func.coalesce(func.max(t.c.id), after_id)).where(t.c.id > after_id)).scalar_one())
        stmt = (
            select(t.c.id, Camera.name, Identity.name, Event.method, Event.identity_score, t.c.dim, t.c.vector)
            .join(Event, Event.id == t.c.event_id)
            .join(Camera, Camera.id == Event.camera_id)
            .join(Identity, Identity.id == Event.identity_id)
            .where(t.c.id > after_id, t.c.id <= upper, t.c.model == model, t.c.frame_index == -1)
            .order_by(t.c.id)
            .limit(limit)
        )
        if exclude_cameras:
            stmt = stmt.where(Camera.name.not_in(list(exclude_cameras)))
        rows = conn.execute(stmt).all()
    last = rows[-1][0] if len(rows) == limit else upper  # a full page: more may follow right after its last row
    try:
        vectors = np.stack([bytes_to_vector(v, d) for *_, d, v in rows]) if rows else np.zeros((0, 0), np.float32)
    except ValueError as err:
        raise StorageError(f"{t.name}: a stored vector is damaged ({err})") from None
    return NamedTrackVectors(int(last), tuple(r[1] for r in rows), tuple(r[2] for r in rows),
                             tuple(r[3] or kind for r in rows), tuple(float(r[4]) for r in rows), vectors)
