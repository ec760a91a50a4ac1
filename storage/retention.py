"""Retention: delete the oldest events (rows and snapshot files) by age or total size; storage statistics.

:func:`apply_retention` deletes whole events, oldest first (by
``events.started_at``): the event row, and through ``ON DELETE CASCADE`` its
face / Re-ID / gait vectors and ``snapshots`` rows; then the snapshot files
of the deleted events (``snapshots.path`` and ``events.snapshot_path``) that
lie inside ``snapshot_root`` and that no remaining event references.
Enrolled identities and their gallery vectors are never deleted. An anonymous cluster (``unknown-<n>``,
:mod:`storage.unknowns`) whose events are all deleted goes with them (its number is never given again).

Sizes (bytes):
    database: SQLite: the bytes the file holds once freed pages are given
        back, ``(page_count - freelist_count) * page_size`` (what the file
        shrinks to after ``PRAGMA incremental_vacuum`` and a WAL checkpoint);
        PostgreSQL: ``pg_total_relation_size`` of the FacePro tables.
    snapshots: every regular file under ``snapshot_root``.

On SQLite each round deletes the estimated number of oldest events, runs
``PRAGMA incremental_vacuum`` (files made by :func:`storage.db.open_engine`
have ``auto_vacuum=INCREMENTAL``; :func:`storage.db.upgrade` converts older
ones) and a WAL checkpoint, measures again, and repeats while the total is
over ``max_bytes``. PostgreSQL does not give deleted space back to the disk
(autovacuum makes it reusable), so there it runs one round on the estimate.

Deletes run in transactions of at most :data:`CHUNK` events, so the
pipeline's writer waits at most one short transaction for the lock.

:func:`prune_outbox` deletes the MQTT outbox rows the broker acknowledged
and nobody needs any more (the storage process runs it with retention, and
every ``storage.retention_interval_s`` when ``mqtt`` is configured).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import Connection, Engine, and_, delete, func, or_, select
from sqlalchemy.orm import aliased

from storage.db import StorageError, describe, locked_error, sqlite_path, storage_errors
from storage.unknowns import prune_empty_clusters
from storage.models import EVENT_CHILD_TABLES, TABLES, Base, Event, MqttOutbox, Snapshot, utcnow

#: Events deleted per transaction.
CHUNK = 500
#: SQLite: measure-and-delete rounds before giving up on ``max_bytes``.
MAX_ROUNDS = 10
#: SQLite: pages given back per incremental-vacuum transaction (4096 pages = 16 MiB at the default page size).
VACUUM_STEP_PAGES = 4096
_PLAN_PAGE = 1000
_AUTO_VACUUM = {0: "none", 1: "full", 2: "incremental"}


@dataclass(frozen=True)
class RetentionResult:
    """What :func:`apply_retention` did.

    Attributes:
        events_deleted: event rows deleted.
        embeddings_deleted: face + Re-ID + gait vector rows deleted with them.
        snapshot_rows_deleted: ``snapshots`` rows deleted with them.
        files_deleted: snapshot files removed from disk.
        file_bytes_deleted: their total size, bytes.
        files_kept: snapshot paths of deleted events left on disk: outside
            ``snapshot_root`` (or no root given), still referenced by a
            remaining event, missing, or not removable.
        db_bytes_before, db_bytes_after: database size (see the module doc), bytes.
        snapshot_bytes_before, snapshot_bytes_after: files under ``snapshot_root``, bytes (0 without a root).
        clusters_deleted: anonymous clusters removed because none of their events is left.
        vacuumed_pages: SQLite pages given back to the file system.
        rounds: size rounds run (0 without ``max_bytes``).
        fits: False only when ``max_bytes`` is set and the total is still
            above it (nothing older left to delete, or the rounds ran out).
    """

    events_deleted: int = 0
    embeddings_deleted: int = 0
    snapshot_rows_deleted: int = 0
    files_deleted: int = 0
    file_bytes_deleted: int = 0
    files_kept: int = 0
    db_bytes_before: int = 0
    db_bytes_after: int = 0
    snapshot_bytes_before: int = 0
    snapshot_bytes_after: int = 0
    vacuumed_pages: int = 0
    rounds: int = 0
    fits: bool = True
    clusters_deleted: int = 0

    @property
    def total_bytes_after(self) -> int:
        """Database + snapshot bytes after retention."""
        return self.db_bytes_after + self.snapshot_bytes_after

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field plus ``total_bytes_after``."""
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["total_bytes_after"] = self.total_bytes_after
        return doc


