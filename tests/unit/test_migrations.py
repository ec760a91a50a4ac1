"""Schema migrations on real SQLite files: upgrade/downgrade, drift check, backups, refusal of newer schemas."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import Inspector

import storage.db
from storage.db import (
    RevisionInfo,
    SchemaError,
    StorageError,
    alembic_config,
    current_revision,
    downgrade,
    enable_incremental_vacuum,
    head_revision,
    history,
    open_engine,
    upgrade,
)
from storage.models import TABLES, Base
from storage.queries import count_rows, enroll, list_identities
from tests.unit.test_storage import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL schema)

EXPECTED_INDEXES = {
    "events": {"ix_events_camera_id_started_at", "ix_events_identity_id_started_at", "ix_events_started_at",
               "ix_events_job_id_started_at", "ix_events_box_id_started_at", "ix_events_unknown_id_started_at"},
    "jobs": {"ix_jobs_state_created_at"},
    "unknown_clusters": {"ix_unknown_clusters_model_dim_tracks"},
    "face_negatives": {"ix_face_negatives_identity_id", "ix_face_negatives_model_identity_id"},
    "face_embeddings": {"ix_face_embeddings_identity_id", "ix_face_embeddings_model_identity_id"},
    "track_embeddings": set(),  # event_id lookups use the unique (event_id, model, frame_index) since 0004
    "reid_embeddings": set(),
    "gait_embeddings": set(),
    "mqtt_outbox": {"ix_mqtt_outbox_unsent"},  # partial: unsent rows only (0005)
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tables(url: str) -> set[str]:
    engine = open_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _backups(db_path: Path) -> list[Path]:
    return sorted(db_path.parent.glob(db_path.name + ".bak-*"))


def _alembic(url: str, fn, *args) -> None:
    engine = open_engine(url, foreign_keys=False)
    try:
        with engine.begin() as conn:
            fn(alembic_config(conn), *args)
    finally:
        engine.dispose()


def test_head_and_history():
    assert head_revision() == "0009"
    revs = history()
    assert [(r.revision, r.down_revision, r.is_head) for r in revs] == [
        ("0001", None, False), ("0002", "0001", False), ("0003", "0002", False), ("0004", "0003", False),
        ("0005", "0004", False), ("0006", "0005", False), ("0007", "0006", False), ("0008", "0007", False),
        ("0009", "0008", True)]
    assert all(isinstance(r, RevisionInfo) and r.message for r in revs)


def test_upgrade_fresh_file_creates_every_table_and_named_index(url, db_path):
    assert current_revision(url) is None
    assert not db_path.exists()  # reading the revision must not create the file

    assert upgrade(url) == head_revision()

    assert current_revision(url) == head_revision()
    assert _tables(url) == set(TABLES) | {"alembic_version"}
    assert _backups(db_path) == []  # nothing to back up on a new file
    engine = open_engine(url)
    try:
        insp = inspect(engine)
        for table, names in EXPECTED_INDEXES.items():
            assert {ix["name"] for ix in insp.get_indexes(table)} == names
        assert {fk["name"] for fk in insp.get_foreign_keys("events")} == {
            "fk_events_camera_id_cameras",
            "fk_events_identity_id_identities",
        }
        assert insp.get_unique_constraints("identities")[0]["name"] == "uq_identities_name"
    finally:
        engine.dispose()


def _plan(conn: sqlite3.Connection, sql: str, *params: object) -> str:
    return " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_0004_leaves_one_index_per_real_query_and_downgrade_restores_them(url, db_path):
    upgrade(url)
    conn = sqlite3.connect(db_path)
    try:
        sql = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
        assert sql["ix_events_identity_id_started_at"].endswith("WHERE identity_id IS NOT NULL")
        # the partial index still serves "events of identity X" and vector lookups use the unique key
        assert "ix_events_identity_id_started_at" in _plan(
            conn, "SELECT id FROM events WHERE identity_id = ? ORDER BY started_at DESC", 3)
        plan = _plan(conn, "SELECT vector FROM reid_embeddings WHERE event_id = ?", "e")
        assert "SEARCH reid_embeddings USING INDEX sqlite_autoindex_reid_embeddings" in plan and "(event_id=?)" in plan
    finally:
        conn.close()
    assert downgrade(url, "0003", backup=False) == "0003"
    engine = open_engine(url)
    try:
        insp = inspect(engine)
        for table in ("track_embeddings", "reid_embeddings", "gait_embeddings"):
            assert {ix["name"] for ix in insp.get_indexes(table)} == {f"ix_{table}_event_id"}
    finally:
        engine.dispose()
    conn = sqlite3.connect(db_path)
    try:
        (ddl,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'ix_events_identity_id_started_at'").fetchone()
        assert "WHERE" not in ddl
    finally:
        conn.close()


def test_0005_adds_the_mqtt_outbox_and_downgrade_drops_it(url, db_path):
    _alembic(url, command.upgrade, "0004")
    engine = open_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO cameras (id, name, created_at) VALUES (1, 'c', :t)"), {"t": TS})
    finally:
        engine.dispose()
    assert upgrade(url, backup=False) == head_revision()
    conn = sqlite3.connect(db_path)
    try:
        (ddl,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'ix_mqtt_outbox_unsent'").fetchone()
        assert ddl.endswith("WHERE sent_at IS NULL")
        conn.execute("INSERT INTO mqtt_outbox (event_id, seq, type, payload, created_at) VALUES ('e', 1, 'new', '{}', 't')")
        conn.execute("INSERT INTO mqtt_outbox (event_id, seq, type, payload, created_at) VALUES ('e', 2, 'end', '{}', 't')")
        assert [r[0] for r in conn.execute("SELECT id FROM mqtt_outbox ORDER BY id")] == [1, 2]  # autoincrement
        for bad in ("('e', 2, 'new', '{}', 't')", "('f', 0, 'new', '{}', 't')", "('g', 1, 'moved', '{}', 't')"):
            with pytest.raises(sqlite3.IntegrityError):  # repeated (event, seq); seq < 1; unknown type
                conn.execute(f"INSERT INTO mqtt_outbox (event_id, seq, type, payload, created_at) VALUES {bad}")
        plan = _plan(conn, "SELECT id FROM mqtt_outbox WHERE sent_at IS NULL AND id > ? ORDER BY id", 0)
        assert "ix_mqtt_outbox_unsent" in plan
        conn.commit()
    finally:
        conn.close()
    assert downgrade(url, "0004", backup=False) == "0004"
    assert _tables(url) == set(TABLES) - {"mqtt_outbox", "jobs", "unknown_clusters", "face_negatives"} | {"alembic_version"}  # later ones go too
    assert count_rows_0004(url)["cameras"] == 1
    assert upgrade(url, backup=False) == head_revision()
    assert "mqtt_outbox" in _tables(url)


def count_rows_0004(url: str) -> dict[str, int]:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return {"cameras": conn.execute(text("SELECT count(*) FROM cameras")).scalar_one()}
    finally:
        engine.dispose()


def _event_0004(conn: Connection, event_id: str) -> None:
    conn.execute(text("INSERT OR IGNORE INTO cameras (id, name, created_at) VALUES (1, 'cam0', :t)"), {"t": TS})
    conn.execute(
        text("INSERT INTO events (id, camera_id, track_id, label, started_at, ended_at, first_frame, last_frame, "
             "best_score, x1, y1, x2, y2, identity_score, ended) VALUES (:id, 1, 1, 'person', :t, :t, 0, 5, 0.5, "
             "1, 2, 3, 4, 0, 1)"), {"id": event_id, "t": TS})


def test_0006_adds_jobs_and_events_job_id_and_downgrade_removes_them(url, db_path):
    from storage.jobs import JobTable

    _alembic(url, command.upgrade, "0005")
    engine = open_engine(url)
    with engine.begin() as conn:
        _event_0004(conn, EV1)
    with engine.connect() as conn:
        before = _dump(conn, ("events",))
    engine.dispose()

    _alembic(url, command.upgrade, "0006")
    assert current_revision(url) == "0006"
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT job_id FROM events").fetchall() == [(None,)]  # old events: not from a job
        sql = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
        assert sql["ix_events_job_id_started_at"].endswith("WHERE job_id IS NOT NULL")
        assert "ix_events_job_id_started_at" in _plan(
            raw, "SELECT id FROM events WHERE job_id = ? ORDER BY started_at DESC", "j" * 36)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            raw.execute("INSERT INTO jobs (id, type, state, params, progress, frames_done, created_at, updated_at) "
                        "VALUES (:id, 'analyze', 'paused', '{}', 0, 0, :t, :t)", {"id": "j" * 36, "t": TS})
    finally:
        raw.close()
    engine = open_engine(url)
    JobTable(engine).create("1" * 36, "backup", {})
    engine.dispose()

    assert downgrade(url, "0005", backup=False) == "0005"
    assert "jobs" not in _tables(url)
    engine = open_engine(url)
    try:
        assert "job_id" not in {c["name"] for c in inspect(engine).get_columns("events")}
        with engine.connect() as conn:
            assert _dump(conn, ("events",)) == before  # the events themselves survive both ways
    finally:
        engine.dispose()


def test_0009_adds_identity_samples_and_downgrade_keeps_identities_and_embeddings(url, db_path):
    _alembic(url, command.upgrade, "0008")
    engine = open_engine(url)
    with engine.begin() as conn:
        _event_0004(conn, EV1)  # camera 1, event EV1 of no one
        conn.execute(text("INSERT INTO identities (id, name, created_at) VALUES (1, 'alice', :t)"), {"t": TS})
        conn.execute(text("INSERT INTO face_embeddings (identity_id, model, dim, vector, created_at) "
                          "VALUES (1, 'arc', 2, :v, :t)"), {"v": np.array([1, 2], np.float32).tobytes(), "t": TS})
        conn.execute(text("UPDATE events SET identity_id = 1"))
    with engine.connect() as conn:
        before = _dump(conn, ("identities", "face_embeddings", "events"))
    engine.dispose()

    assert upgrade(url, backup=False) == "0009"
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT name, sample FROM identities").fetchall() == [("alice", None)]  # enrolled before: none
        with raw:
            raw.execute("UPDATE identities SET sample = ? WHERE name = 'alice'", (b"\xff\xd8\xff sample",))
    finally:
        raw.close()
    assert downgrade(url, "0008", backup=False) == "0008"
    engine = open_engine(url)
    try:
        assert "sample" not in {c["name"] for c in inspect(engine).get_columns("identities")}
        with engine.connect() as conn:  # the table rebuild lost no identity, embedding or event link
            assert _dump(conn, ("identities", "face_embeddings", "events")) == before
    finally:
        engine.dispose()


def test_upgrade_at_head_is_a_no_op(url, db_path):
    upgrade(url)
    before = _sha(db_path)
    assert upgrade(url) == head_revision()
    assert _sha(db_path) == before
    assert _backups(db_path) == []


def test_downgrade_base_then_upgrade_head_again(url, db_path):
    upgrade(url)
    _alembic(url, command.downgrade, "base")
    assert current_revision(url) is None
    assert _tables(url) == {"alembic_version"}

    assert upgrade(url, backup=False) == head_revision()
    assert _tables(url) == set(TABLES) | {"alembic_version"}
    assert _backups(db_path) == []


def test_downgrade_helper_backs_up_and_goes_to_base(url, db_path):
    upgrade(url)
    assert downgrade(url, "0001") == "0001"
    assert current_revision(url) == "0001"
    assert _tables(url) == {"cameras", "identities", "face_embeddings", "events", "track_embeddings", "alembic_version"}
    assert [b.name.split("-")[1] for b in _backups(db_path)] == [head_revision()]
    assert downgrade(url, "0001") == "0001"  # already there: nothing to do, no backup
    assert downgrade(url, "base", backup=False) is None
    assert _tables(url) == {"alembic_version"}
    assert len(_backups(db_path)) == 1


@pytest.mark.parametrize(
    ("start", "target", "match"),
    [
        ("0002", "9999", "unknown; expected 'base' or one of"),
        ("0001", "0003", "newer than the database's '0001'"),
        (None, "0001", "has no schema revision"),
    ],
)
def test_downgrade_refuses_bad_targets_without_touching_the_file(url, db_path, start, target, match):
    if start is not None:
        _alembic(url, command.upgrade, start)
    before = _sha(db_path) if db_path.exists() else None
    with pytest.raises(ValueError, match=match):
        downgrade(url, target)
    assert (_sha(db_path) if db_path.exists() else None) == before
    assert _backups(db_path) == []


def test_new_file_gets_incremental_auto_vacuum(url, db_path):
    upgrade(url)
    assert _pragma(db_path, "auto_vacuum") == 2  # INCREMENTAL
    assert enable_incremental_vacuum(url) is False


def test_upgrading_an_old_file_converts_it_to_incremental_auto_vacuum(url, db_path):
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA auto_vacuum=NONE")
    raw.execute("CREATE TABLE keep (x INTEGER)")  # the file now has auto_vacuum=NONE for good
    raw.commit()
    raw.close()
    assert _pragma(db_path, "auto_vacuum") == 0
    upgrade(url, backup=False)
    assert _pragma(db_path, "auto_vacuum") == 2
    assert current_revision(url) == head_revision()


def _pragma(db_path: Path, name: str) -> int:
    raw = sqlite3.connect(db_path)
    try:
        return raw.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        raw.close()


# ------------------------------------------------------ 0001 -> 0002 -> 0001 with rows

TS = "2024-01-02 03:04:05.000006"
EV1, EV2 = "a" * 32, "b" * 32


def _seed_0001(conn: Connection) -> None:
    """Rows of every 0001 table, written with plain SQL (the models describe the head schema)."""
    conn.execute(text("INSERT INTO cameras (id, name, created_at) VALUES (1, 'cam0', :t)"), {"t": TS})
    conn.execute(text("INSERT INTO identities (id, name, created_at) VALUES (1, 'alice', :t)"), {"t": TS})
    conn.execute(
        text("INSERT INTO face_embeddings (identity_id, model, dim, vector, image_path, image_sha256, created_at) "
             "VALUES (1, 'arc', 2, :v, '/img/a.jpg', NULL, :t)"),
        {"v": np.array([1, 2], np.float32).tobytes(), "t": TS},
    )
    for eid, snap, ident in ((EV1, "/snap/a.jpg", 1), (EV2, None, None)):
        conn.execute(
            text("INSERT INTO events (id, camera_id, track_id, label, started_at, ended_at, first_frame, last_frame, "
                 "best_score, x1, y1, x2, y2, identity_id, method, identity_score, snapshot_path, ended) "
                 "VALUES (:id, 1, 7, 'person', :t, :t, 0, 9, 0.5, 1, 2, 3, 4, :ident, 'face', 0.7, :snap, :ended)"),
            {"id": eid, "t": TS, "ident": ident, "snap": snap, "ended": True},
        )
    for i, (eid, kind) in enumerate([(EV1, "face"), (EV1, "reid"), (EV1, "gait"), (EV2, "reid"), (EV2, "face")]):
        conn.execute(
            text("INSERT INTO track_embeddings (event_id, kind, model, dim, vector, frame_index, quality, created_at) "
                 "VALUES (:e, :k, :m, 3, :v, :f, 0.5, :t)"),
            {"e": eid, "k": kind, "m": f"{kind}_model", "v": np.full(3, i, np.float32).tobytes(), "f": i, "t": TS},
        )


def _dump(conn: Connection, tables: tuple[str, ...], without_id: tuple[str, ...] = (),
          added: tuple[str, ...] = ("events.job_id", "events.box_id", "events.box_seq", "events.unknown_id",
                                    "identities.sample")) -> dict[str, list[tuple]]:
    """Every row of ``tables``, sorted; the ``id`` column is left out for ``without_id`` (renumbered rows), and
    the columns in ``added`` (``table.column`` of later revisions) are left out."""
    out = {}
    for table in tables:
        cols = [c["name"] for c in inspect(conn).get_columns(table)
                if not (table in without_id and c["name"] == "id") and f"{table}.{c['name']}" not in added]
        rows = conn.execute(text(f"SELECT {', '.join(cols)} FROM {table}")).all()
        out[table] = sorted((tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows), key=repr)
    return out


V1_TABLES = ("cameras", "identities", "face_embeddings", "events", "track_embeddings")


def _round_trip_keeps_rows(url: str) -> None:
    _alembic(url, command.upgrade, "0001")
    engine = open_engine(url)
    try:
        with engine.begin() as conn:
            _seed_0001(conn)
        with engine.connect() as conn:
            before = _dump(conn, V1_TABLES, without_id=("track_embeddings",))
    finally:
        engine.dispose()

    assert upgrade(url, backup=False) == head_revision()
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            after = _dump(conn, TABLES, without_id=("track_embeddings", "reid_embeddings", "gait_embeddings", "snapshots"))
    finally:
        engine.dispose()
    for table in ("cameras", "identities", "face_embeddings", "events"):
        assert after[table] == before[table]
    kinds = {"face": "track_embeddings", "reid": "reid_embeddings", "gait": "gait_embeddings"}
    for kind, table in kinds.items():
        moved = [r[:1] + r[2:] for r in before["track_embeddings"] if r[1] == kind]  # without the kind column
        stored = [r[:1] + r[2:] for r in after[table]] if table == "track_embeddings" else after[table]
        assert sorted(stored, key=repr) == sorted(moved, key=repr), table
    assert [r[:2] + r[3:] for r in after["snapshots"]] == [(EV1, "/snap/a.jpg", None)]

    assert downgrade(url, "0001", backup=False) == "0001"
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            assert _dump(conn, V1_TABLES, without_id=("track_embeddings",)) == before
    finally:
        engine.dispose()
    assert downgrade(url, "base", backup=False) is None
    assert upgrade(url, backup=False) == head_revision()


def test_rows_survive_0001_to_0002_and_back(url):
    _round_trip_keeps_rows(url)


@pytest.mark.postgres
def test_postgres_rows_survive_0001_to_0002_and_back(pg_url):  # noqa: F811
    _round_trip_keeps_rows(pg_url)


def test_head_schema_refuses_a_reid_row_in_the_face_table(url):
    upgrade(url)
    engine = open_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO cameras (id, name, created_at) VALUES (1, 'c', :t)"), {"t": TS})
        with pytest.raises(Exception, match="CHECK constraint failed"):
            with engine.begin() as conn:
                conn.execute(
                    text("INSERT INTO events (id, camera_id, track_id, label, started_at, ended_at, first_frame, last_frame, "
                         "best_score, x1, y1, x2, y2, identity_score, ended) VALUES (:id, 1, 1, 'p', :t, :t, 0, 0, 0, 0, 0, 0, 0, 0, 0)"),
                    {"id": EV1, "t": TS},
                )
                conn.execute(
                    text("INSERT INTO track_embeddings (event_id, kind, model, dim, vector, frame_index, quality, created_at) "
                         "VALUES (:e, 'reid', 'm', 1, :v, 0, 0, :t)"),
                    {"e": EV1, "v": b"\0\0\0\0", "t": TS},
                )
    finally:
        engine.dispose()


def _constraint_names(insp: Inspector, table: str) -> dict[str, set]:
    return {
        "check": {c["name"] for c in insp.get_check_constraints(table)},
        "unique": {c["name"] for c in insp.get_unique_constraints(table)},
        "fk": {(fk["name"], fk["options"].get("ondelete")) for fk in insp.get_foreign_keys(table)},
        "index": {ix["name"] for ix in insp.get_indexes(table) if not ix.get("duplicates_constraint")},
    }


def _model_constraint_names(table: str) -> dict[str, set]:
    from sqlalchemy import CheckConstraint, ForeignKeyConstraint, UniqueConstraint

    t = Base.metadata.tables[table]
    return {
        "check": {c.name for c in t.constraints if isinstance(c, CheckConstraint)},
        "unique": {c.name for c in t.constraints if isinstance(c, UniqueConstraint)},
        "fk": {(c.name, c.ondelete) for c in t.constraints if isinstance(c, ForeignKeyConstraint)},
        "index": {ix.name for ix in t.indexes},
    }


def _assert_no_drift(engine: Engine) -> None:
    with engine.begin() as conn:
        command.check(alembic_config(conn))  # raises AutogenerateDiffsDetected on drift
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        insp = inspect(conn)
        for table in TABLES:  # what autogenerate does not compare: CHECK names, ON DELETE
            assert _constraint_names(insp, table) == _model_constraint_names(table), table


def test_models_and_migrations_do_not_drift(url):
    upgrade(url)
    engine = open_engine(url, foreign_keys=False)
    try:
        _assert_no_drift(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_models_and_migrations_do_not_drift(pg_url):  # noqa: F811
    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        _assert_no_drift(engine)
    finally:
        engine.dispose()


def test_newer_schema_is_refused_without_touching_the_file(url, db_path):
    upgrade(url)
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    raw.commit()
    raw.close()
    before = _sha(db_path)

    with pytest.raises(SchemaError) as info:
        upgrade(url)

    msg = str(info.value)
    assert str(db_path) in msg and "'ffff9999'" in msg and repr(head_revision()) in msg
    assert "Upgrade FacePro" in msg and "restore a backup" in msg
    assert _sha(db_path) == before
    assert _backups(db_path) == []
    assert current_revision(url) == "ffff9999"


def test_unmanaged_facepro_tables_are_refused(url, db_path):
    engine = open_engine(url)
    Base.metadata.create_all(engine)  # tables without alembic_version
    engine.dispose()
    with pytest.raises(SchemaError, match="no schema revision"):
        upgrade(url, backup=False)
    assert "alembic_version" not in _tables(url)


def test_upgrade_on_a_locked_database_raises_storage_error(url, db_path):
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE other (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO other VALUES (1)")
    try:
        with pytest.raises(StorageError, match="locked by another process"):
            upgrade(url, backup=False, busy_timeout_ms=20)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert upgrade(url, backup=False) == head_revision()


def test_corrupt_file_is_a_clear_error(url, db_path):
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="is it a SQLite database"):
        upgrade(url)


# ---------------------------------------------------------------- a further revision

SECOND_REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = "{new}"
down_revision = "{real}"
branch_labels = None
depends_on = None


def upgrade():
    # rebuilds the parent table of face_embeddings (ON DELETE CASCADE): must not lose children
    with op.batch_alter_table("identities", recreate="always") as batch:
        batch.add_column(sa.Column("note", sa.String(32), nullable=True))


def downgrade():
    with op.batch_alter_table("identities", recreate="always") as batch:
        batch.drop_column("note")
'''


@pytest.fixture()
def two_revisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A copy of the migration scripts with a test revision on top of the real head, used by storage.db;
    returns ``(real head, test revision)``."""
    real = head_revision()
    new = f"{int(real) + 1:04d}"
    scripts = tmp_path / "alembic"
    shutil.copytree(storage.db.script_location(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / f"{new}_test.py").write_text(SECOND_REVISION.replace("{new}", new).replace("{real}", real))
    monkeypatch.setattr(storage.db, "script_location", lambda: scripts)
    return real, new


def test_upgrade_behind_head_backs_up_and_keeps_child_rows(url, db_path, two_revisions):
    _alembic(url, command.upgrade, two_revisions[0])
    engine = open_engine(url)
    vectors = np.arange(8, dtype=np.float32).reshape(2, 4)
    enroll(engine, "alice", vectors, "m", ["a.jpg", "b.jpg"], [None, None])
    engine.dispose()

    assert head_revision() == two_revisions[1]
    assert upgrade(url) == two_revisions[1]

    assert current_revision(url) == two_revisions[1]
    engine = open_engine(url)
    try:
        assert list_identities(engine) == [("alice", 2)]  # the rebuild did not cascade
        assert "note" in {c["name"] for c in inspect(engine).get_columns("identities")}
    finally:
        engine.dispose()
    (backup,) = _backups(db_path)
    assert backup.name.startswith(f"facepro.db.bak-{two_revisions[0]}-")
    old = sqlite3.connect(backup)
    try:
        assert old.execute("SELECT version_num FROM alembic_version").fetchall() == [(two_revisions[0],)]
        assert old.execute("SELECT count(*) FROM face_embeddings").fetchone() == (2,)
    finally:
        old.close()


def test_upgrade_without_backup_writes_none(url, db_path, two_revisions):
    _alembic(url, command.upgrade, two_revisions[0])
    assert upgrade(url, backup=False) == two_revisions[1]
    assert _backups(db_path) == []
    engine = open_engine(url)
    try:
        assert count_rows(engine)["identities"] == 0
    finally:
        engine.dispose()


def test_0008_adds_unknown_clusters_negatives_and_events_unknown_id_and_downgrade_removes_them(url, db_path):
    _alembic(url, command.upgrade, "0007")  # 0008's parent: the hub's events.box_id / box_seq exist
    engine = open_engine(url)
    with engine.begin() as conn:
        _event_0004(conn, EV1)  # a box's own event
        _event_0004(conn, EV2)
        conn.execute(text("UPDATE events SET box_id = 'box-a', box_seq = 3 WHERE id = :id"), {"id": EV2})  # a hub's
    with engine.connect() as conn:
        before = _dump(conn, ("events",), added=("events.job_id",))  # box_id and box_seq compared too
    engine.dispose()

    assert upgrade(url, backup=False) == head_revision()
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT unknown_id FROM events").fetchall() == [(None,), (None,)]  # old events: in no cluster
        sql = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
        assert sql["ix_events_unknown_id_started_at"].endswith("WHERE unknown_id IS NOT NULL")
        assert "ix_events_unknown_id_started_at" in _plan(
            raw, "SELECT id FROM events WHERE unknown_id = ? ORDER BY started_at DESC", 3)
        ins = ("INSERT INTO unknown_clusters (model, dim, vector, tracks, first_seen, last_seen, created_at) "
               "VALUES ('m', 2, :v, :n, :t, :t, :t)")
        for _ in range(3):
            raw.execute(ins, {"v": b"\0" * 8, "n": 1, "t": TS})
        raw.execute("DELETE FROM unknown_clusters WHERE id = 3")
        raw.execute(ins, {"v": b"\0" * 8, "n": 1, "t": TS})
        assert [r[0] for r in raw.execute("SELECT id FROM unknown_clusters ORDER BY id")] == [1, 2, 4]  # 3 never again
        for bad in ({"v": b"\0" * 4, "n": 1, "t": TS}, {"v": b"\0" * 8, "n": 0, "t": TS}):  # vector size; no track
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                raw.execute(ins, bad)
        raw.commit()
    finally:
        raw.close()

    assert downgrade(url, "0007", backup=False) == "0007"
    assert not {"unknown_clusters", "face_negatives"} & _tables(url)
    engine = open_engine(url)
    try:
        assert "unknown_id" not in {c["name"] for c in inspect(engine).get_columns("events")}
        with engine.connect() as conn:
            # the events themselves survive both ways, the hub's box_id and box_seq with them
            assert _dump(conn, ("events",), added=("events.job_id",)) == before
    finally:
        engine.dispose()
    raw = sqlite3.connect(db_path)
    try:  # SQLite rebuilt events to drop the column: 0006's and 0007's partial indexes are still partial
        sql = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
        assert sql["ix_events_box_id_started_at"].endswith("WHERE box_id IS NOT NULL")
        assert sql["ix_events_job_id_started_at"].endswith("WHERE job_id IS NOT NULL")
        assert "ix_events_unknown_id_started_at" not in sql
    finally:
        raw.close()


@pytest.mark.postgres
def test_postgres_0008_on_top_of_0007_and_back_keeps_the_hub_columns(pg_url):  # noqa: F811
    _alembic(pg_url, command.upgrade, "0007")
    engine = open_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO cameras (id, name, created_at) VALUES (1, 'cam0', :t)"), {"t": TS})
            for eid, box, seq in ((EV1, None, None), (EV2, "box-a", 3)):  # a box's own event and a hub's
                conn.execute(
                    text("INSERT INTO events (id, camera_id, track_id, label, started_at, ended_at, first_frame, "
                         "last_frame, best_score, x1, y1, x2, y2, identity_score, ended, box_id, box_seq) VALUES "
                         "(:id, 1, 1, 'person', :t, :t, 0, 5, 0.5, 1, 2, 3, 4, 0, true, :box, :seq)"),
                    {"id": eid, "t": TS, "box": box, "seq": seq})
        with engine.connect() as conn:
            before = _dump(conn, ("events",), added=("events.job_id",))
    finally:
        engine.dispose()

    _alembic(pg_url, command.upgrade, "0008")
    engine = open_engine(pg_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT unknown_id FROM events")).all() == [(None,), (None,)]
            conn.execute(text("UPDATE events SET unknown_id = 4 WHERE id = :id"), {"id": EV2})
        assert {"unknown_clusters", "face_negatives"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()

    assert downgrade(pg_url, "0007") == "0007"
    engine = open_engine(pg_url)
    try:
        insp = inspect(engine)
        assert not {"unknown_clusters", "face_negatives"} & set(insp.get_table_names())
        assert "unknown_id" not in {c["name"] for c in insp.get_columns("events")}
        indexes = {i["name"]: i for i in insp.get_indexes("events")}
        assert "ix_events_unknown_id_started_at" not in indexes and "ix_events_box_id_started_at" in indexes
        with engine.connect() as conn:
            assert _dump(conn, ("events",), added=("events.job_id",)) == before  # box_id and box_seq kept
    finally:
        engine.dispose()
