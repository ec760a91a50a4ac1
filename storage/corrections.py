"""What a person corrects: naming an anonymous cluster, merging clusters, relabelling one event.

- :func:`name_unknown` (``facepro identities name unknown-17 Alice``, ``POST /api/identities/unknown-17/name``):
  the cluster's track-level face vectors (the best :data:`NAME_MAX_EMBEDDINGS` by quality; the centroid when
  its events are gone) become gallery embeddings of NAME (created when new, added to when enrolled); its
  events get NAME (method ``face``, ``identity_score`` = their track vector's cosine similarity to the
  cluster centroid); the cluster is deleted. One transaction.
- :func:`merge_clusters` (``facepro identities merge unknown-3 unknown-9``): OTHER's tracks and events join KEEP.
- :func:`relabel_event` (``facepro events relabel EVENT --not Bob [--as Carol]``): ``--not`` stores the event's
  track-level face vector as a negative example of Bob (:class:`stages.gallery.Gallery` then refuses Bob for a
  face at least as similar to one of Bob's negatives as to Bob's template); if the event was Bob's it becomes
  unknown (and is clustered like any unnamed track). ``--as`` adds the vector to Carol's gallery embeddings
  (creating Carol) and gives the event to Carol, taking it out of its cluster.

Every function runs in one write transaction (``BEGIN IMMEDIATE`` on SQLite): nothing changes when it fails.

Raises (every function):
    ValueError: an unknown cluster, identity or event, a bad name, nothing to act on (the message says what to do).
    StorageError: locked or unreachable database.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from sqlalchemy import Connection, Engine, delete, insert, select, update

from storage.clustering import track_vector
from storage.db import dialect_insert, storage_errors
from storage.models import (Event, FaceEmbedding, FaceNegative, Identity, TrackEmbedding, UnknownCluster,
                            bytes_to_vector, utcnow, vector_to_bytes)
from storage.queries import check_name
from storage.unknowns import UnknownAssigner, merge_into, parse_unknown, unknown_name

class NotFoundError(ValueError):
    """The cluster, event or identity named does not exist (HTTP 404; the CLI's exit code 2)."""


#: Most gallery embeddings a named cluster gives its identity (its best tracks by face quality).
NAME_MAX_EMBEDDINGS = 32


@contextmanager
def _write(engine: Engine, what: str) -> Iterator[Connection]:
    """One IMMEDIATE write transaction with FacePro's error mapping."""
    with storage_errors(engine.url, what), engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, \
            conn.begin():
        yield conn


def _cluster_id(name: str) -> int:
    cid = parse_unknown(name)
    if cid is None:
        raise ValueError(f"{name!r} is not an anonymous identity (unknown-<number>); see facepro identities list --unknown")
    return cid


def _identity_id(conn: Connection, name: str, create: bool) -> tuple[int | None, bool]:
    """``(id, created)`` of identity ``name``; created when ``create`` and missing, else ``(None, False)``."""
    found = conn.execute(select(Identity.id).where(Identity.name == name)).scalar()
    if found is not None or not create:
        return found, False
    check_name(name)
    conn.execute(dialect_insert(conn)(Identity).on_conflict_do_nothing(index_elements=["name"]),
                 {"name": name, "created_at": utcnow()})
    return conn.execute(select(Identity.id).where(Identity.name == name)).scalar_one(), True


def _check_gallery_dim(conn: Connection, model: str, dim: int) -> None:
    stored = conn.execute(select(FaceEmbedding.dim).where(FaceEmbedding.model == model).limit(1)).scalar()
    if stored is not None and stored != dim:
        raise ValueError(f"model {model!r} gallery embeddings have dimension {stored}, the cluster's {dim}")


def _add_embeddings(conn: Connection, identity_id: int, model: str, vectors: list[np.ndarray]) -> None:
    now = utcnow()
    conn.execute(insert(FaceEmbedding), [
        {"identity_id": identity_id, "model": model, "dim": int(v.shape[0]), "vector": vector_to_bytes(v.astype(np.float32)),
         "image_path": None, "image_sha256": None, "created_at": now} for v in vectors])


@dataclass(frozen=True)
class NameResult:
    """What :func:`name_unknown` did: the cluster named, the identity, whether it was created, gallery embeddings
    added and events relabelled."""

    unknown: str
    name: str
    created: bool
    embeddings: int
    events: int


def name_unknown(engine: Engine, unknown: str, name: str, must_exist: bool = False) -> NameResult:
    """Turn cluster ``unknown`` (``unknown-<n>``) into identity ``name`` (module docstring).

    Args:
        must_exist: refuse when ``name`` is not enrolled yet (``facepro identities merge NAME unknown-<n>``).
    """
    cid = _cluster_id(unknown)
    check_name(name)
    with _write(engine, f"naming {unknown} {name!r}") as conn:
        row = conn.execute(select(UnknownCluster.model, UnknownCluster.dim, UnknownCluster.vector)
                           .where(UnknownCluster.id == cid)).first()
        if row is None:
            raise NotFoundError(f"no cluster {unknown}; see facepro identities list --unknown")
        model, dim, blob = row
        _check_gallery_dim(conn, model, dim)
        identity_id, created = _identity_id(conn, name, create=not must_exist)
        if identity_id is None:
            raise NotFoundError(f"no identity named {name!r}; name the cluster with: facepro identities name {unknown} NAME")
        centroid = bytes_to_vector(blob, dim)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        t = TrackEmbedding
        members = conn.execute(select(Event.id, t.vector, t.quality)
                               .join(t, (t.event_id == Event.id) & (t.frame_index == -1) & (t.model == model))
                               .where(Event.unknown_id == cid).order_by(t.quality.desc(), Event.id)).all()
        vectors = [bytes_to_vector(v, dim) for _, v, _ in members]
        _add_embeddings(conn, identity_id, model, vectors[:NAME_MAX_EMBEDDINGS] or [centroid])
        scores = {event_id: float(v @ centroid) for (event_id, _, _), v in zip(members, vectors)}
        events = conn.execute(select(Event.id).where(Event.unknown_id == cid)).scalars().all()
        for event_id in events:
            conn.execute(update(Event).where(Event.id == event_id).values(
                identity_id=identity_id, method="face", identity_score=scores.get(event_id, 0.0), unknown_id=None))
        conn.execute(delete(UnknownCluster).where(UnknownCluster.id == cid))
    return NameResult(unknown, name, created, min(len(vectors), NAME_MAX_EMBEDDINGS) or 1, len(events))


def merge_clusters(engine: Engine, keep: str, other: str) -> int:
    """Merge cluster ``other`` into cluster ``keep`` (both ``unknown-<n>``); returns the events moved."""
    a, b = _cluster_id(keep), _cluster_id(other)
    if a == b:
        raise ValueError(f"merge: {keep} into itself; name two different clusters")
    with _write(engine, f"merging {other} into {keep}") as conn:
        return merge_into(conn, a, [b])


@dataclass(frozen=True)
class RelabelResult:
    """What :func:`relabel_event` did.

    Attributes:
        event_id: the event.
        identity: its identity afterwards (None: unknown).
        unknown: its anonymous cluster afterwards (``unknown-<n>``) or None.
        negative_of: the identity a negative example was stored for, or None.
        added_to: the identity the face was added to, or None.
    """

    event_id: str
    identity: str | None
    unknown: str | None
    negative_of: str | None
    added_to: str | None


def _event_vector(conn: Connection, event_id: str) -> tuple[str, np.ndarray]:
    """``(model, (d,) float32 unit vector)``: the event's track-level face vector, else the mean of its faces."""
    t = TrackEmbedding
    rows = conn.execute(select(t.model, t.dim, t.vector, t.quality, t.frame_index).where(t.event_id == event_id)
                        .order_by(t.frame_index)).all()
    if not rows:
        raise ValueError(f"event {event_id} has no face embedding (no quality face was seen in its track); "
                         "only events with a face can be relabelled")
    if rows[0][4] == -1:
        return rows[0][0], bytes_to_vector(rows[0][2], rows[0][1])
    model = rows[0][0]
    faces = [r for r in rows if r[0] == model]
    tv = track_vector(np.stack([bytes_to_vector(r[2], r[1]) for r in faces]), np.array([r[3] for r in faces]),
                      min_faces=1, min_consistency=0.0)
    return model, tv.vector  # type: ignore[return-value]


def _leave_cluster(conn: Connection, cid: int, vector: np.ndarray) -> None:
    """Take one track's vector out of cluster ``cid`` (deleted when it was the last track)."""
    row = conn.execute(select(UnknownCluster.dim, UnknownCluster.vector, UnknownCluster.tracks)
                       .where(UnknownCluster.id == cid)).first()
    if row is None:
        return
    if row[2] <= 1:
        conn.execute(delete(UnknownCluster).where(UnknownCluster.id == cid))
        return
    rest = (bytes_to_vector(row[1], row[0]) - vector).astype(np.float32)
    conn.execute(update(UnknownCluster).where(UnknownCluster.id == cid).values(vector=vector_to_bytes(rest), tracks=row[2] - 1))


def _template_score(conn: Connection, identity_id: int, model: str, vector: np.ndarray) -> float:
    rows = conn.execute(select(FaceEmbedding.dim, FaceEmbedding.vector)
                        .where(FaceEmbedding.identity_id == identity_id, FaceEmbedding.model == model)).all()
    unit = np.stack([bytes_to_vector(v, d) for d, v in rows])
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    mean = unit.mean(axis=0)
    return float(vector @ (mean / max(float(np.linalg.norm(mean)), 1e-12)))


def relabel_event(engine: Engine, event_id: str, not_name: str | None = None, as_name: str | None = None,
                  assigner: UnknownAssigner | None = None) -> RelabelResult:
    """Correct one event (module docstring); ``assigner`` clusters an event that became unknown (None: it is left
    in no cluster).

    Raises:
        ValueError: neither ``not_name`` nor ``as_name``, the same name for both, no such event, no face
            embedding, ``not_name`` not enrolled, or a bad ``as_name``.
    """
    if not_name is None and as_name is None:
        raise ValueError("relabel needs --not NAME (a wrong name) and/or --as NAME (the right one)")
    if not_name is not None and not_name == as_name:
        raise ValueError(f"relabel: --not and --as both name {not_name!r}")
    with _write(engine, f"relabelling event {event_id}") as conn:
        row = conn.execute(select(Event.identity_id, Identity.name, Event.unknown_id).outerjoin(
            Identity, Identity.id == Event.identity_id).where(Event.id == event_id)).first()
        if row is None:
            raise NotFoundError(f"no event {event_id}; see facepro events")
        _, current, cid = row
        model, vector = _event_vector(conn, event_id)
        if not_name is not None:
            bad, _ = _identity_id(conn, not_name, create=False)
            if bad is None:
                raise NotFoundError(f"no identity named {not_name!r}; see facepro identities list")
            conn.execute(insert(FaceNegative).values(identity_id=bad, model=model, dim=int(vector.shape[0]),
                                                     vector=vector_to_bytes(vector), event_id=event_id, created_at=utcnow()))
            if current == not_name:
                conn.execute(update(Event).where(Event.id == event_id).values(identity_id=None, method=None, identity_score=0.0))
                current = None
        if as_name is not None:
            good, _ = _identity_id(conn, as_name, create=True)
            _check_gallery_dim(conn, model, int(vector.shape[0]))
            _add_embeddings(conn, good, model, [vector])
            if cid is not None:
                _leave_cluster(conn, cid, vector)
            conn.execute(update(Event).where(Event.id == event_id).values(
                identity_id=good, method="face", identity_score=_template_score(conn, good, model, vector), unknown_id=None))
            current, cid = as_name, None
        elif current is None and cid is None and assigner is not None:
            cid = assigner.assign(conn, [event_id]).get(event_id)
    return RelabelResult(event_id, current, unknown_name(cid) if cid is not None else None, not_name, as_name)