@dataclass
class _Tally:
    events: int = 0
    embeddings: int = 0
    snapshot_rows: int = 0
    files: int = 0
    file_bytes: int = 0
    files_kept: int = 0
    vacuumed_pages: int = 0

    def add(self, other: _Tally) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def apply_retention(
    engine: Engine,
    max_age_days: float | None,
    max_bytes: int | None,
    snapshot_root: Path | None,
    now: datetime | None = None,
) -> RetentionResult:
    """Delete the oldest events until none is older than ``max_age_days`` and the total fits ``max_bytes``.

    Args:
        engine: from :func:`storage.db.open_engine`, schema at head.
        max_age_days: delete events that started more than this many days
            before ``now`` (> 0); None: no age limit.
        max_bytes: then delete the oldest events until database + snapshot
            bytes (see the module doc) are at most this (> 0); None: no size limit.
        snapshot_root: the snapshot folder (``<data dir>/snapshots``); only
            files inside it are deleted or counted. None: no file is touched.
        now: aware UTC "now" for the age limit; default the current time.

    Returns:
        A :class:`RetentionResult`.

    Raises:
        ValueError: a limit <= 0, or a naive ``now``.
        StorageError: locked or unreachable database, failed statement.
    """
    _check_args(max_age_days, max_bytes, now)
    root = snapshot_root.resolve() if snapshot_root is not None else None
    db_before, snaps_before = _db_bytes(engine), _snapshot_bytes(root)
    tally = _Tally()
    if max_age_days is not None:
        cutoff = (now or utcnow()) - timedelta(days=max_age_days)
        tally.add(_delete_events(engine, _older_than(engine, cutoff), root))
    rounds, fits = 0, True
    if max_bytes is not None:
        rounds, fits = _shrink_to(engine, max_bytes, root, tally)
    elif tally.events:
        tally.vacuumed_pages += _vacuum(engine)
    clusters = _prune_clusters(engine) if tally.events else 0
    return RetentionResult(
        events_deleted=tally.events,
        embeddings_deleted=tally.embeddings,
        snapshot_rows_deleted=tally.snapshot_rows,
        files_deleted=tally.files,
        file_bytes_deleted=tally.file_bytes,
        files_kept=tally.files_kept,
        db_bytes_before=db_before,
        db_bytes_after=_db_bytes(engine),
        snapshot_bytes_before=snaps_before,
        snapshot_bytes_after=_snapshot_bytes(root),
        vacuumed_pages=tally.vacuumed_pages,
        rounds=rounds,
        fits=fits,
        clusters_deleted=clusters,
    )


def _prune_clusters(engine: Engine) -> int:
    """Delete the anonymous clusters whose events are all gone (:func:`storage.unknowns.prune_empty_clusters`)."""
    with storage_errors(engine.url, "removing empty unknown-face clusters"), engine.connect().execution_options(
        sqlite_begin="IMMEDIATE"
    ) as conn, conn.begin():
        return prune_empty_clusters(conn)


def _check_args(max_age_days: float | None, max_bytes: int | None, now: datetime | None) -> None:
    if max_age_days is not None and not max_age_days > 0:
        raise ValueError(f"max_age_days: expected > 0 days or None, got {max_age_days}")
    if max_bytes is not None and not max_bytes > 0:
        raise ValueError(f"max_bytes: expected > 0 bytes or None, got {max_bytes}")
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError(f"now: expected a timezone-aware datetime, got naive {now!r}")


# ------------------------------------------------------------------ by size


