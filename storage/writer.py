"""Batched, idempotent writes of track updates and embeddings.

:class:`EventWriter` buffers :class:`pipeline.messages.TrackUpdate` and
:class:`pipeline.messages.EmbeddingRecord` messages and writes them in one
transaction per :meth:`EventWriter.flush`:

- events are upserted by ``event_id``; re-sending an update is a no-op, and an
  update older than the stored row (smaller ``last_frame``) is ignored, and an
  ended event stays ended (a re-sent update of the same frame cannot reopen it). An
  applied update keeps the earliest ``started_at``/``first_frame`` and the
  highest ``best_score`` of the row and the update;
- several updates of one event in a batch collapse into one row: the state
  of the one with the largest ``last_frame`` (the later one on ties), the
  earliest ``first_seen_ns``/``first_frame`` and the highest ``best_score``;
- camera rows are created on demand; identity names are resolved to ids,
  and a name that is not enrolled is stored as NULL and counted in
  :attr:`EventWriter.unknown_identity` (only enrollment creates identities);
- embeddings are inserted after the events of their batch, into the table of
  their kind (:data:`storage.models.EMBEDDING_TABLES`: ``face`` into
  ``track_embeddings``, ``reid`` into ``reid_embeddings``, ``gait`` into
  ``gait_embeddings``); an embedding whose event is neither in the batch nor
  in the database is dropped and counted in
  :attr:`EventWriter.orphan_embeddings` (send the event's update first);
- an update with a ``snapshot_path`` adds a ``snapshots`` row (once per
  event and path; re-sending it is a no-op) with the file's size in bytes
  (NULL when the file cannot be read when the batch is written);
- with ``outbox_box_id`` set (``mqtt`` configured), the same transaction
  writes the MQTT outbox rows of the batch's event changes
  (:func:`storage.outbox.record_changes`: new / update / end, compared
  with the rows as they were before the batch).
- with an ``unknowns`` assigner (:class:`storage.unknowns.UnknownAssigner`), the same transaction clusters
  the batch's ended person events that have no identity into anonymous ``unknown-<n>`` identities (after
  the embeddings are inserted, before the outbox rows are written, so an ``end`` message carries the cluster).
- a writer given a ``job_id`` (the storage process of an analysis job's
  pipeline) stores it in ``events.job_id`` of the events it creates; an
  update never changes it.

A flush that fails leaves the pending rows in place, so the caller can retry.

On SQLite the batch statements are compiled once and run through the
driver's ``executemany`` with values already in their stored form (times as
SQLAlchemy's naive-UTC text), skipping SQLAlchemy's per-row bind processing;
PostgreSQL uses SQLAlchemy Core (its batched ``insertmanyvalues``).
"""

from __future__ import annotations

import os
import re
import time
from operator import itemgetter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

from sqlalchemy import Connection, Engine, Executable, bindparam, func, insert, or_, select, update

