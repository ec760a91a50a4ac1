"""The MQTT outbox on real databases: rows written in the commit's transaction, payloads equal to the rows,
the publisher's reads and marks, and pruning of sent rows."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, text

from storage.db import open_engine, upgrade
from storage.models import utcnow
from storage.outbox import OutboxStore
from storage.queries import enroll
from storage.retention import prune_outbox
from storage.writer import EventWriter
from tests.unit.test_storage import T0, _eid, pg_url, update  # noqa: F401  (pg_url: fixture)

BOX = "box-1"


def _rows(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT event_id, seq, type, payload, sent_at FROM mqtt_outbox ORDER BY id"))]


def _stored(engine: Engine, event_id: str) -> dict:
    """The events row of ``event_id`` with its camera and identity names (what a payload must match)."""
    sql = ("SELECT e.id, c.name, e.label, e.best_score, e.started_at, e.ended_at, e.ended, e.x1, e.y1, e.x2, e.y2, "
           "i.name, e.identity_score, e.method, e.snapshot_path, e.track_id, e.first_frame, e.last_frame "
           "FROM events e JOIN cameras c ON c.id = e.camera_id "
           "LEFT JOIN identities i ON i.id = e.identity_id WHERE e.id = :id")
    with engine.connect() as conn:
        keys = ("id", "camera", "label", "score", "started_at", "ended_at", "ended", "x1", "y1", "x2", "y2",
                "identity", "identity_score", "method", "snapshot_path", "track_id", "first_frame", "last_frame")
        return dict(zip(keys, conn.execute(text(sql), {"id": event_id}).one()))


def _epoch(value) -> float:
    from datetime import datetime, timezone

    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def assert_matches_row(after: dict, row: dict, box: str = BOX) -> None:
    """An ``after`` object describes the stored row (times to the microsecond)."""
    assert after["id"] == row["id"] and after["camera"] == row["camera"] and after["label"] == row["label"]
    assert after["score"] == pytest.approx(row["score"], abs=1e-6)
    assert after["start_time"] == pytest.approx(_epoch(row["started_at"]), abs=1e-6)
    assert after["end_time"] == (pytest.approx(_epoch(row["ended_at"]), abs=1e-6) if row["ended"] else None)
    assert after["box"] == pytest.approx([row["x1"], row["y1"], row["x2"], row["y2"]], abs=0.01)
    assert after["identity"] == row["identity"] and after["method"] == row["method"]
    expected_sub = None if row["identity"] is None else [row["identity"], pytest.approx(row["identity_score"], abs=1e-6)]
    assert after["sub_label"] == expected_sub
    assert after["has_snapshot"] is (row["snapshot_path"] is not None)
    assert after["box_id"] == box
    assert (after["track_id"], after["first_frame"], after["last_frame"]) == (
        row["track_id"], row["first_frame"], row["last_frame"])
    assert after["identity_score"] == pytest.approx(row["identity_score"], abs=1e-6)


def _writer(engine: Engine, box: str | None = BOX) -> EventWriter:
    return EventWriter(engine, outbox_box_id=box)


def _write(w: EventWriter, *updates) -> None:
    for u in updates:
        w.add_update(u)
    w.flush()


def _lifecycle(engine: Engine) -> None:
    enroll(engine, "alice", np.eye(1, 8, dtype=np.float32), "m", ["a.jpg"], [None])
    w, eid = _writer(engine), _eid()
    _write(w, update(eid, last=10))
    _write(w, update(eid, last=12))  # nothing a subscriber acts on changed: no row
    _write(w, update(eid, last=14, identity="alice", method="face", identity_score=0.71))
    _write(w, update(eid, last=14, identity="alice", method="face", identity_score=0.71))  # re-sent: no row
    _write(w, update(eid, last=20, identity="alice", method="face", identity_score=0.71, ended=True))
    _write(w, update(eid, last=20, identity="alice", method="face", identity_score=0.71, ended=True))  # re-sent
    _write(w, update(eid, last=9))  # older than the stored row: ignored by the upsert, no row

    rows = _rows(engine)
    assert [(r[0], r[1], r[2]) for r in rows] == [(eid, 1, "new"), (eid, 2, "update"), (eid, 3, "end")]
    new, upd, end = (json.loads(r[3]) for r in rows)
    assert [m["type"] for m in (new, upd, end)] == ["new", "update", "end"]
    assert new["before"] == new["after"] and new["after"]["end_time"] is None and new["after"]["sub_label"] is None
    # before: the committed state just before the change (the sighting at frame 12 sent no message of its own)
    assert upd["before"] == {**new["after"], "last_frame": 12} and upd["after"]["sub_label"] == ["alice", pytest.approx(0.71)]
    assert upd["after"]["seq"] == 2 and end["after"]["seq"] == 3 and end["before"]["seq"] == 2
    assert end["before"]["identity"] == "alice" and end["before"]["end_time"] is None
    assert_matches_row(end["after"], _stored(engine, eid))
    assert all(r[4] is None for r in rows)  # nothing sent yet
    assert w.outbox_rows == 3


def test_new_update_end_rows_follow_the_committed_rows(engine: Engine) -> None:
    _lifecycle(engine)


@pytest.mark.postgres
def test_postgres_new_update_end_rows_follow_the_committed_rows(pg_url: str) -> None:  # noqa: F811
    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        _lifecycle(engine)
    finally:
        engine.dispose()


def test_an_event_committed_already_ended_gets_new_then_end_in_one_transaction(engine: Engine) -> None:
    w, eid = _writer(engine), _eid()
    w.add_update(update(eid, last=5))
    w.add_update(update(eid, last=8, ended=True, snapshot_path="/nowhere/s.jpg"))  # collapsed into one row
    w.flush()
    rows = _rows(engine)
    assert [(r[1], r[2]) for r in rows] == [(1, "new"), (2, "end")]
    new, end = (json.loads(r[3]) for r in rows)
    assert new["after"]["end_time"] is None and end["before"] == new["after"]
    assert end["after"]["has_snapshot"] is True
    assert_matches_row(end["after"], _stored(engine, eid))


def test_without_mqtt_no_outbox_rows(engine: Engine) -> None:
    w, eid = _writer(engine, box=None), _eid()
    _write(w, update(eid), update(eid, last=20, ended=True))
    assert _rows(engine) == [] and w.outbox_rows == 0


def test_a_failed_commit_writes_no_outbox_row(engine: Engine) -> None:
    w, eid = _writer(engine), _eid()
    w.add_update(update(eid))
    holder = engine.raw_connection()
    holder.driver_connection.execute("BEGIN IMMEDIATE")
    w.engine = open_engine(engine.url, busy_timeout_ms=10)
    w.retries = 0
    try:
        with pytest.raises(Exception, match="locked"):
            w.flush()
    finally:
        holder.driver_connection.execute("ROLLBACK")
        holder.close()
    assert _rows(engine) == []
    w.flush()  # the kept batch commits now, with its row
    assert [(r[1], r[2]) for r in _rows(engine)] == [(1, "new")]


def test_store_reads_in_order_marks_sent_and_counts(engine: Engine) -> None:
    w = _writer(engine)
    ids = [_eid() for _ in range(3)]
    for eid in ids:
        _write(w, update(eid))
    store = OutboxStore(engine)
    rows = store.unsent(0, 10)
    assert [r.event_id for r in rows] == ids and [r.kind for r in rows] == ["new"] * 3
    assert [r.id for r in store.unsent(rows[0].id, 1)] == [rows[1].id]
    assert store.pending() == 3
    store.mark_sent([rows[0].id, rows[2].id])
    assert [r.id for r in store.unsent(0, 10)] == [rows[1].id] and store.pending() == 1
    assert sorted(json.loads(p)["after"]["id"] for p in store.open_events()) == sorted([ids[0], ids[2]])
    assert OutboxStore(engine, since=utcnow() + timedelta(seconds=60)).open_events() == []  # rows of an earlier run


def test_open_events_forget_an_event_once_its_end_is_sent(engine: Engine) -> None:
    w, eid = _writer(engine), _eid()
    _write(w, update(eid))
    store = OutboxStore(engine)
    store.mark_sent([r.id for r in store.unsent(0, 10)])
    _write(w, update(eid, last=30, ended=True))
    assert len(store.open_events()) == 1  # the end is not sent yet: still in view for subscribers
    store.mark_sent([r.id for r in store.unsent(0, 10)])
    assert store.open_events() == []


def test_prune_deletes_sent_rows_nobody_needs_and_keeps_the_rest(engine: Engine) -> None:
    w, store = _writer(engine), OutboxStore(engine)
    done, open_, unsent = _eid(), _eid(), _eid()
    _write(w, update(done), update(open_))
    _write(w, update(done, last=30, ended=True), update(open_, last=30, identity=None, snapshot_path="/s.jpg"))
    store.mark_sent([r.id for r in store.unsent(0, 100)])
    _write(w, update(unsent))
    assert prune_outbox(engine) == 3  # done: new + end; open_: its new (its update carries the last seq)
    left = [(r[0], r[1], r[4] is not None) for r in _rows(engine)]
    assert left == [(open_, 2, True), (unsent, 1, False)]
    _write(w, update(open_, last=40, ended=True))
    assert [r[1] for r in _rows(engine) if r[0] == open_] == [2, 3]  # the sequence continues after pruning
    with engine.begin() as conn:  # retention deleted the event: its sent rows go, unsent ones stay
        conn.execute(text("DELETE FROM events WHERE id = :id"), {"id": open_})
    store.mark_sent([r.id for r in store.unsent(0, 100) if r.event_id == unsent])
    assert prune_outbox(engine) == 1
    assert [(r[0], r[1]) for r in _rows(engine)] == [(unsent, 1), (open_, 3)]


@pytest.fixture()
def engine_with_identity(engine: Engine) -> Iterator[Engine]:
    enroll(engine, "bob", np.eye(1, 8, dtype=np.float32), "m", ["b.jpg"], [None])
    yield engine


def test_store_lists_identities(engine_with_identity: Engine) -> None:
    assert OutboxStore(engine_with_identity).identities() == ["bob"]


def test_the_storage_stage_counts_outbox_rows_only_with_mqtt(engine: Engine) -> None:
    from storage.stage import StorageStage

    for box, expected in ((BOX, {"outbox_rows": 2}), (None, {})):
        stage = StorageStage(_writer(engine, box))
        eid = _eid()
        stage.process(None, update(eid))
        stage.process(None, update(eid, last=20, ended=True))
        stage.finish()
        assert {k: v for k, v in stage.counts.items() if k == "outbox_rows"} == expected