def _shrink_to(engine: Engine, max_bytes: int, root: Path | None, tally: _Tally) -> tuple[int, bool]:
    """Delete oldest events in rounds until the total fits; returns (rounds run, fits)."""
    rounds = 0
    sqlite = engine.dialect.name == "sqlite"
    while True:
        db = _db_bytes(engine)
        total = db + _snapshot_bytes(root)
        if total <= max_bytes:
            return rounds, True
        if rounds >= (MAX_ROUNDS if sqlite else 1):
            return rounds, False
        ids = _plan(engine, total - max_bytes, db)
        if not ids:
            return rounds, False
        rounds += 1
        tally.add(_delete_events(engine, _chunks(ids), root))
        tally.vacuumed_pages += _vacuum(engine)


def _plan(engine: Engine, excess: int, db_bytes: int) -> list[str]:
    """The oldest events whose estimated bytes (average database share + snapshot bytes) add up to ``excess``."""
    with storage_errors(engine.url, "planning retention"), engine.connect() as conn:
        n_events = conn.execute(select(func.count()).select_from(Event)).scalar_one()
        if n_events == 0:
            return []
        per_event_db = db_bytes / n_events  # includes the gallery: overestimates, so a round never deletes too much
        chosen: list[str] = []
        freed = 0.0
        for event_id, snap_bytes in _oldest_events(conn):
            chosen.append(event_id)
            freed += per_event_db + snap_bytes
            if freed >= excess:
                break
        return chosen


def _oldest_events(conn: Connection) -> Iterator[tuple[str, int]]:
    """``(event id, recorded snapshot bytes)`` oldest first, fetched in pages (keyset on started_at, id)."""
    snap = (
        select(Snapshot.event_id, func.coalesce(func.sum(Snapshot.bytes), 0).label("bytes"))
        .group_by(Snapshot.event_id)
        .subquery()
    )
    after: tuple[datetime, str] | None = None
    while True:
        stmt = (
            select(Event.started_at, Event.id, func.coalesce(snap.c.bytes, 0))
            .outerjoin(snap, snap.c.event_id == Event.id)
            .order_by(Event.started_at, Event.id)
            .limit(_PLAN_PAGE)
        )
        if after is not None:
            stmt = stmt.where(or_(Event.started_at > after[0], and_(Event.started_at == after[0], Event.id > after[1])))
        rows = conn.execute(stmt).all()
        for started, event_id, nbytes in rows:
            yield event_id, int(nbytes)
        if len(rows) < _PLAN_PAGE:
            return
        after = (rows[-1][0], rows[-1][1])


# ------------------------------------------------------------------ by age


def _older_than(engine: Engine, cutoff: datetime) -> Iterator[list[str]]:
    """Chunks of ids of events started before ``cutoff``, oldest first.

    Each chunk is queried after the previous one was deleted; the keyset on
    ``(started_at, id)`` visits every event once, even one the writer
    re-inserts meanwhile.
    """
    after: tuple[datetime, str] | None = None
    while True:
        stmt = select(Event.started_at, Event.id).where(Event.started_at < cutoff).order_by(Event.started_at, Event.id).limit(CHUNK)
        if after is not None:
            stmt = stmt.where(or_(Event.started_at > after[0], and_(Event.started_at == after[0], Event.id > after[1])))
        with storage_errors(engine.url, "finding events older than the retention age"), engine.connect() as conn:
            rows = conn.execute(stmt).all()
        if not rows:
            return
        yield [event_id for _, event_id in rows]
        after = (rows[-1][0], rows[-1][1])


# ------------------------------------------------------------------ deleting


