"""Backup archives on real SQLite files: create, list, prune, verified restore, refusal of unsafe archives."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from alembic import command

from storage.backup import (
    BackupError,
    BackupInfo,
    create_backup,
    list_backups,
    prune_backups,
    restore_backup,
)
from storage.db import SchemaError, StorageError, alembic_config, current_revision, head_revision, open_engine, upgrade
from storage.queries import count_rows, enroll
from storage.writer import EventWriter
from tests.unit.test_storage import _eid, embedding, update


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "enroll"
    folder.mkdir()
    paths = []
    for i, name in enumerate(["alice 1.jpg", "alice2.jpg", "bob.png"]):
        p = folder / name
        p.write_bytes(bytes([i]) * (1000 + i))
        paths.append(p)
    return paths


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text("cameras: []\n")
    return p


@pytest.fixture()
def dest(tmp_path: Path) -> Path:
    return tmp_path / "backups"


def _populate(url: str, images: list[Path], snapshot_dir: Path) -> None:
    upgrade(url)
    engine = open_engine(url)
    try:
        rng = np.random.default_rng(0)
        enroll(engine, "alice", rng.standard_normal((2, 8)).astype(np.float32), "arc",
               [str(images[0]), str(images[1])], [hashlib.sha256(p.read_bytes()).hexdigest() for p in images[:2]])
        enroll(engine, "bob", rng.standard_normal((1, 8)).astype(np.float32), "arc", [str(images[2])], [None])
        enroll(engine, "carol", rng.standard_normal((1, 8)).astype(np.float32), "arc", ["/gone/carol.jpg"], [None])
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        w = EventWriter(engine, 100, 100)
        for i in range(5):
            eid = _eid()
            snap = snapshot_dir / f"{eid}.jpg"
            snap.write_bytes(b"jpg" * 10)
            w.add_update(update(eid, last=10 + i, identity="alice" if i % 2 else None, snapshot_path=str(snap)))
            for k, kind in enumerate(("face", "reid", "gait")):
                w.add_embedding(embedding(eid, dim=16, seed=i * 3 + k, kind=kind))
        w.flush()
    finally:
        engine.dispose()


def _dump(db_path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, sorted."""
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        conn.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wipe(db_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------- round trip


def test_backup_wipe_restore_gives_identical_rows_and_files(url, db_path, data_dir, images, config, dest, tmp_path):
    _populate(url, images, data_dir / "snapshots")
    before = _dump(db_path)
    contents = {str(p): p.read_bytes() for p in images}

    archive = create_backup(url, data_dir, config, dest)

    _wipe(db_path)
    for p in images:
        p.unlink()
    result = restore_backup(archive, url, data_dir, running=False)

    assert _dump(db_path) == before
    assert result.database == db_path and result.schema_revision == head_revision() and result.previous is None
    assert set(result.faces) == set(contents)  # carol's image was gone at backup time
    for original, restored in result.faces.items():
        assert restored.parent == data_dir / "faces" and restored.read_bytes() == contents[original]
    assert result.config == data_dir / "restored-config" / "site.yaml"
    assert result.config.read_text() == config.read_text()
    assert not Path(f"{db_path}-wal").exists()
    assert list(db_path.parent.glob(".facepro-restore-*")) == []  # staging removed
    engine = open_engine(url)
    try:
        assert count_rows(engine)["reid_embeddings"] == 5
    finally:
        engine.dispose()


def test_manifest_lists_every_file_with_size_and_checksum(url, data_dir, images, config, dest):
    _populate(url, images, data_dir / "snapshots")
    archive = create_backup(url, data_dir, config, dest)
    assert archive.name.startswith("facepro-backup-") and archive.suffixes[-2:] == [".tar", ".gz"]
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
        blobs = {n: tar.extractfile(n).read() for n in names[1:]}
    assert names[0] == "manifest.json"
    assert manifest["format"] == "facepro-backup" and manifest["format_version"] == 1
    assert manifest["schema_revision"] == head_revision() and manifest["created_at"].endswith("+00:00")
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == set(blobs)
    assert {f["role"] for f in files.values()} == {"database", "face", "config"}
    assert sum(f["role"] == "face" for f in files.values()) == 3
    for name, blob in blobs.items():
        assert files[name]["size"] == len(blob) and files[name]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert {f["source"] for f in files.values() if f["role"] == "face"} == {str(p) for p in images}


def test_backup_is_consistent_while_a_writer_holds_a_transaction(url, db_path, data_dir, images, dest):
    _populate(url, images, data_dir / "snapshots")
    committed = _dump(db_path)
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the pipeline's writer, mid-transaction
        writer.execute("DELETE FROM reid_embeddings")
        writer.execute("INSERT INTO cameras (name, created_at) VALUES ('uncommitted', '2024-01-01 00:00:00')")
        archive = create_backup(url, data_dir, None, dest)  # neither blocked nor sees the open transaction
        writer.execute("COMMIT")
    finally:
        writer.close()
    _wipe(db_path)
    restore_backup(archive, url, data_dir, running=False)
    assert _dump(db_path) == committed


def test_restore_keeps_a_copy_of_the_replaced_database(url, db_path, data_dir, images, dest):
    _populate(url, images, data_dir / "snapshots")
    archive = create_backup(url, data_dir, None, dest)
    engine = open_engine(url)
    enroll(engine, "dave", np.ones((1, 8), np.float32), "arc")
    engine.dispose()
    newer = _dump(db_path)

    result = restore_backup(archive, url, data_dir, running=False)

    assert result.previous is not None and result.previous.name.startswith("facepro.db.bak-prerestore-")
    assert _dump(result.previous) == newer
    assert ("dave",) not in [r[1:2] for r in _dump(db_path)["identities"]]


def test_restored_older_schema_is_migrated_by_upgrade(url, db_path, data_dir, dest):
    engine = open_engine(url, foreign_keys=False)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    engine.dispose()
    raw = sqlite3.connect(db_path)
    raw.execute("INSERT INTO cameras (id, name, created_at) VALUES (1, 'cam0', '2024-01-01 00:00:00.000000')")
    raw.execute(
        "INSERT INTO events VALUES (?, 1, 1, 'person', '2024-01-01 00:00:00.000000', '2024-01-01 00:00:01.000000', "
        "0, 1, 0.5, 0, 0, 1, 1, NULL, NULL, 0, NULL, 0)", ("a" * 32,),
    )
    raw.execute(
        "INSERT INTO track_embeddings (event_id, kind, model, dim, vector, frame_index, quality, created_at) "
        "VALUES (?, 'reid', 'osnet', 1, ?, 0, 0.5, '2024-01-01 00:00:00.000000')", ("a" * 32, b"\0\0\x80?"),
    )
    raw.commit()
    raw.close()
    archive = create_backup(url, data_dir, None, dest)
    _wipe(db_path)

    assert restore_backup(archive, url, data_dir, running=False).schema_revision == "0001"
    assert current_revision(url) == "0001"
    assert upgrade(url) == head_revision()
    engine = open_engine(url)
    try:
        counts = count_rows(engine)
    finally:
        engine.dispose()
    assert (counts["events"], counts["reid_embeddings"], counts["track_embeddings"]) == (1, 1, 0)


# --------------------------------------------------------------- refusals


def test_restore_is_refused_while_the_pipeline_runs(url, db_path, data_dir, images, dest):
    _populate(url, images, data_dir / "snapshots")
    archive = create_backup(url, data_dir, None, dest)
    before = _sha(db_path)
    with pytest.raises(StorageError, match="pipeline is running; stop it first"):
        restore_backup(archive, url, data_dir, running=True)
    assert _sha(db_path) == before


Members = list[tuple[tarfile.TarInfo, bytes]]


def _rebuild(src: Path, dst: Path, edit: Callable[[dict[str, Any], Members], None]) -> Path:
    """Copy archive ``src`` to ``dst`` after ``edit(manifest, members)`` changed the manifest and/or members."""
    with tarfile.open(src, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    manifest = json.loads(members[0][1])
    rest = members[1:]
    edit(manifest, rest)
    with tarfile.open(dst, "w:gz") as out:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
        for info, blob in rest:
            out.addfile(info, io.BytesIO(blob) if info.isreg() else None)
    return dst


def _add_file(manifest: dict[str, Any], members: Members, name: str, blob: bytes, role: str = "face", listed: bool = True) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    members.append((info, blob))
    if listed:
        manifest["files"].append({"path": name, "role": role, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "source": None})


def _face(members: Members) -> tuple[tarfile.TarInfo, bytes]:
    return next(m for m in members if m[0].name.startswith("faces/"))


def _tamper(manifest: dict[str, Any], members: Members) -> None:
    info, blob = _face(members)
    members[members.index((info, blob))] = (info, bytes([blob[0] ^ 1]) + blob[1:])  # same size, other content


def _symlink(manifest: dict[str, Any], members: Members) -> None:
    info = tarfile.TarInfo("faces/link.jpg")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members.append((info, b""))
    manifest["files"].append({"path": "faces/link.jpg", "role": "face", "size": 0, "sha256": "0" * 64, "source": None})


def _drop_face(manifest: dict[str, Any], members: Members) -> None:
    members.remove(_face(members))


def _format(manifest: dict[str, Any], members: Members) -> None:
    manifest["format_version"] = 99


def _newer_schema(manifest: dict[str, Any], members: Members) -> None:
    manifest["schema_revision"] = "ffff9999"


UNSAFE = [
    ("dotdot", lambda m, ms: _add_file(m, ms, "faces/../../evil.txt", b"evil"), BackupError, "unsafe path"),
    ("dotdot_top", lambda m, ms: _add_file(m, ms, "../evil.txt", b"evil"), BackupError, "unsafe path"),
    ("dotdot_member_only", lambda m, ms: _add_file(m, ms, "../evil.txt", b"evil", listed=False), BackupError, "member '../evil.txt': unsafe path"),
    ("absolute", lambda m, ms: _add_file(m, ms, "/tmp/facepro-evil.txt", b"evil"), BackupError, "unsafe path"),
    ("unlisted", lambda m, ms: _add_file(m, ms, "faces/extra.jpg", b"x", listed=False), BackupError, "not listed in manifest"),
    ("symlink", _symlink, BackupError, "not a regular file"),
    ("tampered", _tamper, BackupError, "SHA-256 or size does not match"),
    ("missing", _drop_face, BackupError, "missing from the archive"),
    ("format", _format, BackupError, "format_version 99 is not supported"),
    ("wrong_role_folder", lambda m, ms: _add_file(m, ms, "db/other.db", b"x", role="face"), BackupError, "expected <db/"),
    ("newer_schema", _newer_schema, BackupError, "differs from the manifest"),
]


@pytest.mark.parametrize(("edit", "error", "match"), [u[1:] for u in UNSAFE], ids=[u[0] for u in UNSAFE])
def test_unsafe_or_damaged_archives_are_refused_and_nothing_is_written(url, db_path, data_dir, images, dest, tmp_path, edit, error, match):
    _populate(url, images, data_dir / "snapshots")
    good = create_backup(url, data_dir, None, dest)
    bad = _rebuild(good, tmp_path / "bad.tar.gz", edit)
    before, listing = _sha(db_path), sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(error, match=match):
        restore_backup(bad, url, data_dir, running=False)

    assert _sha(db_path) == before
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing  # no file anywhere, no staging left
    assert not Path("/tmp/facepro-evil.txt").exists()


def test_a_backup_of_a_newer_schema_is_refused(url, db_path, data_dir, dest):
    upgrade(url)
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    raw.commit()
    raw.close()
    archive = create_backup(url, data_dir, None, dest)
    _wipe(db_path)
    with pytest.raises(SchemaError, match="'ffff9999', unknown to this FacePro"):
        restore_backup(archive, url, data_dir, running=False)
    assert not db_path.exists()


def test_not_an_archive_is_a_clear_error(url, data_dir, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(BackupError, match="cannot read the archive"):
        restore_backup(junk, url, data_dir, running=False)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda d, dest: create_backup("postgresql+psycopg2://u@h/db", d, None, dest), StorageError, "pg_dump"),
        (lambda d, dest: create_backup(f"sqlite:///{d}/missing.db", d, None, dest), StorageError, "does not exist"),
        (lambda d, dest: restore_backup(dest / "x.tar.gz", "postgresql+psycopg2://u@h/db", d, False), StorageError, "SQLite files only"),
        (lambda d, dest: prune_backups(dest, 0), ValueError, "keep: expected >= 1"),
    ],
)
def test_bad_arguments(data_dir, dest, call, error, match):
    with pytest.raises(error, match=match):
        call(data_dir, dest)


