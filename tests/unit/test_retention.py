"""Retention and storage statistics on real SQLite files (and PostgreSQL where marked)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from pipeline.messages import EmbeddingRecord
from storage.db import open_engine, upgrade
from storage.queries import count_rows, enroll, list_events
from storage.retention import RetentionResult, apply_retention, db_stats
from storage.writer import EventWriter, ns_to_datetime
from tests.unit.test_storage import SEC, T0, _eid, pg_url, update  # noqa: F401  (pg_url: fixture)

DAY = 86_400 * SEC
NOW = ns_to_datetime(T0 + 10 * DAY)
SNAP_BYTES = 20_000


@pytest.fixture()
def snap_root(data_dir: Path) -> Path:
    root = data_dir / "snapshots"
    root.mkdir()
    return root


def _vector(seed: int, dim: int = 512) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _write_events(engine: Engine, root: Path | None, days_ago: list[float], vectors_per_event: int = 3) -> list[str]:
    """One event per entry of ``days_ago`` (before NOW), each with face/reid/gait vectors and, with a root, a snapshot file."""
    ids = []
    w = EventWriter(engine, 10_000, 10_000)
    for i, age in enumerate(days_ago):
        eid = _eid()
        ids.append(eid)
        snap = None
        if root is not None:
            path = root / "cam0" / f"{eid}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(bytes([i % 256]) * SNAP_BYTES)
            snap = str(path)
        w.add_update(update(eid, t0=T0 + 10 * DAY - int(age * DAY), snapshot_path=snap))
        for k in range(vectors_per_event):
            w.add_embedding(EmbeddingRecord(eid, ("face", "reid", "gait")[k % 3], "m", _vector(i * 10 + k), frame_index=k))
    w.flush()
    return ids


def _event_ids(engine: Engine) -> set[str]:
    return {r.event_id for r in list_events(engine, limit=100_000)}


def _files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------- by age


@pytest.mark.parametrize(
    ("max_age_days", "deleted"),
    [
        (5.5, 4),  # events 6..9 days old
        (100.0, 0),
        (0.25, 9),  # only the event 0.1 day old stays
    ],
)
def test_age_limit_deletes_old_events_their_rows_and_files(engine, snap_root, max_age_days, deleted):
    ages = [0.1, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    ids = _write_events(engine, snap_root, ages)
    enroll(engine, "alice", _vector(99)[None, :], "m")

    result = apply_retention(engine, max_age_days, None, snap_root, now=NOW)

    kept = {eid for eid, age in zip(ids, ages) if age <= max_age_days}
    assert len(kept) == len(ids) - deleted
    assert _event_ids(engine) == kept
    assert _files(snap_root) == {f"{eid}.jpg" for eid in kept}
    counts = count_rows(engine)
    assert counts["track_embeddings"] == counts["reid_embeddings"] == counts["gait_embeddings"] == len(kept)
    assert counts["snapshots"] == len(kept)
    assert (counts["identities"], counts["face_embeddings"]) == (1, 1)  # the gallery is never touched
    assert (result.events_deleted, result.embeddings_deleted, result.snapshot_rows_deleted) == (deleted, 3 * deleted, deleted)
    assert (result.files_deleted, result.file_bytes_deleted, result.files_kept) == (deleted, deleted * SNAP_BYTES, 0)
    assert result.snapshot_bytes_after == len(kept) * SNAP_BYTES
    assert result.fits and result.rounds == 0


def test_age_limit_frees_pages_and_shrinks_the_file(engine, db_path):
    _write_events(engine, None, [9] * 300 + [0.1] * 10)
    before = db_path.stat().st_size + Path(f"{db_path}-wal").stat().st_size

    result = apply_retention(engine, 5, None, None, now=NOW)

    assert result.events_deleted == 300 and result.vacuumed_pages > 0
    assert result.db_bytes_after < result.db_bytes_before
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA freelist_count").fetchone() == (0,)
    finally:
        raw.close()
    after = db_path.stat().st_size + Path(f"{db_path}-wal").stat().st_size
    assert after < before
    assert db_path.stat().st_size == result.db_bytes_after  # WAL checkpointed, file truncated to its live pages


# ---------------------------------------------------------------------- by size


def test_size_limit_keeps_the_newest_events_that_fit(engine, snap_root):
    ages = [float(a) for a in range(40, 0, -1)]  # oldest first
    ids = _write_events(engine, snap_root, ages)
    stats = db_stats(engine, snap_root)
    total = stats["db_live_bytes"] + stats["files"]["snapshots"]
    budget = total // 2

    result = apply_retention(engine, None, budget, snap_root)

    assert result.fits and result.total_bytes_after <= budget
    assert result.db_bytes_before + result.snapshot_bytes_before == total
    kept = _event_ids(engine)
    assert 0 < len(kept) < len(ids)
    assert kept == set(ids[len(ids) - len(kept):])  # the newest ones, whatever the count
    assert _files(snap_root) == {f"{eid}.jpg" for eid in kept}
    assert result.rounds >= 1


def test_size_limit_that_cannot_be_met_deletes_every_event_but_not_the_gallery(engine, snap_root):
    _write_events(engine, snap_root, [3, 2, 1])
    enroll(engine, "alice", _vector(1)[None, :], "m")

    result = apply_retention(engine, None, 1, snap_root)

    assert not result.fits and result.events_deleted == 3
    assert count_rows(engine)["events"] == 0 and count_rows(engine)["face_embeddings"] == 1
    assert _files(snap_root) == set()


def test_size_limit_already_met_deletes_nothing(engine, snap_root):
    _write_events(engine, snap_root, [2, 1])
    result = apply_retention(engine, None, 10**12, snap_root)
    assert result == RetentionResult(
        db_bytes_before=result.db_bytes_before, db_bytes_after=result.db_bytes_after,
        snapshot_bytes_before=2 * SNAP_BYTES, snapshot_bytes_after=2 * SNAP_BYTES,
    )
    assert count_rows(engine)["events"] == 2


# ----------------------------------------------------------------- snapshot files


def test_only_files_inside_the_root_and_no_longer_referenced_are_deleted(engine, data_dir, snap_root):
    outside = data_dir / "elsewhere.jpg"
    outside.write_bytes(b"x" * 10)
    shared = snap_root / "shared.jpg"
    shared.write_bytes(b"y" * 10)
    escape = snap_root / ".." / "escape.jpg"  # inside by name, outside once resolved
    escape.write_bytes(b"z" * 10)
    old_a, old_b, old_c, new = _eid(), _eid(), _eid(), _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(old_a, t0=T0, snapshot_path=str(outside)))
    w.add_update(update(old_b, t0=T0, snapshot_path=str(shared)))
    w.add_update(update(old_c, t0=T0, snapshot_path=str(escape)))
    w.add_update(update(new, t0=T0 + 10 * DAY, snapshot_path=str(shared)))  # still uses the shared file
    w.flush()

    result = apply_retention(engine, 1, None, snap_root, now=NOW)

    assert result.events_deleted == 3
    assert outside.exists() and shared.exists() and escape.exists()
    assert (result.files_deleted, result.files_kept) == (0, 3)
    assert _event_ids(engine) == {new}


def test_without_a_root_rows_go_and_files_stay(engine, snap_root):
    _write_events(engine, snap_root, [9, 8])
    result = apply_retention(engine, 1, None, None, now=NOW)
    assert result.events_deleted == 2 and result.files_deleted == 0 and result.files_kept == 2
    assert len(_files(snap_root)) == 2
    assert result.snapshot_bytes_before == result.snapshot_bytes_after == 0  # not measured without a root


def test_a_file_without_incremental_auto_vacuum_still_gets_rows_deleted(db_path):
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA auto_vacuum=NONE")
    raw.execute("CREATE TABLE t (x INTEGER)")
    raw.commit()
    raw.close()
    url = f"sqlite:///{db_path}"
    from storage.db import alembic_config  # migrate without upgrade(), which would convert the file
    from alembic import command

    eng = open_engine(url, foreign_keys=False)
    with eng.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    eng.dispose()
    engine = open_engine(url)
    try:
        _write_events(engine, None, [9, 0.1])
        result = apply_retention(engine, 1, None, None, now=NOW)
        assert result.events_deleted == 1 and result.vacuumed_pages == 0
        assert db_stats(engine, None)["auto_vacuum"] == "none"
    finally:
        engine.dispose()


# ------------------------------------------------------------------------ inputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_age_days=0), "max_age_days"),
        (dict(max_age_days=-1.5), "max_age_days"),
        (dict(max_bytes=0), "max_bytes"),
        (dict(now=NOW.replace(tzinfo=None)), "timezone-aware"),
    ],
)
def test_bad_limits_are_refused(engine, kwargs, match):
    args = dict(max_age_days=None, max_bytes=None, snapshot_root=None, now=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        apply_retention(engine, **args)


# ------------------------------------------------------------------------- stats


def test_db_stats_counts_rows_and_measures_files(engine, db_path, snap_root):
    _write_events(engine, snap_root, [2, 1])
    (snap_root / "cam0" / "link.jpg").symlink_to(db_path)  # not counted: not a regular file

    stats = db_stats(engine, snap_root)

    assert stats["backend"] == "sqlite" and stats["auto_vacuum"] == "incremental"
    assert stats["rows"] == {
        "cameras": 1, "identities": 0, "face_embeddings": 0, "events": 2,
        "track_embeddings": 2, "reid_embeddings": 2, "gait_embeddings": 2, "snapshots": 2, "mqtt_outbox": 0, "jobs": 0,
        "unknown_clusters": 0, "face_negatives": 0,
    }
    assert stats["files"] == {
        "db": db_path.stat().st_size,
        "wal": os.stat(f"{db_path}-wal").st_size,
        "snapshots": 2 * SNAP_BYTES,
        "snapshot_count": 2,
    }
    assert 0 < stats["db_live_bytes"]
    assert stats["oldest_event_at"] == ns_to_datetime(T0 + 8 * DAY).isoformat()
    assert stats["newest_event_at"] == ns_to_datetime(T0 + 9 * DAY).isoformat()


def test_db_stats_of_an_empty_database(engine):
    stats = db_stats(engine, None)
    assert set(stats["rows"].values()) == {0}
    assert stats["files"]["snapshots"] == 0 and stats["oldest_event_at"] is None


def test_result_to_json_has_every_field():
    doc = RetentionResult(events_deleted=2, db_bytes_after=10, snapshot_bytes_after=5).to_json()
    assert doc["events_deleted"] == 2 and doc["total_bytes_after"] == 15 and doc["fits"] is True


# -------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_postgres_retention_by_age_and_size_and_stats(pg_url, snap_root):  # noqa: F811
    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        ids = _write_events(engine, snap_root, [9, 8, 2, 1])
        result = apply_retention(engine, 5, None, snap_root, now=NOW)
        assert result.events_deleted == 2 and result.embeddings_deleted == 6 and result.files_deleted == 2
        assert _event_ids(engine) == set(ids[2:])
        stats = db_stats(engine, snap_root)
        assert stats["backend"] == "postgresql" and stats["files"]["wal"] is None
        assert stats["rows"]["events"] == 2 and stats["rows"]["reid_embeddings"] == 2 and stats["rows"]["snapshots"] == 2
        assert stats["files"]["snapshots"] == 2 * SNAP_BYTES

        result = apply_retention(engine, None, 1, snap_root)  # one round on PostgreSQL: deletes every event
        assert result.events_deleted == 2 and not result.fits and result.rounds == 1
        assert count_rows(engine)["events"] == 0 and _files(snap_root) == set()
    finally:
        engine.dispose()