def _chunks(ids: list[str], size: int = CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _delete_events(engine: Engine, chunks: Iterable[list[str]], root: Path | None) -> _Tally:
    """Delete the events of each chunk in one transaction, then their unreferenced snapshot files."""
    tally = _Tally()
    for part in chunks:
        with storage_errors(engine.url, "deleting old events"), engine.connect().execution_options(
            sqlite_begin="IMMEDIATE"
        ) as conn, conn.begin():
            paths = _snapshot_paths(conn, part)
            tally.embeddings += sum(_count(conn, t, part) for t in EVENT_CHILD_TABLES if t != "snapshots")
            tally.snapshot_rows += _count(conn, "snapshots", part)
            tally.events += conn.execute(delete(Event).where(Event.id.in_(part))).rowcount
            still_used = _referenced(conn, paths)
        _remove_files(paths - still_used, root, tally)  # after the commit: a rollback never loses a file
        tally.files_kept += len(paths & still_used)
    return tally


def _count(conn: Connection, table: str, ids: list[str]) -> int:
    t = Base.metadata.tables[table]
    return int(conn.execute(select(func.count()).select_from(t).where(t.c.event_id.in_(ids))).scalar_one())


def _snapshot_paths(conn: Connection, ids: list[str]) -> set[str]:
    paths = set(conn.execute(select(Snapshot.path).where(Snapshot.event_id.in_(ids))).scalars())
    paths.update(conn.execute(select(Event.snapshot_path).where(Event.id.in_(ids), Event.snapshot_path.is_not(None))).scalars())
    return paths


def _referenced(conn: Connection, paths: set[str]) -> set[str]:
    """The ``paths`` that remaining events still reference."""
    found: set[str] = set()
    ordered = sorted(paths)
    for i in range(0, len(ordered), CHUNK):
        part = ordered[i : i + CHUNK]
        found.update(conn.execute(select(Snapshot.path).where(Snapshot.path.in_(part))).scalars())
        found.update(conn.execute(select(Event.snapshot_path).where(Event.snapshot_path.in_(part))).scalars())
    return found


def _inside(root: Path, path: str) -> Path | None:
    """``path`` (relative ones against ``root``) if it lies inside ``root``, else None. Symlinked folders are resolved."""
    p = Path(path)
    p = p if p.is_absolute() else root / p
    parent = p.parent.resolve()
    return parent / p.name if parent.is_relative_to(root) else None


def _remove_files(paths: Iterable[str], root: Path | None, tally: _Tally) -> None:
    for path in paths:
        target = _inside(root, path) if root is not None else None
        if target is None:
            tally.files_kept += 1
            continue
        try:
            size = target.lstat().st_size
            target.unlink()
        except FileNotFoundError:
            continue  # already gone: nothing to keep or count
        except OSError:
            tally.files_kept += 1
            continue
        tally.files += 1
        tally.file_bytes += size


# ------------------------------------------------------------------ MQTT outbox


def prune_outbox(engine: Engine) -> int:
    """Delete the sent MQTT outbox rows that are no longer needed; unsent rows are never deleted.

    A sent row goes when its event's ``end`` was sent, when a newer row of its
    event exists (only the newest row of an open event stays: it carries the
    event's last ``seq``, from which the next message counts on), or when its
    event was deleted (retention).

    Returns:
        Rows deleted.

    Raises:
        StorageError: locked or unreachable database.
    """
    newer = aliased(MqttOutbox)
    ended = select(MqttOutbox.event_id).where(MqttOutbox.type == "end", MqttOutbox.sent_at.is_not(None))
    latest = select(func.max(newer.id)).where(newer.event_id == MqttOutbox.event_id).scalar_subquery()
    stmt = delete(MqttOutbox).where(
        MqttOutbox.sent_at.is_not(None),
        or_(MqttOutbox.event_id.in_(ended), MqttOutbox.id < latest, MqttOutbox.event_id.not_in(select(Event.id))),
    )
    with storage_errors(engine.url, "pruning the MQTT outbox"), engine.connect().execution_options(
        sqlite_begin="IMMEDIATE"
    ) as conn, conn.begin():
        return int(conn.execute(stmt).rowcount)


# ------------------------------------------------------------------ measuring


def _vacuum(engine: Engine) -> int:
    """SQLite: give freed pages back (incremental vacuum) and checkpoint the WAL; returns the pages given back."""
    if engine.dialect.name != "sqlite":
        return 0
    raw = engine.raw_connection()  # the pragmas run outside a transaction
    try:
        cur = raw.cursor()
        if cur.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return 0  # an old file: storage.db.upgrade / enable_incremental_vacuum converts it
        before = left = cur.execute("PRAGMA freelist_count").fetchone()[0]
        while left > 0:
            # executescript steps the pragma to completion (execute() frees one page per call);
            # each step is its own short write transaction, so the pipeline's writer is never held up long.
            raw.driver_connection.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
            now_left = cur.execute("PRAGMA freelist_count").fetchone()[0]
            if now_left >= left:
                break
            left = now_left
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # best effort: readers may keep the WAL
        return int(before - left)
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise locked_error(engine.url, err, "incremental vacuum after deleting old events") from None
        raise StorageError(f"incremental vacuum of {describe(engine.url)} failed: {err}; the events were deleted, retry later") from None
    finally:
        raw.close()


def _sqlite_pages(conn: Connection) -> dict[str, int]:
    return {name: int(conn.exec_driver_sql(f"PRAGMA {name}").scalar_one()) for name in ("page_size", "page_count", "freelist_count", "auto_vacuum")}


def _db_bytes(engine: Engine) -> int:
    """Database size for the budget: SQLite live pages, PostgreSQL total relation size of the FacePro tables."""
    with storage_errors(engine.url, "measuring the database"), engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            p = _sqlite_pages(conn)
            return (p["page_count"] - p["freelist_count"]) * p["page_size"]
        return _pg_bytes(conn)


def _pg_bytes(conn: Connection) -> int:
    names = [*TABLES, "alembic_version"]
    total = 0
    for name in names:
        total += int(conn.exec_driver_sql(f"SELECT COALESCE(pg_total_relation_size(to_regclass('{name}')), 0)").scalar_one())
    return total


def _walk_files(root: Path | None) -> Iterator[int]:
    """Sizes of the regular files under ``root`` (symlinks are not followed or counted)."""
    if root is None or not root.is_dir():
        return
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(folder, name)):
                yield st.st_size


