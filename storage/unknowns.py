"""Anonymous identities ``unknown-<n>`` in the database: assignment when a track ends, consolidation, listing.

Who assigns: the storage process, the one writer of the database, inside the transaction that commits a
batch (:class:`UnknownAssigner`, called by :class:`storage.writer.EventWriter`). It is one process however
many recognition processes run, and it holds the write lock while it reads the clusters, assigns and
inserts, so two tracks can never both create ``unknown-5`` for different people, and a cluster created for
a track is visible to the next track at once. The state is only the ``unknown_clusters`` rows (sum of member
vectors, count, first/last seen), read at each assignment, so ids persist across runs and every code path
that changes clusters (naming, merging, retention, ``facepro events relabel``) is seen by the next batch. On a
PostgreSQL server shared by several boxes the cluster rows are read ``FOR UPDATE``; two boxes that see a
new person at the same moment may open two clusters, which consolidation merges later.

When: an event is clustered when it is committed ended, labelled ``person``, without an identity and in no
cluster yet. Its face embeddings (quality-gated faces recognition sent, all stored in ``track_embeddings``
with their frame index and detector score) give one track-level vector (:func:`storage.clustering.track_vector`),
which is stored as the event's ``frame_index = -1`` face row and assigned by the leader rule
(:class:`storage.clustering.OnlineClusters`). A re-sent ended update finds the event already clustered and
changes nothing. Clusters are per embedder model.

Consolidation (:func:`consolidate_clusters`, run by the storage process every
``recognition.face.unknowns.consolidate_interval_s`` and at its end) merges clusters whose centroids came
together, into the oldest one (:func:`storage.clustering.consolidate`).

Raises (every function taking an engine):
    StorageError: locked or unreachable database, failed statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Iterator

import numpy as np
from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from storage.clustering import CLUSTER_THRESHOLD, OnlineClusters, consolidate, track_vector
from storage.db import dialect_insert, storage_errors
from storage.models import Event, TrackEmbedding, UnknownCluster, bytes_to_vector, utcnow, vector_to_bytes

#: ``unknown-<n>``: the name of cluster ``n``.
UNKNOWN_NAME = re.compile(r"^unknown-([1-9][0-9]{0,17})$")
_IN_CHUNK = 500


def unknown_name(cluster_id: int) -> str:
    """The anonymous identity name of cluster ``cluster_id``: ``unknown-<id>``."""
    return f"unknown-{int(cluster_id)}"


def parse_unknown(name: str) -> int | None:
    """The cluster id of an ``unknown-<n>`` name, None for any other string."""
    m = UNKNOWN_NAME.match(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def _chunks(values: Iterable[str], size: int = _IN_CHUNK) -> Iterator[list[str]]:
    ordered = sorted(set(values))
    for i in range(0, len(ordered), size):
        yield ordered[i : i + size]


@dataclass(frozen=True)
class UnknownSettings:
    """Clustering settings (``recognition.face.unknowns``; see :mod:`storage.clustering`).

    Attributes:
        threshold: cosine similarity to the nearest centroid needed to join a cluster.
        merge_threshold: average cosine similarity at which consolidation merges clusters.
        min_faces: quality faces a track needs to be clustered.
        best_faces: the highest-quality faces averaged into the track vector.
        min_consistency: norm of the mean of those faces' unit vectors below which the track is noise.
    """

    threshold: float = CLUSTER_THRESHOLD
    merge_threshold: float = CLUSTER_THRESHOLD
    min_faces: int = 2
    best_faces: int = 5
    min_consistency: float = 0.6


@dataclass
class UnknownCounts:
    """Cumulative counters of an :class:`UnknownAssigner` (``facepro status`` of the storage process)."""

    unknown_tracks: int = 0  # tracks put into a cluster
    unknown_clusters_created: int = 0
    unknown_skipped_few_faces: int = 0
    unknown_skipped_inconsistent: int = 0
    unknown_clusters_merged: int = 0  # clusters merged away by consolidation

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Track:
    event_id: str
    started_at: datetime
    ended_at: datetime
    model: str = ""
    vectors: list[np.ndarray] = field(default_factory=list)
    qualities: list[float] = field(default_factory=list)


class UnknownAssigner:
    """Clusters the unnamed person events of a committed batch (module docstring); used inside a transaction.

    Args:
        settings: thresholds and track rules.
    """

    def __init__(self, settings: UnknownSettings = UnknownSettings()) -> None:
        self.settings = settings
        self.counts = UnknownCounts()
        self._cache: dict[tuple[str, int], tuple[tuple[int, int, int], OnlineClusters]] = {}

    def assign(self, conn: Connection, event_ids: Iterable[str]) -> dict[str, int]:
        """Cluster those of ``event_ids`` that are ended unnamed person events in no cluster, in ``conn``'s
        transaction (the caller holds the write lock). Returns ``{event id: cluster id}`` of the events clustered."""
        tracks = _candidates(conn, event_ids)
        if not tracks:
            return {}
        by_model: dict[str, list[tuple[_Track, np.ndarray]]] = {}
        for t in sorted(tracks, key=lambda t: (t.started_at, t.event_id)):
            s = self.settings
            tv = track_vector(np.stack(t.vectors), np.array(t.qualities), s.best_faces, s.min_faces, s.min_consistency)
            if tv.vector is None:
                if tv.reason == "few_faces":
                    self.counts.unknown_skipped_few_faces += 1
                else:
                    self.counts.unknown_skipped_inconsistent += 1
                continue
            by_model.setdefault(t.model, []).append((t, tv.vector))
        done: dict[str, int] = {}
        for model, items in by_model.items():
            done.update(self._assign_model(conn, model, items))
        return done

    def _assign_model(self, conn: Connection, model: str, items: list[tuple[_Track, np.ndarray]]) -> dict[str, int]:
        dim = int(items[0][1].shape[0])
        online = self._clusters(conn, model, dim)
        members: dict[int, list[_Track]] = {}
        for track, vector in items:
            members.setdefault(online.assign(vector).key, []).append(track)
        _store_track_vectors(conn, model, items, self.settings.best_faces)
        ids = _write_clusters(conn, model, online, members)
        online.keys = [ids.get(k, k) for k in online.keys]  # the new clusters' database ids
        out: dict[str, int] = {}
        for key, tracks in members.items():
            conn.execute(update(Event).where(Event.id.in_([t.event_id for t in tracks])).values(unknown_id=ids[key]))
            out.update({t.event_id: ids[key] for t in tracks})
        # what the database holds once this transaction commits (a rollback leaves another fingerprint: reloaded)
        self._cache[(model, dim)] = (_fingerprint(conn, model, dim), online)
        self.counts.unknown_tracks += len(items)
        self.counts.unknown_clusters_created += sum(1 for k in members if k < 0)
        return out

    def _clusters(self, conn: Connection, model: str, dim: int) -> OnlineClusters:
        """The ``model`` clusters: the cached ones while the database's fingerprint is what this assigner left,
        else read again (another process named, merged, relabelled or deleted clusters, or a transaction of
        this one rolled back)."""
        cached = self._cache.pop((model, dim), None)  # put back only by a complete assignment (see _assign_model)
        if cached is not None and cached[0] == _fingerprint(conn, model, dim, lock=True):
            cached[1].threshold = self.settings.threshold
            return cached[1]
        stored = load_clusters(conn, model, dim, lock=True)
        return OnlineClusters(stored.ids, stored.sums, stored.counts, self.settings.threshold)


def _fingerprint(conn: Connection, model: str, dim: int, lock: bool = False) -> tuple[int, int, int]:
    """``(clusters, largest id, total tracks)`` of one model: every change of the clusters changes it (a new
    cluster raises the largest id, an assignment the tracks, a merge or deletion the count, a relabel the
    tracks); read from the covering index ``ix_unknown_clusters_model_dim_tracks``."""
    c = UnknownCluster
    stmt = select(func.count(), func.coalesce(func.max(c.id), 0), func.coalesce(func.sum(c.tracks), 0)).where(
        c.model == model, c.dim == dim)
    if lock and conn.dialect.name == "postgresql":  # another box's transaction on the same rows waits for ours
        conn.execute(select(c.id).where(c.model == model, c.dim == dim).with_for_update())
    return tuple(int(v) for v in conn.execute(stmt).one())  # type: ignore[return-value]


def _candidates(conn: Connection, event_ids: Iterable[str]) -> list[_Track]:
    """Ended person events without identity or cluster among ``event_ids``, with their per-frame face vectors."""
    tracks: dict[str, _Track] = {}
    for part in _chunks(event_ids):
        rows = conn.execute(select(Event.id, Event.started_at, Event.ended_at).where(
            Event.id.in_(part), Event.ended.is_(True), Event.label == "person", Event.identity_id.is_(None),
            Event.unknown_id.is_(None))).all()
        tracks.update({r[0]: _Track(r[0], r[1], r[2]) for r in rows})
    if not tracks:
        return []
    faces: dict[tuple[str, str], list[tuple[np.ndarray, float]]] = {}
    t = TrackEmbedding
    for part in _chunks(tracks):
        stmt = select(t.event_id, t.model, t.dim, t.vector, t.quality).where(t.event_id.in_(part), t.frame_index >= 0)
        for event_id, model, dim, blob, quality in conn.execute(stmt):
            faces.setdefault((event_id, model), []).append((bytes_to_vector(blob, dim), float(quality)))
    out = []
    for (event_id, model), rows in faces.items():
        track = tracks[event_id]
        if len(rows) > len(track.vectors):  # one model per event in practice; else the one with most faces
            track.model, track.vectors, track.qualities = model, [v for v, _ in rows], [q for _, q in rows]
    for track in tracks.values():
        if track.vectors:
            out.append(track)
        # an event with no face at all is no face track: nothing to count
    return out


@dataclass(frozen=True)
class StoredClusters:
    """The clusters of one model as stored: ids (oldest first), ``(k, d) float64`` sums and ``(k,)`` counts."""

    ids: list[int]
    sums: np.ndarray
    counts: np.ndarray


def load_clusters(conn: Connection, model: str, dim: int, lock: bool = False) -> StoredClusters:
    """The ``model`` clusters of dimension ``dim``, oldest first; ``lock``: ``FOR UPDATE`` on PostgreSQL
    (SQLite's write lock is already the caller's)."""
    c = UnknownCluster
    stmt = select(c.id, c.vector, c.tracks).where(c.model == model, c.dim == dim).order_by(c.id)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    rows = conn.execute(stmt).all()
    sums = (np.frombuffer(b"".join(r[1] for r in rows), "<f4").reshape(len(rows), dim).astype(np.float64)
            if rows else np.zeros((0, dim)))
    return StoredClusters([r[0] for r in rows], sums, np.array([r[2] for r in rows], np.int64))


def _store_track_vectors(conn: Connection, model: str, items: list[tuple[_Track, np.ndarray]], best: int) -> None:
    """The track-level face vector of each event as its ``frame_index = -1`` face row (kept with the event);
    its quality is the mean detector score of the faces averaged."""
    now = utcnow()
    rows = [{"event_id": t.event_id, "kind": "face", "model": model, "dim": int(v.shape[0]),
             "vector": vector_to_bytes(v.astype(np.float32)), "frame_index": -1,
             "quality": float(np.mean(sorted(t.qualities, reverse=True)[:best])), "created_at": now} for t, v in items]
    ins = dialect_insert(conn)(TrackEmbedding).on_conflict_do_nothing(index_elements=["event_id", "model", "frame_index"])
    conn.execute(ins, rows)


def _write_clusters(conn: Connection, model: str, online: OnlineClusters, members: dict[int, list[_Track]]) -> dict[int, int]:
    """Insert the new clusters (in creation order: their ids grow in that order) and update the joined ones
    (sum, tracks, first/last seen widened by their new tracks); returns ``{key: database id}``."""
    c = UnknownCluster
    row = {k: i for i, k in enumerate(online.keys)}
    old = [k for k in members if k > 0]
    seen = {r[0]: (r[1], r[2]) for r in conn.execute(select(c.id, c.first_seen, c.last_seen).where(c.id.in_(old)))} if old else {}
    ids: dict[int, int] = {}
    now = utcnow()
    for key in sorted(members, key=lambda k: (k < 0, -k if k < 0 else k)):
        tracks = members[key]
        before = [seen[key]] if key in seen else []
        first = min([t.started_at for t in tracks] + [b[0] for b in before])
        last = max([t.ended_at for t in tracks] + [b[1] for b in before])
        i = row[key]
        values = {"vector": vector_to_bytes(online.sums[i].astype(np.float32)), "tracks": int(online.counts[i]),
                  "first_seen": first, "last_seen": last}
        if key > 0:
            conn.execute(update(c).where(c.id == key).values(**values))
            ids[key] = key
        else:
            res = conn.execute(insert(c).values(model=model, dim=int(online.sums.shape[1]), created_at=now, **values))
            ids[key] = int(res.inserted_primary_key[0])
    return ids


# ------------------------------------------------------------ merging


def merge_into(conn: Connection, keep: int, others: list[int]) -> int:
    """Merge clusters ``others`` into cluster ``keep`` (same model) in ``conn``'s transaction: sums and track
    counts add up, first/last seen widen, the others' events move to ``keep``, the others are deleted.
    Returns the events moved.

    Raises:
        ValueError: a cluster does not exist, or the models or dimensions differ.
    """
    c = UnknownCluster
    rows = {r[0]: r for r in conn.execute(select(c.id, c.model, c.dim, c.vector, c.tracks, c.first_seen, c.last_seen)
                                          .where(c.id.in_([keep, *others])))}
    for cid in (keep, *others):
        if cid not in rows:
            raise ValueError(f"no cluster {unknown_name(cid)}; see facepro identities list --unknown")
    if len({(rows[i][1], rows[i][2]) for i in (keep, *others)}) > 1:
        raise ValueError(f"{unknown_name(keep)} and {', '.join(map(unknown_name, others))} come from different face models")
    group = [rows[i] for i in (keep, *others)]
    total = np.sum([bytes_to_vector(r[3], r[2]) for r in group], axis=0).astype(np.float32)
    conn.execute(update(c).where(c.id == keep).values(
        vector=vector_to_bytes(total), tracks=sum(int(r[4]) for r in group),
        first_seen=min(r[5] for r in group), last_seen=max(r[6] for r in group)))
    moved = conn.execute(update(Event).where(Event.unknown_id.in_(others)).values(unknown_id=keep)).rowcount
    conn.execute(delete(c).where(c.id.in_(others)))
    return int(moved)


def consolidate_clusters(engine: Engine, merge_threshold: float = CLUSTER_THRESHOLD) -> int:
    """Merge clusters whose centroids came together (:func:`storage.clustering.consolidate`), each group into its
    oldest cluster, per model. Returns the clusters merged away.

    The groups are computed from a plain read (about 1-2 s for 10,000 clusters on this machine), outside the
    write lock, so the storage process's commits do not wait for it; the merge then runs in one short write
    transaction only if the model's clusters did not change meanwhile (:func:`_fingerprint`), else that model
    waits for the next round.
    """
    merged = 0
    with storage_errors(engine.url, "consolidating unknown-face clusters"):
        with engine.connect() as conn:
            models = conn.execute(select(UnknownCluster.model, UnknownCluster.dim).distinct()).all()
        for model, dim in models:
            with engine.connect() as conn:
                before = _fingerprint(conn, model, dim)
                stored = load_clusters(conn, model, dim)
            groups = consolidate(stored.sums, merge_threshold)
            if not groups:
                continue
            with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
                if _fingerprint(conn, model, dim, lock=True) != before:
                    continue  # changed while computing: next round
                for group in groups:
                    merge_into(conn, stored.ids[group[0]], [stored.ids[i] for i in group[1:]])
                    merged += len(group) - 1
    return merged


def prune_empty_clusters(conn: Connection) -> int:
    """Delete the clusters no event belongs to any more (retention removed them all); returns how many."""
    used = select(Event.unknown_id).where(Event.unknown_id.is_not(None)).distinct()
    return int(conn.execute(delete(UnknownCluster).where(UnknownCluster.id.not_in(used))).rowcount)


# ------------------------------------------------------------ listing


@dataclass(frozen=True)
class UnknownRow:
    """One anonymous identity as listed (``facepro identities list --unknown``, ``GET /api/unknowns``).

    Attributes:
        name: ``unknown-<id>``.
        model: face embedder model of its vectors.
        tracks: tracks assigned to it since it was created (expired ones included).
        events: its events still stored.
        first_seen, last_seen: aware UTC, over every track it was given.
        sample_event: the stored event with a snapshot whose track had the best face quality (the sample
            face: ``GET /api/events/{id}/snapshot.jpg``), None when none of its events has one.
        sample_snapshot: that event's snapshot path.
    """

    name: str
    model: str
    tracks: int
    events: int
    first_seen: datetime
    last_seen: datetime
    sample_event: str | None
    sample_snapshot: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "tracks": self.tracks, "events": self.events,
                "first_seen": self.first_seen.isoformat(), "last_seen": self.last_seen.isoformat(),
                "sample_event": self.sample_event, "sample_snapshot": self.sample_snapshot}


def list_unknowns(engine: Engine) -> list[UnknownRow]:
    """Every anonymous identity, most recently seen first."""
    c, e, t = UnknownCluster, Event, TrackEmbedding
    counts = select(e.unknown_id, func.count()).where(e.unknown_id.is_not(None)).group_by(e.unknown_id)
    samples = (select(e.unknown_id, e.id, e.snapshot_path, t.quality)
               .join(t, (t.event_id == e.id) & (t.frame_index == -1))
               .where(e.unknown_id.is_not(None), e.snapshot_path.is_not(None)))
    with storage_errors(engine.url, "listing unknown faces"), engine.connect() as conn:
        clusters = conn.execute(select(c.id, c.model, c.tracks, c.first_seen, c.last_seen)
                                .order_by(c.last_seen.desc(), c.id.desc())).all()
        n_events = dict(conn.execute(counts).tuples().all())
        best: dict[int, tuple[float, str, str]] = {}
        for cid, event_id, path, quality in conn.execute(samples):
            if cid not in best or (quality, event_id) > best[cid][:2]:
                best[cid] = (float(quality), event_id, path)
    return [UnknownRow(unknown_name(cid), model, int(tracks), int(n_events.get(cid, 0)), first, last,
                       best[cid][1] if cid in best else None, best[cid][2] if cid in best else None)
            for cid, model, tracks, first, last in clusters]
