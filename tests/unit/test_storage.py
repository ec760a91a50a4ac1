"""Storage on real SQLite files (and PostgreSQL where marked): writer, queries, enrollment, locking."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from typing import Iterator

import numpy as np
import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from pipeline.messages import EmbeddingRecord, TrackUpdate
from storage.db import PAGE_SIZE, StorageError, alembic_config, current_revision, describe, head_revision, open_engine, upgrade
from storage.models import bytes_to_vector, vector_to_bytes
from storage.queries import (
    EventRow,
    count_rows,
    delete_identity,
    enroll,
    last_vector_id,
    get_event,
    list_events,
    list_identities,
    load_gallery,
    MergeResult,
    merge_identities,
    named_track_vectors,
)
from storage.writer import EventWriter, SqliteTimes, ns_to_datetime, sqlite_time

T0 = 1_700_000_000_123_456_789  # ns since the epoch
SEC = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _eid() -> str:
    return uuid.uuid4().hex


def update(event_id: str, *, camera: str = "cam0", first: int = 0, last: int = 10, t0: int = T0, **kw) -> TrackUpdate:
    """A TrackUpdate seen from frame ``first`` to ``last`` at 10 frames/s from ``t0``."""
    fields = dict(
        event_id=event_id, camera=camera, track_id=7, label="person",
        first_seen_ns=t0 + first * SEC // 10, last_seen_ns=t0 + last * SEC // 10,
        first_frame=first, last_frame=last, best_score=0.8,
        xyxy=np.array([1.5, 2.5, 30.25, 60.75], np.float32),
    )
    fields.update(kw)
    return TrackUpdate(**fields)


def embedding(event_id: str, dim: int = 8, seed: int = 0, kind: str = "face") -> EmbeddingRecord:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return EmbeddingRecord(event_id, kind, "mobilefacenet_128d", v / np.linalg.norm(v), frame_index=3, quality=0.9)


# ------------------------------------------------------------------ engine


def test_sqlite_engine_settings(engine):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == PAGE_SIZE  # a new file
        assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # INCREMENTAL


@pytest.mark.parametrize("cache_mb, cache_size", [(None, -2000), (1, -1024), (32, -32768)])  # negative: KiB
def test_sqlite_page_cache_is_set_per_connection(tmp_path, cache_mb, cache_size):
    eng = open_engine(f"sqlite:///{tmp_path / 'c.db'}", cache_mb=cache_mb)
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == cache_size
    finally:
        eng.dispose()


def test_sqlite_page_cache_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="cache_mb: expected >= 1, got 0"):
        open_engine(f"sqlite:///{tmp_path / 'c.db'}", cache_mb=0)


def test_open_engine_creates_the_parent_folder(tmp_path):
    path = tmp_path / "a" / "b" / "facepro.db"
    eng = open_engine(f"sqlite:///{path}")
    with eng.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    eng.dispose()
    assert path.parent.is_dir()


def test_invalid_url_is_a_clear_error():
    with pytest.raises(StorageError, match="invalid database URL"):
        open_engine("not a url")


# ---------------------------------------------------------------- vectors


def test_vector_bytes_round_trip_exactly():
    v = np.array([0.1, -2.5, 3e-38, 1e30], np.float32)
    blob = vector_to_bytes(v, 4)
    assert blob == v.astype("<f4").tobytes() and len(blob) == 16
    back = bytes_to_vector(blob, 4)
    assert back.dtype == np.float32 and np.array_equal(back, v)
    back[0] = 9  # writable copy


@pytest.mark.parametrize(
    ("value", "dim", "match"),
    [
        (np.zeros(4, np.float64), None, "float32"),
        (np.zeros((2, 2), np.float32), None, r"shape \(d,\)"),
        (np.zeros(0, np.float32), None, r"shape \(d,\)"),
        (np.zeros(4, np.float32), 5, "dimension 5"),
        (np.array([1, np.nan], np.float32), None, "NaN"),
        (np.array([np.inf, -np.inf], np.float32), None, "infinite"),
        (np.array([3e38, np.inf], np.float32), None, "infinite"),
        ([1.0, 2.0], None, "numpy.ndarray"),
    ],
)
def test_vector_to_bytes_rejects_bad_input(value, dim, match):
    with pytest.raises(ValueError, match=match):
        vector_to_bytes(value, dim)


def test_vector_to_bytes_accepts_huge_finite_values_whose_float32_sum_would_overflow():
    v = np.full(4, 3e38, np.float32)
    assert bytes_to_vector(vector_to_bytes(v), 4).tolist() == v.tolist()


@pytest.mark.parametrize(
    "dt",
    [
        datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
        datetime(2024, 1, 2, 4, 4, 5, 6, tzinfo=timezone(timedelta(hours=1))),
        datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    ],
)
def test_sqlite_time_is_what_sqlalchemy_stores(engine, dt):
    from sqlalchemy import select

    from storage.models import Camera

    with engine.begin() as conn:
        conn.execute(Camera.__table__.insert(), {"name": "c", "created_at": dt})
        stored = conn.exec_driver_sql("SELECT created_at FROM cameras").scalar()
        assert conn.execute(select(Camera.created_at)).scalar() == dt
    assert sqlite_time(dt) == stored == "2024-01-02 03:04:05." + f"{dt.microsecond:06d}"


@pytest.mark.parametrize(
    "ns, text",
    [
        (0, "1970-01-01 00:00:00.000000"),
        (1_999, "1970-01-01 00:00:00.000001"),  # truncated to microseconds, like ns_to_datetime
        (1_704_164_645_000_006_999, "2024-01-02 03:04:05.000006"),
        (1_704_164_645_999_999_999, "2024-01-02 03:04:05.999999"),
        (1_704_164_646_000_000_000, "2024-01-02 03:04:06.000000"),  # next second: not the cached head
        (951_782_400_000_000_000, "2000-02-29 00:00:00.000000"),
    ],
)
def test_writer_time_text_matches_the_datetime_path(ns, text):
    times = SqliteTimes()
    assert times.text(ns - 1_000_000_000) and times.text(ns) == text == sqlite_time(ns_to_datetime(ns))


def test_bytes_to_vector_checks_the_size():
    with pytest.raises(ValueError, match="expected 16 bytes for dim 4, got 12"):
        bytes_to_vector(b"\0" * 12, 4)


# ----------------------------------------------------------------- writer


def test_due_by_rows(engine):
    w = EventWriter(engine, batch_rows=3, batch_ms=10_000, clock=FakeClock())
    assert not w.due() and w.pending == 0
    e1, e2 = _eid(), _eid()
    w.add_update(update(e1))
    w.add_update(update(e1, last=12))  # collapses into the same row
    w.add_update(update(e2))
    assert w.pending == 2 and not w.due()
    w.add_embedding(embedding(e1))
    assert w.pending == 3 and w.due()
    assert w.flush() == 3
    assert w.pending == 0 and not w.due()


def test_due_by_time(engine):
    clock = FakeClock()
    w = EventWriter(engine, batch_rows=1000, batch_ms=200, clock=clock)
    w.add_update(update(_eid()))
    clock.now += 0.150
    w.add_update(update(_eid()))
    assert not w.due() and w.oldest_wait_ms() == pytest.approx(150)
    clock.now += 0.050  # the oldest row is now 200 ms old
    assert w.due()
    w.flush()
    assert not w.due() and w.oldest_wait_ms() == 0
    clock.now += 10
    assert not w.due()  # nothing pending: never due


def test_flush_with_nothing_pending_writes_nothing(engine):
    assert EventWriter(engine, 10, 10).flush() == 0
    assert count_rows(engine)["events"] == 0


def test_writer_rejects_bad_arguments(engine):
    with pytest.raises(ValueError, match="batch_rows"):
        EventWriter(engine, batch_rows=0, batch_ms=10)
    with pytest.raises(ValueError, match="batch_ms"):
        EventWriter(engine, batch_rows=1, batch_ms=0)
    w = EventWriter(engine, 10, 10)
    with pytest.raises(ValueError, match="32 lowercase hex"):
        w.add_update(update("Z" * 32))
    with pytest.raises(ValueError, match="TrackUpdate.camera"):
        w.add_update(update(_eid(), camera="c" * 200))
    with pytest.raises(ValueError, match="NaN"):
        w.add_embedding(EmbeddingRecord(_eid(), "face", "m", np.array([np.nan], np.float32)))
    assert w.pending == 0


def test_event_row_fields_and_utc_timestamps(engine):
    eid = _eid()
    w = EventWriter(engine, 10, 10)
    w.add_update(update(eid, first=5, last=25, snapshot_path="/snap/x.jpg", ended=True, best_score=0.75))
    w.flush()
    (row,) = list_events(engine)
    assert row == EventRow(
        event_id=eid, camera="cam0", track_id=7, label="person", identity=None, method=None,
        identity_score=0.0, best_score=0.75,
        started_at=ns_to_datetime(T0 + 5 * SEC // 10), ended_at=ns_to_datetime(T0 + 25 * SEC // 10),
        first_frame=5, last_frame=25, xyxy=(1.5, 2.5, 30.25, 60.75), snapshot_path="/snap/x.jpg", ended=True,
    )
    assert row.started_at.tzinfo is not None and row.started_at.utcoffset().total_seconds() == 0
    assert row.started_at == datetime(2023, 11, 14, 22, 13, 20, 623456, tzinfo=timezone.utc)


def test_ns_to_datetime_truncates_to_microseconds():
    assert ns_to_datetime(0) == datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert ns_to_datetime(1_999) == datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc)


def test_upsert_is_idempotent(engine):
    ids = [_eid() for _ in range(3)]
    batch = [update(e, last=10 + i) for i, e in enumerate(ids)]
    w = EventWriter(engine, 100, 100)
    for u in batch:
        w.add_update(u)
    w.flush()
    first = list_events(engine)
    for u in batch:  # the same updates again, in a new batch
        w.add_update(u)
    assert w.flush() == 3
    assert list_events(engine) == first
    assert count_rows(engine)["events"] == 3 and count_rows(engine)["cameras"] == 1


def test_updates_of_one_event_collapse_to_the_latest(engine):
    eid = _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(eid, first=3, last=10, best_score=0.9))
    w.add_update(update(eid, first=4, last=30, best_score=0.6, ended=True, xyxy=np.array([5, 6, 7, 8], np.float32)))
    w.add_update(update(eid, first=4, last=20, best_score=0.7))  # arrives late: older state
    assert w.pending == 1
    assert w.flush() == 1
    (row,) = list_events(engine)
    assert (row.first_frame, row.last_frame, row.best_score, row.ended) == (3, 30, 0.9, True)
    assert row.started_at == ns_to_datetime(T0 + 3 * SEC // 10)
    assert row.ended_at == ns_to_datetime(T0 + 30 * SEC // 10)
    assert row.xyxy == (5.0, 6.0, 7.0, 8.0)


def test_later_batch_updates_the_row_and_an_older_one_is_ignored(engine):
    eid = _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(eid, first=3, last=10, best_score=0.9))
    w.flush()
    w.add_update(update(eid, first=3, last=40, best_score=0.5, identity_score=0.3))
    w.flush()
    w.add_update(update(eid, first=3, last=20, identity_score=0.99))  # stale
    w.flush()
    (row,) = list_events(engine)
    assert (row.first_frame, row.last_frame, row.identity_score) == (3, 40, 0.3)
    assert row.best_score == 0.9  # the highest seen is kept
    assert row.started_at == ns_to_datetime(T0 + 3 * SEC // 10)


def test_a_stored_event_is_named_and_its_start_moves_earlier_in_a_later_batch(engine):
    enroll(engine, "alice", np.eye(1, 4, dtype=np.float32), "m")
    named, other = _eid(), _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(named, first=5, last=10, best_score=0.4))
    w.flush()
    w.add_update(update(named, first=3, last=12, identity="alice", method="face", identity_score=0.8))  # stored row
    w.add_update(update(other, first=1, last=2))  # and a new one in the same batch
    assert w.flush() == 2
    (row,) = list_events(engine, identity="alice")  # through the partial identity index
    assert (row.event_id, row.first_frame, row.last_frame, row.method, row.best_score) == (named, 3, 12, "face", 0.8)
    assert row.started_at == ns_to_datetime(T0 + 3 * SEC // 10)
    assert {r.event_id for r in list_events(engine)} == {named, other}


def test_embeddings_are_raw_float32_after_their_event(engine, db_path):
    eid = _eid()
    rec = embedding(eid, dim=128, seed=1)
    w = EventWriter(engine, 100, 100)
    w.add_embedding(rec)  # queued before its event: still inserted after it
    w.add_update(update(eid))
    assert w.flush() == 2
    raw = sqlite3.connect(db_path)
    try:
        event_id, kind, model, dim, blob, frame, quality = raw.execute(
            "SELECT event_id, kind, model, dim, vector, frame_index, quality FROM track_embeddings"
        ).fetchone()
    finally:
        raw.close()
    assert (event_id, kind, model, dim, frame, quality) == (eid, "face", "mobilefacenet_128d", 128, 3, pytest.approx(0.9))
    assert blob == rec.vector.astype("<f4").tobytes()
    assert np.array_equal(bytes_to_vector(blob, dim), rec.vector)


def test_embedding_of_an_event_written_earlier_is_kept_and_orphans_are_counted(engine):
    eid = _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(eid))
    w.flush()
    w.add_embedding(embedding(eid, kind="reid"))
    w.add_embedding(embedding(_eid()))  # no such event anywhere
    assert w.flush() == 1
    assert w.orphan_embeddings == 1
    assert count_rows(engine)["reid_embeddings"] == 1


@pytest.mark.parametrize(
    ("kind", "table"),
    [("face", "track_embeddings"), ("reid", "reid_embeddings"), ("gait", "gait_embeddings")],
)
def test_each_embedding_kind_goes_to_its_table(engine, db_path, kind, table):
    eid = _eid()
    rec = embedding(eid, dim=16, seed=2, kind=kind)
    w = EventWriter(engine, 100, 100)
    w.add_update(update(eid))
    w.add_embedding(rec)
    assert w.flush() == 2
    counts = count_rows(engine)
    assert {t: counts[t] for t in ("track_embeddings", "reid_embeddings", "gait_embeddings")} == {
        t: int(t == table) for t in ("track_embeddings", "reid_embeddings", "gait_embeddings")
    }
    raw = sqlite3.connect(db_path)
    try:
        event_id, model, dim, blob, frame, quality = raw.execute(
            f"SELECT event_id, model, dim, vector, frame_index, quality FROM {table}"
        ).fetchone()
    finally:
        raw.close()
    assert (event_id, model, dim, frame, quality) == (eid, "mobilefacenet_128d", 16, 3, pytest.approx(0.9))
    assert blob == rec.vector.astype("<f4").tobytes()


def test_snapshot_rows_once_per_event_and_path_with_file_size(engine, db_path, tmp_path):
    shot = tmp_path / "snap" / "a.jpg"
    shot.parent.mkdir()
    shot.write_bytes(b"\xff\xd8" + b"x" * 98)
    later = tmp_path / "snap" / "b.jpg"
    e1, e2, e3 = _eid(), _eid(), _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(e1, snapshot_path=str(shot)))
    w.add_update(update(e2))  # no snapshot: no row
    w.add_update(update(e3, snapshot_path=str(later)))  # file missing: size unknown
    w.flush()
    w.add_update(update(e1, last=20, snapshot_path=str(shot)))  # re-sent: no second row
    w.add_update(update(e3, last=20, snapshot_path=str(shot)))  # a new path of e3: a new row
    w.flush()
    raw = sqlite3.connect(db_path)
    try:
        rows = sorted(raw.execute("SELECT event_id, path, bytes FROM snapshots").fetchall())
    finally:
        raw.close()
    assert rows == sorted([(e1, str(shot), 100), (e3, str(later), None), (e3, str(shot), 100)])


def test_identity_names_resolve_and_unknown_names_are_counted(engine):
    enroll(engine, "alice", np.eye(1, 4, dtype=np.float32), "m")
    known, stranger = _eid(), _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(known, identity="alice", method="face", identity_score=0.81))
    w.add_update(update(stranger, identity="mallory", method="reid", identity_score=0.5))
    w.flush()
    assert w.unknown_identity == 1
    assert count_rows(engine)["identities"] == 1  # the writer never creates identities
    (row,) = list_events(engine, identity="alice")
    assert (row.event_id, row.identity, row.method, row.identity_score) == (known, "alice", "face", 0.81)
    other = next(r for r in list_events(engine) if r.event_id == stranger)
    assert other.identity is None


def test_cameras_are_created_once(engine):
    w = EventWriter(engine, 100, 100)
    for cam in ("cam0", "cam1", "cam0"):
        w.add_update(update(_eid(), camera=cam))
    w.flush()
    w2 = EventWriter(engine, 100, 100)  # a fresh writer finds the existing rows
    w2.add_update(update(_eid(), camera="cam1"))
    w2.flush()
    assert count_rows(engine)["cameras"] == 2
    assert sorted(r.camera for r in list_events(engine)) == ["cam0", "cam0", "cam1", "cam1"]


def test_list_events_filters_order_and_limit(engine):
    enroll(engine, "bob", np.eye(1, 4, dtype=np.float32), "m")
    w = EventWriter(engine, 100, 100)
    ids = []
    for i in range(6):
        eid = _eid()
        ids.append(eid)
        w.add_update(update(eid, camera=f"cam{i % 2}", t0=T0 + i * SEC, identity="bob" if i in (1, 4) else None))
    w.flush()
    newest_first = ids[::-1]
    assert [r.event_id for r in list_events(engine)] == newest_first
    assert [r.event_id for r in list_events(engine, limit=2)] == newest_first[:2]
    assert [r.event_id for r in list_events(engine, camera="cam1")] == [ids[5], ids[3], ids[1]]
    assert [r.event_id for r in list_events(engine, identity="bob")] == [ids[4], ids[1]]
    assert [r.event_id for r in list_events(engine, camera="cam0", identity="bob")] == [ids[4]]
    assert list_events(engine, camera="nope") == []
    with pytest.raises(ValueError, match="limit"):
        list_events(engine, limit=0)


def test_list_events_by_label_method_time_and_cursor(engine):
    enroll(engine, "bob", np.eye(1, 4, dtype=np.float32), "m")
    w = EventWriter(engine, 100, 100)
    ids = []
    for i in range(7):
        eid = _eid()
        ids.append(eid)
        named = {"identity": "bob", "method": "reid" if i == 2 else "face", "identity_score": 0.7} if i in (2, 5) else {}
        w.add_update(update(eid, t0=T0 + (i // 2) * SEC, label="car" if i == 3 else "person", **named))  # pairs share a start
    w.flush()
    newest = [r.event_id for r in list_events(engine)]
    assert set(newest) == set(ids) and len(newest) == 7
    assert [r.event_id for r in list_events(engine, label="car")] == [ids[3]]
    assert [r.event_id for r in list_events(engine, method="face")] == [ids[5]]
    assert [r.event_id for r in list_events(engine, method="reid", identity="bob")] == [ids[2]]
    t = lambda k: ns_to_datetime(T0 + k * SEC)  # noqa: E731
    assert {r.event_id for r in list_events(engine, since=t(1), until=t(3))} == set(ids[2:6])
    assert {r.event_id for r in list_events(engine, since=t(3))} == {ids[6]}
    assert list_events(engine, until=t(0)) == []
    pages, cursor = [], None  # pages of 2 by the keyset cursor: every event once, in order, across equal starts
    while True:
        page = list_events(engine, limit=2, before=cursor)
        pages += [r.event_id for r in page]
        if len(page) < 2:
            break
        cursor = (page[-1].started_at, page[-1].event_id)
    assert pages == newest
    with pytest.raises(ValueError, match="since: expected a timezone-aware datetime"):
        list_events(engine, since=datetime(2024, 1, 1))
    assert get_event(engine, ids[3]).label == "car" and get_event(engine, _eid()) is None
    assert get_event(engine, ids[5]).to_json() == next(r.to_json() for r in list_events(engine) if r.event_id == ids[5])


def test_event_row_to_json(engine):
    eid = _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(eid))
    w.flush()
    doc = list_events(engine)[0].to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["started_at"] == "2023-11-14T22:13:20.123456+00:00"
    assert doc["xyxy"] == [1.5, 2.5, 30.25, 60.75] and doc["event_id"] == eid
    assert datetime.fromisoformat(doc["ended_at"]).tzinfo is not None
    assert doc["has_snapshot"] is False and doc["snapshot_path"] is None


# ------------------------------------------------------------- enrollment


def test_enroll_load_gallery_and_delete_cascade(engine):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 16)).astype(np.float32)
    b = rng.standard_normal((1, 16)).astype(np.float32)
    c = rng.standard_normal((3, 8)).astype(np.float32)
    alice = enroll(engine, "alice", a, "arcface", ["a1.jpg", "a2.jpg"], ["0" * 64, "1" * 64])
    assert enroll(engine, "bob", b, "arcface", ["b.jpg"], [None]) != alice
    enroll(engine, "carol", c, "other_model")
    assert enroll(engine, "alice", a[:1], "arcface") == alice  # adds to the existing identity

    names, vectors = load_gallery(engine, "arcface")
    assert names == ["alice", "alice", "alice", "bob"]
    assert vectors.dtype == np.float32 and vectors.shape == (4, 16)
    assert np.array_equal(vectors, np.vstack([a, a[:1], b]))
    assert load_gallery(engine, "arcface").skipped == {"carol"}
    assert list_identities(engine) == [("alice", 3), ("bob", 1), ("carol", 3)]

    eid = _eid()
    w = EventWriter(engine, 100, 100)
    w.add_update(update(eid, identity="alice", method="face", identity_score=0.9))
    w.flush()

    assert delete_identity(engine, "alice") is True
    assert delete_identity(engine, "alice") is False
    counts = count_rows(engine)
    assert (counts["identities"], counts["face_embeddings"], counts["events"]) == (2, 4, 1)
    (row,) = list_events(engine)
    assert row.event_id == eid and row.identity is None  # ON DELETE SET NULL
    assert load_gallery(engine, "arcface").names == ["bob"]


def _embedding_rows(engine) -> list[tuple[str, str | None, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT i.name, e.image_path, e.model FROM face_embeddings e JOIN identities i ON i.id = e.identity_id ORDER BY e.id")]


def test_merge_moves_embeddings_images_and_events_then_deletes_the_other(engine):
    rng = np.random.default_rng(1)
    enroll(engine, "alice", rng.standard_normal((2, 16)).astype(np.float32), "arcface", ["a1.jpg", "a2.jpg"], ["0" * 64, "1" * 64])
    enroll(engine, "alice (2)", rng.standard_normal((1, 16)).astype(np.float32), "arcface", ["a3.jpg"], ["2" * 64])
    enroll(engine, "alice (2)", rng.standard_normal((1, 8)).astype(np.float32), "other_model", ["a4.jpg"], [None])
    enroll(engine, "bob", rng.standard_normal((1, 16)).astype(np.float32), "arcface", ["b.jpg"], [None])
    ids = [_eid() for _ in range(3)]
    w = EventWriter(engine, 100, 100)
    for eid, who in zip(ids, ["alice", "alice (2)", "bob"]):
        w.add_update(update(eid, identity=who, method="face", identity_score=0.9))
    w.flush()

    assert merge_identities(engine, "alice", "alice (2)") == MergeResult(embeddings=2, events=1)
    assert list_identities(engine) == [("alice", 4), ("bob", 1)]
    assert _embedding_rows(engine) == [("alice", "a1.jpg", "arcface"), ("alice", "a2.jpg", "arcface"),
                                       ("alice", "a3.jpg", "arcface"), ("alice", "a4.jpg", "other_model"),
                                       ("bob", "b.jpg", "arcface")]
    assert sorted(r.event_id for r in list_events(engine, identity="alice")) == sorted(ids[:2])
    assert [r.event_id for r in list_events(engine, identity="bob")] == [ids[2]]
    assert load_gallery(engine, "arcface").names == ["alice"] * 3 + ["bob"]


@pytest.mark.parametrize(
    ("keep", "other", "message"),
    [("alice", "nobody", "no identity named 'nobody'"), ("nobody", "bob", "no identity named 'nobody'"),
     ("alice", "alice", "into itself"), ("alice", " bob", "leading/trailing spaces")],
)
def test_merge_refuses_and_changes_nothing(engine, keep: str, other: str, message: str):
    enroll(engine, "alice", np.ones((1, 4), np.float32), "arcface")
    enroll(engine, "bob", np.ones((2, 4), np.float32), "arcface")
    with pytest.raises(ValueError, match=re.escape(message)):
        merge_identities(engine, keep, other)
    assert list_identities(engine) == [("alice", 1), ("bob", 2)]


def test_merge_on_a_locked_database_changes_nothing(engine, db_path):
    enroll(engine, "alice", np.ones((1, 4), np.float32), "arcface")
    enroll(engine, "bob", np.ones((2, 4), np.float32), "arcface")
    locker = sqlite3.connect(db_path, timeout=0)
    locker.execute("BEGIN IMMEDIATE")
    try:
        fast = open_engine(f"sqlite:///{db_path}", busy_timeout_ms=50)
        with pytest.raises(StorageError, match="merging 'bob' into 'alice'"):
            merge_identities(fast, "alice", "bob")
        fast.dispose()
    finally:
        locker.rollback()
        locker.close()
    assert list_identities(engine) == [("alice", 1), ("bob", 2)]


def test_empty_gallery(engine):
    gallery = load_gallery(engine, "arcface")
    names, vectors = gallery
    assert names == [] and vectors.shape == (0, 0) and gallery.skipped == frozenset()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name=" alice"), "leading/trailing"),
        (dict(name=""), "non-empty"),
        (dict(vectors=np.zeros((2, 4), np.float64)), "float32"),
        (dict(vectors=np.zeros(4, np.float32)), r"\(k, d\)"),
        (dict(vectors=np.array([[np.inf, 0]], np.float32)), "NaN or infinite"),
        (dict(image_paths=["x.jpg", "y.jpg"]), "need 1 image_paths"),
        (dict(image_sha256=["abc"]), "64 lowercase hex"),
        (dict(model=""), "model"),
        (dict(sample=b"PNG not a jpeg"), "sample: expected JPEG"),
        (dict(sample=b"\xff\xd8\xff" + bytes(256 * 1024)), "sample: expected JPEG bytes of at most"),
    ],
)
def test_enroll_rejects_bad_input(engine, kwargs, match):
    args = dict(name="alice", vectors=np.ones((1, 4), np.float32), model="m", image_paths=None, image_sha256=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        enroll(engine, **args)
    assert count_rows(engine)["identities"] == 0


def test_an_identity_keeps_its_first_sample_face_merge_takes_one_delete_drops_it(engine):
    sample_lifecycle(engine)


@pytest.mark.postgres
def test_postgres_identity_sample_faces(pg_url):
    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        sample_lifecycle(engine)
    finally:
        engine.dispose()


def sample_lifecycle(engine) -> None:
    """Samples through enroll, the listing, merge and delete (on SQLite and PostgreSQL)."""
    from storage.queries import identity_overview, identity_sample

    one, two, three = (b"\xff\xd8\xff sample " + bytes([i]) for i in (1, 2, 3))
    vec = np.ones((1, 4), np.float32)
    enroll(engine, "alice", vec, "m")  # enrolled without a photo (or before samples were kept): none
    assert identity_sample(engine, "alice") is None
    enroll(engine, "alice", vec, "m", sample=one)
    enroll(engine, "alice", vec, "m", sample=two)  # a later enrollment does not replace it
    enroll(engine, "bob", vec, "m", sample=three)
    enroll(engine, "carol", vec, "m")
    assert identity_sample(engine, "alice") == one and identity_sample(engine, "nobody") is None
    assert identity_overview(engine) == [("alice", 3, True), ("bob", 1, True), ("carol", 1, False)]
    assert list_identities(engine) == [("alice", 3), ("bob", 1), ("carol", 1)]  # unchanged for the CLI

    merge_identities(engine, "carol", "bob")  # carol had none: bob's comes along
    merge_identities(engine, "alice", "carol")  # alice keeps hers
    assert identity_overview(engine) == [("alice", 5, True)] and identity_sample(engine, "alice") == one
    assert delete_identity(engine, "alice") and identity_sample(engine, "alice") is None
    enroll(engine, "alice", vec, "m")  # the name again, a new identity: no sample of the old one
    assert identity_overview(engine) == [("alice", 1, False)]


def test_enroll_refuses_a_second_dimension_for_a_model(engine):
    enroll(engine, "alice", np.ones((1, 4), np.float32), "m")
    with pytest.raises(ValueError, match="dimension 4, got 8"):
        enroll(engine, "bob", np.ones((1, 8), np.float32), "m")
    assert list_identities(engine) == [("alice", 1)]  # the failed call left nothing behind


# -------------------------------------------------------------- concurrency


def test_reader_open_during_flush_does_not_block_the_writer(engine, db_path):
    w = EventWriter(engine, 100, 100)
    w.add_update(update(_eid()))
    w.flush()
    reader = sqlite3.connect(db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)  # holds a read snapshot
        w.add_update(update(_eid()))
        w.add_embedding(embedding(_eid()))
        assert w.flush() == 1
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)  # its snapshot is unchanged
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (2,)
    finally:
        reader.close()


def test_locked_database_raises_storage_error_and_keeps_pending_rows(db_path):
    url = f"sqlite:///{db_path}"
    upgrade(url)
    engine = open_engine(url, busy_timeout_ms=10)
    sleeps: list[float] = []
    w = EventWriter(engine, 100, 100, retries=3, backoff_s=0.01, sleep=sleeps.append)
    eid = _eid()
    w.add_update(update(eid))
    w.add_embedding(embedding(eid))
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StorageError, match="locked by another process"):
            w.flush()
        assert sleeps == [0.01, 0.02, 0.04]  # retried with backoff, then gave up
        assert w.pending == 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert w.flush() == 2  # nothing was lost
    assert count_rows(engine)["track_embeddings"] == 1
    engine.dispose()


def test_readers_work_while_another_process_holds_the_write_lock(db_path):
    from storage.queries import list_events, load_gallery

    url = f"sqlite:///{db_path}"
    upgrade(url)
    setup = open_engine(url)
    w = EventWriter(setup, 100, 100)
    w.add_update(update(_eid()))
    w.flush()
    setup.dispose()
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # a backup tool or a second writer
        reader = open_engine(url, busy_timeout_ms=50)  # a fresh engine: its first connection is opened now
        assert len(list_events(reader)) == 1  # facepro events
        assert list(load_gallery(reader, "m").names) == []  # recognition's gallery load at start
        assert count_rows(reader)["events"] == 1
        reader.dispose()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_storage_stage_waits_for_a_lock_shows_it_and_commits_everything_after():
    from pipeline.messages import StorageItem
    from storage.stage import StorageStage

    class _Locked:
        """An EventWriter whose database is locked for the first ``n`` flushes."""

        def __init__(self, n: int) -> None:
            self.n, self.pending, self.rows = n, 0, []

        def add_update(self, u: TrackUpdate) -> None:
            self.rows.append(u)
            self.pending += 1

        def add_embedding(self, r: EmbeddingRecord) -> None:  # pragma: no cover - not sent here
            raise AssertionError

        def due(self) -> bool:
            return self.pending > 0

        def flush(self) -> int:
            if self.n > 0:
                self.n -= 1
                raise StorageError("writing events: database facepro.db is locked by another process")
            done, self.pending = self.pending, 0
            return done

    writer = _Locked(3)
    stage = StorageStage(writer)  # type: ignore[arg-type]
    stage.process(None, StorageItem(producer="p", seq=1, update=update(_eid())))
    acks = []
    for _ in range(3):
        acks += stage.tick(0)
        assert acks == [] and "locked" in stage.last_error
    assert stage.counts["lock_waits"] == 3 and stage.counts["lock_wait_ms"] >= 0
    acks += stage.tick(0)
    assert [a.seqs.tolist() for a in acks] == [[1]] and stage.last_error == ""
    assert stage.counts["lock_wait_ms"] == 0 and stage.written == 1


def test_discard_drops_pending_rows(engine):
    w = EventWriter(engine, 100, 100)
    w.add_update(update(_eid()))
    assert w.discard() == 1 and w.pending == 0 and w.flush() == 0


# --------------------------------------------------------------- PostgreSQL

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A URL whose search_path is a fresh, uniquely named schema (dropped afterwards)."""
    explicit = os.environ.get("FACEPRO_TEST_POSTGRES_URL")
    base = explicit or DEFAULT_PG_URL
    admin = create_engine(base, connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as err:
        admin.dispose()
        if explicit:
            pytest.fail(
                f"FACEPRO_TEST_POSTGRES_URL={describe(base)} is set but the server is unreachable: "
                f"{' '.join(str(err.orig).split())}; start PostgreSQL or unset the variable to skip the postgres tests",
                pytrace=False,
            )
        pytest.skip(f"no PostgreSQL at {describe(base)} (set FACEPRO_TEST_POSTGRES_URL to test one)")
    schema = f"facepro_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres
def test_postgres_upgrade_writer_and_queries_round_trip(pg_url):
    assert current_revision(pg_url) is None
    assert upgrade(pg_url) == head_revision()
    assert current_revision(pg_url) == head_revision()
    engine = open_engine(pg_url)
    try:
        with engine.begin() as conn:
            command.check(alembic_config(conn))  # no drift on PostgreSQL either
            assert conn.exec_driver_sql("SELECT current_schema()").scalar().startswith("facepro_test_")

        vectors = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
        enroll(engine, "alice", vectors, "arcface", ["a.jpg", "b.jpg"], [None, None])
        eid, other = _eid(), _eid()
        rec = embedding(eid, dim=8, seed=4)
        w = EventWriter(engine, 100, 100)
        w.add_update(update(eid, first=2, last=10, identity="alice", method="face", identity_score=0.7))
        w.add_update(update(eid, first=3, last=30, identity="alice", method="face", identity_score=0.8))
        w.add_update(update(other, camera="cam1", t0=T0 + SEC, identity="nobody", snapshot_path="/nonexistent/s.jpg"))
        w.add_embedding(rec)
        w.add_embedding(embedding(other, dim=8, seed=5, kind="reid"))
        assert w.flush() == 4
        w.add_update(update(eid, first=1, last=30, best_score=0.95, identity="alice", method="face", identity_score=0.8))
        w.add_update(update(other, camera="cam1", t0=T0 + SEC, last=5, snapshot_path="/nonexistent/s.jpg"))  # stale: ignored
        w.flush()

        rows = list_events(engine)
        assert [r.event_id for r in rows] == [other, eid]
        assert w.unknown_identity == 1
        ev = rows[1]
        assert (ev.identity, ev.first_frame, ev.last_frame, ev.best_score) == ("alice", 1, 30, 0.95)
        assert ev.started_at == ns_to_datetime(T0 + 1 * SEC // 10)
        assert ev.started_at.utcoffset().total_seconds() == 0
        assert rows[0].last_frame == 10
        assert [r.event_id for r in list_events(engine, camera="cam1")] == [other]
        assert [r.event_id for r in list_events(engine, identity="alice")] == [eid]

        names, gallery = load_gallery(engine, "arcface")
        assert names == ["alice", "alice"] and np.array_equal(gallery, vectors)
        with engine.connect() as conn:
            blob = conn.exec_driver_sql("SELECT vector FROM track_embeddings").scalar()
        assert bytes(blob) == rec.vector.astype("<f4").tobytes()

        assert delete_identity(engine, "alice")
        assert list_events(engine, camera="cam0")[0].identity is None
        assert count_rows(engine) == {
            "cameras": 2, "identities": 0, "face_embeddings": 0, "events": 2,
            "track_embeddings": 1, "reid_embeddings": 1, "gait_embeddings": 0, "snapshots": 1, "mqtt_outbox": 0, "jobs": 0,
            "unknown_clusters": 0, "face_negatives": 0,
        }
    finally:
        engine.dispose()


# ------------------------------------------------ named tracks for cross-process linking


def _track_vector(event_id: str, kind: str, model: str = "osnet", seed: int = 0, frame_index: int = -1) -> EmbeddingRecord:
    v = np.random.default_rng(seed).standard_normal(16).astype(np.float32)
    return EmbeddingRecord(event_id, kind, model, v / np.linalg.norm(v), frame_index=frame_index)


def test_named_track_vectors_reads_new_named_track_level_rows_of_other_cameras(engine):
    enroll(engine, "alice", np.eye(1, 4, dtype=np.float32), "m")
    enroll(engine, "bob", np.eye(1, 4, dtype=np.float32), "m")
    assert last_vector_id(engine, "reid") == 0
    own, other, unnamed, per_frame, other_model, gait = (_eid() for _ in range(6))
    w = EventWriter(engine, 100, 100)
    w.add_update(update(own, camera="cam0", identity="alice", method="face", identity_score=0.7))
    w.add_update(update(other, camera="cam1", identity="bob", method="face", identity_score=0.6))
    w.add_update(update(unnamed, camera="cam1"))
    w.add_update(update(per_frame, camera="cam1", identity="bob", method="face"))
    w.add_update(update(other_model, camera="cam1", identity="bob", method="face"))
    w.add_update(update(gait, camera="cam1", identity="bob", method="reid", identity_score=0.95))
    for eid, rec in [(own, _track_vector(own, "reid", seed=1)), (other, _track_vector(other, "reid", seed=2)),
                     (unnamed, _track_vector(unnamed, "reid", seed=3)), (per_frame, _track_vector(per_frame, "reid", seed=4, frame_index=5)),
                     (other_model, _track_vector(other_model, "reid", model="osnet_other", seed=5)),
                     (gait, _track_vector(gait, "gait", model="gei-64x44", seed=6))]:
        w.add_embedding(rec)
    w.flush()
    got = named_track_vectors(engine, "reid", "osnet", 0, exclude_cameras=["cam0"])
    assert (got.cameras, got.identities, got.methods, got.scores) == (("cam1",), ("bob",), ("face",), (0.6,))
    assert np.array_equal(got.vectors, _track_vector(other, "reid", seed=2).vector[None])
    assert got.last_id == last_vector_id(engine, "reid") == 5  # skipped rows move the cursor on too
    again = named_track_vectors(engine, "reid", "osnet", got.last_id)
    assert again.identities == () and again.vectors.shape[0] == 0 and again.last_id == got.last_id
    both = named_track_vectors(engine, "reid", "osnet", 0)
    assert both.identities == ("alice", "bob")
    g = named_track_vectors(engine, "gait", "gei-64x44", 0, exclude_cameras=["cam0"])
    assert (g.identities, g.methods) == (("bob",), ("reid",))


def test_named_track_vectors_pages_by_limit_without_losing_rows(engine):
    enroll(engine, "alice", np.eye(1, 4, dtype=np.float32), "m")
    ids = [_eid() for _ in range(5)]
    w = EventWriter(engine, 100, 100)
    for i, eid in enumerate(ids):
        w.add_update(update(eid, camera="cam1", identity="alice", method="face"))
        w.add_embedding(_track_vector(eid, "reid", seed=i))
    w.flush()
    seen, after = [], 0
    for _ in range(4):
        page = named_track_vectors(engine, "reid", "osnet", after, limit=2)
        seen += [v.tobytes() for v in page.vectors]
        after = page.last_id
    assert seen == [_track_vector(eid, "reid", seed=i).vector.tobytes() for i, eid in enumerate(ids)]


@pytest.mark.parametrize("kind, limit, error", [("face_gallery", 10, "kind: expected one of"), ("reid", 0, "limit: expected 1 to")])
def test_named_track_vectors_refuses_bad_arguments(engine, kind, limit, error):
    with pytest.raises(ValueError, match=error):
        named_track_vectors(engine, kind, "osnet", 0, limit=limit)


def test_an_unopenable_database_names_its_folder(tmp_path):
    from storage.db import _unreadable_hint

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    hint = _unreadable_hint(blocker / "facepro.db", "unable to open database file")
    assert str(blocker) in hint and "FACEPRO_DATA_DIR" in hint
    assert _unreadable_hint(tmp_path / "facepro.db", "file is not a database") == "is it a SQLite database?"