def _snapshot_bytes(root: Path | None) -> int:
    return sum(_walk_files(root))


def _file_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def db_stats(engine: Engine, snapshot_root: Path | None) -> dict[str, Any]:
    """Rows per table and sizes on disk, as a JSON-serialisable dict (``facepro db stats``).

    Args:
        engine: from :func:`storage.db.open_engine`, schema at head.
        snapshot_root: the snapshot folder, or None.

    Returns:
        ``{"backend": "sqlite" | "postgresql", "rows": {table: count},
        "files": {"db": bytes, "wal": bytes, "snapshots": bytes, "snapshot_count": n},
        "db_live_bytes": bytes, "auto_vacuum": "none" | "full" | "incremental" | None,
        "oldest_event_at": ISO-8601 | None, "newest_event_at": ISO-8601 | None}``.
        On PostgreSQL ``files.db`` is the FacePro tables' total relation
        size, ``files.wal`` is None and ``auto_vacuum`` None.

    Raises:
        StorageError: locked or unreachable database, schema not at head.
    """
    root = snapshot_root.resolve() if snapshot_root is not None else None
    sizes = list(_walk_files(root))
    with storage_errors(engine.url, "reading database statistics"), engine.connect() as conn:
        rows = {t: int(conn.execute(select(func.count()).select_from(Base.metadata.tables[t])).scalar_one()) for t in TABLES}
        oldest, newest = conn.execute(select(func.min(Event.started_at), func.max(Event.started_at))).one()
        stats: dict[str, Any] = {"backend": conn.dialect.name, "rows": rows}
        stats.update(_file_stats(engine, conn))
    stats["files"].update({"snapshots": sum(sizes), "snapshot_count": len(sizes)})
    stats["oldest_event_at"] = _iso(oldest)
    stats["newest_event_at"] = _iso(newest)
    return stats


def _file_stats(engine: Engine, conn: Connection) -> dict[str, Any]:
    if conn.dialect.name != "sqlite":
        size = _pg_bytes(conn)
        return {"files": {"db": size, "wal": None}, "db_live_bytes": size, "auto_vacuum": None}
    path = sqlite_path(engine.url)
    p = _sqlite_pages(conn)
    wal = path.with_name(path.name + "-wal") if path is not None else None
    return {
        "files": {"db": _file_size(path), "wal": _file_size(wal)},
        "db_live_bytes": (p["page_count"] - p["freelist_count"]) * p["page_size"],
        "auto_vacuum": _AUTO_VACUUM.get(p["auto_vacuum"], str(p["auto_vacuum"])),
    }


def _iso(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)