def test_missing_config_file_is_refused(url, data_dir, dest, tmp_path):
    upgrade(url)
    with pytest.raises(ValueError, match="config_path"):
        create_backup(url, data_dir, tmp_path / "nope.yaml", dest)
    assert not dest.exists() or list(dest.iterdir()) == []


# ------------------------------------------------------------- list / prune


def test_list_and_prune_backups(url, data_dir, dest):
    upgrade(url)
    archives = [create_backup(url, data_dir, None, dest) for _ in range(3)]
    (dest / "facepro-backup-junk.tar.gz").write_bytes(b"junk")
    (dest / "unrelated.tar.gz").write_bytes(b"junk")

    listed = list_backups(dest)
    good = [i for i in listed if i.error is None]
    assert [i.path for i in good] == archives[::-1]  # newest first
    assert all(isinstance(i, BackupInfo) and i.schema_revision == head_revision() and i.files == 1 for i in good)
    assert [i.path.name for i in listed if i.error] == ["facepro-backup-junk.tar.gz"]
    assert good[0].to_json()["created_at"].endswith("+00:00")

    assert prune_backups(dest, keep=1) == archives[1::-1]
    assert sorted(p.name for p in dest.iterdir()) == sorted([archives[2].name, "facepro-backup-junk.tar.gz", "unrelated.tar.gz"])
    assert prune_backups(dest, keep=1) == []
    assert list_backups(dest / "nowhere") == []


def test_archive_names_do_not_collide(url, data_dir, dest):
    upgrade(url)
    a, b = create_backup(url, data_dir, None, dest), create_backup(url, data_dir, None, dest)
    assert a != b and a.exists() and b.exists()
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []  # no partial files left


def test_restore_into_a_new_data_dir(url, db_path, data_dir, images, dest, tmp_path):
    _populate(url, images, data_dir / "snapshots")
    archive = create_backup(url, data_dir, None, dest)
    other = tmp_path / "elsewhere"
    result = restore_backup(archive, f"sqlite:///{other / 'facepro.db'}", other, running=False)
    assert _dump(other / "facepro.db") == _dump(db_path)
    assert sorted(p.parent for p in result.faces.values()) == [other / "faces"] * 3
    shutil.rmtree(other)