from pipeline.messages import EmbeddingRecord, TrackUpdate
from storage.db import StorageError, dialect_insert, is_transient, storage_errors
from storage.outbox import event_states, record_changes
from storage.models import (
    EMBEDDING_TABLES,
    JOB_ID_LEN,
    LABEL_LEN,
    MODEL_LEN,
    NAME_LEN,
    PATH_LEN,
    Base,
    Camera,
    Event,
    Identity,
    Snapshot,
    utcnow,
    vector_to_bytes,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_IN_CHUNK = 500


def ns_to_datetime(ns: int) -> datetime:
    """Convert ``time.time_ns()`` nanoseconds to an aware UTC datetime (microsecond precision, truncated)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _check_len(what: str, value: str | None, limit: int) -> None:
    if value is not None and not 0 < len(value) <= limit:
        raise ValueError(f"{what}: expected 1 to {limit} characters, got {len(value)} ({value[:40]!r})")


def _check_event_id(what: str, event_id: str) -> None:
    if not _HEX32.match(event_id):
        raise ValueError(f"{what}.event_id: expected 32 lowercase hex characters (a UUID's hex, see new_event_id), got {event_id!r}")


def _merge(old: TrackUpdate, new: TrackUpdate) -> TrackUpdate:
    """Collapse two updates of one event: the newer state (by last_frame, ties to ``new``), earliest start, best score."""
    latest = new if new.last_frame >= old.last_frame else old
    return replace(
        latest,
        ended=old.ended or new.ended,
        first_seen_ns=min(old.first_seen_ns, new.first_seen_ns),
        first_frame=min(old.first_frame, new.first_frame),
        best_score=max(old.best_score, new.best_score),
    )


@dataclass
class _Pending:
    events: dict[str, TrackUpdate]
    embeddings: list[tuple[EmbeddingRecord, bytes]]  # with the vector's stored bytes
    since: float | None = None  # clock() when the oldest pending item was added

    @property
    def rows(self) -> int:
        return len(self.events) + len(self.embeddings)


class EventWriter:
    """Buffers track updates and embeddings and writes them in batches.

    Args:
        engine: from :func:`storage.db.open_engine`, schema at head
            (:func:`storage.db.upgrade`).
        batch_rows: :meth:`due` turns true at this many pending rows (>= 1).
        batch_ms: :meth:`due` turns true when the oldest pending row is this
            old, milliseconds (>= 1).
        retries: extra attempts of a flush that hit a transient lock. Each
            SQLite attempt already waits up to the engine's busy timeout, so
            a flush blocks at most ``(retries + 1) * busy_timeout`` plus the
            backoff (about 15 s with the defaults) before raising.
        backoff_s: first retry delay, seconds; doubles each retry.
        clock: monotonic seconds (tests inject a fake one).
        sleep: called with the retry delay, seconds.
        outbox_box_id: write MQTT outbox rows carrying this ``box_id`` with every
            event change; None (no ``mqtt`` config): no outbox rows.
        job_id: the analysis job (canonical UUID text, 36 characters) whose events these are; None for live runs.
        unknowns: clusters unnamed person tracks as they end (module docstring); None: no clustering.

    Raises:
        ValueError: a bound out of range, or a ``job_id`` that is not 36 characters.

    Counters (cumulative): :attr:`rows_written`, :attr:`flushes`,
    :attr:`unknown_identity`, :attr:`orphan_embeddings`, :attr:`outbox_rows`.
    """

    def __init__(
        self,
        engine: Engine,
        batch_rows: int = 500,
        batch_ms: int = 200,
        *,
        retries: int = 2,
        backoff_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        outbox_box_id: str | None = None,
        job_id: str | None = None,
        unknowns: Any = None,
    ) -> None:
        if job_id is not None and len(job_id) != JOB_ID_LEN:
            raise ValueError(f"EventWriter.job_id: expected a canonical UUID ({JOB_ID_LEN} characters), got {job_id!r}")
        if batch_rows < 1:
            raise ValueError(f"EventWriter.batch_rows: expected >= 1, got {batch_rows}")
        if batch_ms < 1:
            raise ValueError(f"EventWriter.batch_ms: expected >= 1, got {batch_ms}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"EventWriter: retries ({retries}) and backoff_s ({backoff_s}) must be >= 0")
        self.engine = engine
        self.job_id = job_id
        self.batch_rows = batch_rows
        self.batch_ms = batch_ms
        self.retries = retries
        self.backoff_s = backoff_s
        self._clock = clock
        self._sleep = sleep
        self._pending = _Pending({}, [])
        self._cameras: dict[str, int] = {}
        self.rows_written = 0
        self.flushes = 0
        self.unknown_identity = 0
        self.orphan_embeddings = 0
        self.outbox_box_id = outbox_box_id
        self.outbox_rows = 0
        self.unknowns = unknowns

    # ------------------------------------------------------------- buffering

    @property
    def pending(self) -> int:
        """Rows waiting for :meth:`flush` (collapsed events + embeddings)."""
        return self._pending.rows

    def oldest_wait_ms(self) -> float:
        """Age of the oldest pending row, milliseconds (0 when nothing is pending)."""
        since = self._pending.since
        return 0.0 if since is None else (self._clock() - since) * 1000.0

    def due(self) -> bool:
        """True when a flush should run: ``pending >= batch_rows`` or the oldest pending row is ``batch_ms`` old."""
        pending = self._pending  # called after every received item: kept to a few operations
        n = len(pending.events) + len(pending.embeddings)
        if n == 0:
            return False
        return n >= self.batch_rows or (self._clock() - pending.since) * 1000.0 >= self.batch_ms  # type: ignore[operator]

    def _mark(self) -> None:
        if self._pending.since is None:
            self._pending.since = self._clock()

    def add_update(self, u: TrackUpdate) -> None:
        """Queue an event's state; merges with a pending update of the same event.

        Raises:
            ValueError: malformed event id, or a name/path longer than its column.
        """
        _check_event_id("TrackUpdate", u.event_id)
        _check_len("TrackUpdate.camera", u.camera, NAME_LEN)
        _check_len("TrackUpdate.label", u.label, LABEL_LEN)
        _check_len("TrackUpdate.identity", u.identity, NAME_LEN)
        _check_len("TrackUpdate.snapshot_path", u.snapshot_path, PATH_LEN)
        old = self._pending.events.get(u.event_id)
        self._pending.events[u.event_id] = u if old is None else _merge(old, u)
        self._mark()

    def add_embedding(self, r: EmbeddingRecord) -> None:
        """Queue an embedding of an event (send the event's update first).

        Raises:
            ValueError: malformed event id, empty or non-finite vector, model name too long.
        """
        _check_event_id("EmbeddingRecord", r.event_id)
        _check_len("EmbeddingRecord.model", r.model, MODEL_LEN)
        blob = vector_to_bytes(r.vector)  # validate now, so a bad record never poisons a batch
        self._pending.embeddings.append((r, blob))
        self._mark()

    def discard(self) -> int:
        """Drop every pending row (after a flush failed for good); returns how many were dropped."""
        n = self.pending
        self._pending = _Pending({}, [])
        return n

    # ---------------------------------------------------------------- flushing

    def flush(self) -> int:
        """Write every pending row in one transaction.

        Transient lock errors are retried ``retries`` times with exponential backoff.

        Returns:
            Rows written: events upserted + embeddings inserted (0 when nothing was pending).

        Raises:
            StorageError: the database stayed locked, or the write failed; the
                pending rows are kept for a later flush (or :meth:`discard`).
        """
        if self.pending == 0:
            return 0
        written, cameras = self._write_with_retries()
        self._cameras.update(cameras)
        self._pending = _Pending({}, [])
        self.rows_written += written
        self.flushes += 1
        return written

    def _write_with_retries(self) -> tuple[int, dict[str, int]]:
        attempt = 0
        while True:
            try:
                with storage_errors(self.engine.url, "writing events"):
                    return self._write_once()
            except StorageError as err:
                if not is_transient(err.__cause__) or attempt >= self.retries:
                    raise
                self._sleep(self.backoff_s * (2**attempt))
                attempt += 1

    def _write_once(self) -> tuple[int, dict[str, int]]:
        events = list(self._pending.events.values())
        embeddings = list(self._pending.embeddings)
        snapshots = _snapshot_rows(events)  # file sizes are read before the write lock is taken
        with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
            cameras = self._camera_ids(conn, {u.camera for u in events})
            identities = _identity_ids(conn, {u.identity for u in events if u.identity is not None})
            unknown = sum(1 for u in events if u.identity is not None and u.identity not in identities)
            ids = [u.event_id for u in events]
            before = event_states(conn, ids) if self.outbox_box_id is not None else None
            _upsert_events(conn, events, cameras, identities, self.job_id)
            _insert_snapshots(conn, snapshots)
            kept = _existing_event_embeddings(conn, embeddings, {u.event_id for u in events})
            _insert_embeddings(conn, kept)
            if self.unknowns is not None:  # ended tracks, and faces that arrived after their track's end
                self.unknowns.assign(conn, {u.event_id for u in events if u.ended and u.label == "person"}
                                     | {r.event_id for r, _ in kept if r.kind == "face"})
            outbox = record_changes(conn, ids, before, self.outbox_box_id) if before is not None else 0
        self.outbox_rows += outbox
        self.unknown_identity += unknown
        self.orphan_embeddings += len(embeddings) - len(kept)
        return len(events) + len(kept), cameras

    def _camera_ids(self, conn: Connection, names: set[str]) -> dict[str, int]:
        ids = {n: self._cameras[n] for n in names if n in self._cameras}
        missing = names - ids.keys()
        if not missing:
            return ids
        insert = dialect_insert(conn)
        now = utcnow()
        conn.execute(
            insert(Camera).on_conflict_do_nothing(index_elements=["name"]),
            [{"name": n, "created_at": now} for n in sorted(missing)],
        )
        for part in _chunks(missing):
            ids.update({n: i for n, i in conn.execute(select(Camera.name, Camera.id).where(Camera.name.in_(part)))})
        return ids


def _chunks(values: set[str] | list[str], size: int = _IN_CHUNK) -> Iterator[list[str]]:
    """Sorted ``values`` in lists of at most ``size`` (keeps IN (...) under SQLite's parameter limit)."""
    ordered = sorted(values)
    for i in range(0, len(ordered), size):
        yield ordered[i : i + size]


def _identity_ids(conn: Connection, names: set[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for part in _chunks(names):
        ids.update({n: i for n, i in conn.execute(select(Identity.name, Identity.id).where(Identity.name.in_(part)))})
    return ids


#: Column order of :func:`_event_values`.
_EVENT_KEYS: tuple[str, ...] = (
    "id", "camera_id", "track_id", "label", "started_at", "ended_at", "first_frame", "last_frame", "best_score",
    "x1", "y1", "x2", "y2", "identity_id", "method", "identity_score", "snapshot_path", "ended", "job_id",
)


_NEW_EVENT_KEYS: tuple[str, ...] = tuple(f"new_{k}" for k in _EVENT_KEYS)


def _event_values(u: TrackUpdate, cameras: dict[str, int], identities: dict[str, int],
                  when: Callable[[int], Any], job_id: str | None = None) -> tuple[Any, ...]:
    """One ``events`` row in :data:`_EVENT_KEYS` order; ``when`` turns nanoseconds into the stored time value."""
    x1, y1, x2, y2 = u.xyxy.tolist()
    return (
        u.event_id, cameras[u.camera], int(u.track_id), u.label, when(u.first_seen_ns), when(u.last_seen_ns),
        int(u.first_frame), int(u.last_frame), float(u.best_score), x1, y1, x2, y2,
        identities.get(u.identity) if u.identity is not None else None,
        u.method, float(u.identity_score), u.snapshot_path, bool(u.ended), job_id,
    )


def _event_row(u: TrackUpdate, cameras: dict[str, int], identities: dict[str, int],
               job_id: str | None = None) -> dict[str, Any]:
    """One ``events`` row as a mapping (SQLAlchemy Core parameters, aware UTC datetimes)."""
    return dict(zip(_EVENT_KEYS, _event_values(u, cameras, identities, ns_to_datetime, job_id)))


def _upsert_events_stmt(conn: Connection) -> Executable:
    """INSERT ... ON CONFLICT (id) DO UPDATE keeping the newest state, earliest start and best score."""
    stmt = dialect_insert(conn)(Event)
    new = stmt.excluded
    least, greatest = (func.min, func.max) if conn.dialect.name == "sqlite" else (func.least, func.greatest)
    keep_state = {c: getattr(new, c) for c in (
        "camera_id", "track_id", "label", "ended_at", "last_frame", "x1", "y1", "x2", "y2",
        "identity_id", "method", "identity_score", "snapshot_path",
    )}
    return stmt.on_conflict_do_update(
        index_elements=[Event.id],
        set_={
            **keep_state,
            "ended": or_(Event.ended, new.ended),  # an ended event never reopens (a re-sent older update)
            "started_at": least(Event.started_at, new.started_at),
            "first_frame": least(Event.first_frame, new.first_frame),
            "best_score": greatest(Event.best_score, new.best_score),
        },
        where=new.last_frame >= Event.last_frame,  # an older update never overwrites a newer row
    )


def _update_events_stmt() -> Executable:
    """UPDATE of stored events with the same rules as :func:`_upsert_events_stmt`'s DO UPDATE.

    Bind names are ``new_<column>`` (:data:`_EVENT_KEYS`), ``new_id`` selects the row.
    """
    new = {k: bindparam(f"new_{k}") for k in _EVENT_KEYS}
    keep_state = {c: new[c] for c in (
        "camera_id", "track_id", "label", "ended_at", "last_frame", "x1", "y1", "x2", "y2",
        "identity_id", "method", "identity_score", "snapshot_path",
    )}
    return (
        update(Event)
        .where(Event.id == new["id"], new["last_frame"] >= Event.last_frame)  # never overwrite a newer row
        .values(
            **keep_state,
            ended=or_(Event.ended, new["ended"]),
            started_at=func.min(Event.started_at, new["started_at"]),
            first_frame=func.min(Event.first_frame, new["first_frame"]),
            best_score=func.max(Event.best_score, new["best_score"]),
        )
    )


def _stored_event_ids(conn: Connection, ids: set[str]) -> set[str]:
    """Which of ``ids`` already have an ``events`` row."""
    found: set[str] = set()
    for part in _chunks(ids):
        found.update(conn.execute(select(Event.id).where(Event.id.in_(part))).scalars())
    return found


def _upsert_events(conn: Connection, events: list[TrackUpdate], cameras: dict[str, int], identities: dict[str, int],
                   job_id: str | None = None) -> None:
    """Insert new events and apply updates to stored ones (one transaction, the caller's).

    PostgreSQL runs one ``INSERT ... ON CONFLICT DO UPDATE``. SQLite looks up
    which events are stored, then runs a plain INSERT for the new ones and an
    UPDATE with the same rules for the others: an upsert whose DO UPDATE
    assigns indexed columns makes SQLite's *every* insert slower, even when
    nothing conflicts (plain sqlite3, 60k new events with their embeddings on
    this machine: 26k events/s with that upsert, 37k with the plain INSERT;
    scripts/bench_storage.py's ``sqlite_ceiling`` runs the latter). The write lock is held
    from the lookup on (``BEGIN IMMEDIATE``, the only writer), so nothing can
    change in between.
    """
    if not events:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(_upsert_events_stmt(conn), [_event_row(u, cameras, identities, job_id) for u in events])
        return
    when = SqliteTimes().text
    stored = _stored_event_ids(conn, {u.event_id for u in events})
    rows = [_event_values(u, cameras, identities, when, job_id) for u in events]
    fresh = [row for row, u in zip(rows, events) if u.event_id not in stored]
    known = [row for row, u in zip(rows, events) if u.event_id in stored]
    _execute_many_sqlite(conn, "insert events", lambda: insert(Event), _EVENT_KEYS, fresh)
    _execute_many_sqlite(conn, "update events", _update_events_stmt, _NEW_EVENT_KEYS, known)


def _existing_event_embeddings(
    conn: Connection, records: list[tuple[EmbeddingRecord, bytes]], batch_ids: set[str]
) -> list[tuple[EmbeddingRecord, bytes]]:
    known = set(batch_ids)
    for part in _chunks({r.event_id for r, _ in records} - batch_ids):
        known.update(conn.execute(select(Event.id).where(Event.id.in_(part))).scalars())
    return [(r, b) for r, b in records if r.event_id in known]


#: Column order of embedding rows (``kind`` only in ``track_embeddings``).
_VECTOR_KEYS: tuple[str, ...] = ("event_id", "model", "dim", "vector", "frame_index", "quality", "created_at")


def _insert_embeddings(conn: Connection, records: list[tuple[EmbeddingRecord, bytes]]) -> None:
    if not records:
        return
    sqlite = conn.dialect.name == "sqlite"
    now = utcnow()
    stamp = sqlite_time(now) if sqlite else now
    by_table: dict[str, list[tuple[Any, ...]]] = {}
    for r, blob in records:
        row = (r.event_id, r.model, len(blob) // 4, blob, int(r.frame_index), float(r.quality), stamp)
        by_table.setdefault(EMBEDDING_TABLES[r.kind], []).append(row + ("face",) if r.kind == "face" else row)
    for table, rows in by_table.items():
        keys = _VECTOR_KEYS + ("kind",) if table == EMBEDDING_TABLES["face"] else _VECTOR_KEYS
        if sqlite:
            _execute_many_sqlite(conn, f"insert {table}", lambda t=table: _insert_vectors_stmt(conn, t), keys, rows)
        else:
            conn.execute(_insert_vectors_stmt(conn, table), [dict(zip(keys, row)) for row in rows])


def _insert_vectors_stmt(conn: Connection, table: str) -> Executable:
    # Idempotent: delivery to storage is at-least-once, the natural key drops repeats.
    insert = dialect_insert(conn)
    return insert(Base.metadata.tables[table]).on_conflict_do_nothing(index_elements=["event_id", "model", "frame_index"])


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _snapshot_rows(events: list[TrackUpdate]) -> list[dict[str, Any]]:
    """One ``snapshots`` row per update with a snapshot path (size read from disk, None if unreadable)."""
    now = utcnow()
    return [
        {"event_id": u.event_id, "path": u.snapshot_path, "created_at": now, "bytes": _file_size(u.snapshot_path)}
        for u in events
        if u.snapshot_path is not None
    ]


_SNAPSHOT_KEYS: tuple[str, ...] = ("event_id", "path", "created_at", "bytes")


def _insert_snapshots(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return

    def stmt() -> Executable:
        return dialect_insert(conn)(Snapshot).on_conflict_do_nothing(index_elements=["event_id", "path"])

    if conn.dialect.name != "sqlite":
        conn.execute(stmt(), rows)
        return
    values = [(r["event_id"], r["path"], sqlite_time(r["created_at"]), r["bytes"]) for r in rows]
    _execute_many_sqlite(conn, "insert snapshots", stmt, _SNAPSHOT_KEYS, values)


#: ``(statement name, column keys) -> (SQL text, positions of its parameters in the row tuple)``.
_SQLITE_SQL: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[int, ...] | None]] = {}


def sqlite_time(dt: datetime) -> str:
    """The text SQLAlchemy stores on SQLite for an aware datetime through :class:`storage.models.UTCDateTime`.

    ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, without zone (what
    ``UTCDateTime.process_bind_param`` and SQLite's ``DATETIME`` processor produce).
    """
    if dt.tzinfo is not timezone.utc:
        dt = dt.astimezone(timezone.utc)
    return dt.isoformat(sep=" ", timespec="microseconds")[:26]  # drop "+00:00"


class SqliteTimes:
    """``time.time_ns()`` nanoseconds -> :func:`sqlite_time` text, truncated to microseconds.

    The date-and-seconds part is cached per second (the events of a batch
    share a few seconds), so most conversions are one string format.
    """

    def __init__(self) -> None:
        self._seconds: dict[int, str] = {}

    def text(self, ns: int) -> str:
        sec, us = divmod(ns // 1000, 1_000_000)
        head = self._seconds.get(sec)
        if head is None:
            head = self._seconds[sec] = sqlite_time(_EPOCH + timedelta(seconds=sec))[:19]
        return f"{head}.{us:06d}"


def _execute_many_sqlite(conn: Connection, name: str, build: Callable[[], Executable], keys: tuple[str, ...],
                         rows: list[tuple[Any, ...]]) -> None:
    """Run the statement ``build()`` makes for ``rows`` (tuples in ``keys`` order, values in their stored form)
    through the driver's ``executemany``.

    The statement is built and compiled once per ``(name, keys)`` and process;
    SQLAlchemy's per-row bind processing is skipped, so times must already be
    :func:`sqlite_time` text.
    """
    if not rows:
        return
    cached = _SQLITE_SQL.get((name, keys))
    if cached is None:
        compiled = build().compile(dialect=conn.dialect, column_keys=list(keys))
        positions = tuple(keys.index(k) for k in (compiled.positiontup or ()))
        cached = _SQLITE_SQL[(name, keys)] = (str(compiled), None if positions == tuple(range(len(keys))) else positions)
    sql, positions = cached
    if positions is not None:
        pick = itemgetter(*positions)
        rows = [pick(row) if len(positions) > 1 else (pick(row),) for row in rows]
    conn.exec_driver_sql(sql, rows)
