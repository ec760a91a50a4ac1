"""Backups of a SQLite FacePro database, its enrolled face images and the config file, in one ``.tar.gz``.

Archive layout (``facepro-backup-<UTC time>.tar.gz``)::

    manifest.json                  first member: see below
    db/facepro.db                  consistent copy (SQLite online backup API), standalone file
    faces/<sha256[:16]>-<name>     each existing image named by face_embeddings.image_path
    config/<name>                  the config file, when given

``manifest.json``: ``{"format": "facepro-backup", "format_version": 1,
"created_at": ISO-8601 UTC, "schema_revision": "0002" | null,
"files": [{"path", "role": "database" | "face" | "config", "size", "sha256",
"source": original path | null}, ...]}``.

:func:`restore_backup` trusts nothing in an archive: every member must be a
regular file with a relative, normalised name listed in the manifest (no
absolute paths, ``..``, links or devices), every listed file must be
present with its size and SHA-256, and the database must pass
``PRAGMA quick_check``, all before anything outside a staging folder is
written. Database rows are restored exactly as backed up (``image_path``
values included); face images are restored to ``<data_dir>/faces/`` and the
result maps each original path to its restored file.

PostgreSQL databases are not handled here: use ``pg_dump`` / ``pg_restore``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from storage.db import StorageError, backup_sqlite, check_known, copy_sqlite, describe, sqlite_path

FORMAT = "facepro-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DB_MEMBER = "db/facepro.db"
#: Archive file names: ``facepro-backup-<YYYYmmddTHHMMSSZ>[-n].tar.gz``.
ARCHIVE_GLOB = "facepro-backup-*.tar.gz"
_ROLE_PREFIX = {"database": "db/", "face": "faces/", "config": "config/"}
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1024 * 1024


class BackupError(StorageError):
    """A backup archive that cannot be trusted or read (bad format, unsafe member, checksum mismatch)."""


@dataclass(frozen=True)
class BackupInfo:
    """One archive found by :func:`list_backups`.

    Attributes:
        path: the archive.
        size: archive size, bytes.
        created_at: from the manifest (aware UTC), None when unreadable.
        schema_revision: database schema revision in the manifest.
        files: files listed in the manifest.
        error: why the manifest could not be read, None when it could.
    """

    path: Path
    size: int
    created_at: datetime | None
    schema_revision: str | None
    files: int
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``path`` as text, ``created_at`` as ISO-8601)."""
        return {
            "path": str(self.path),
            "size": self.size,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "schema_revision": self.schema_revision,
            "files": self.files,
            "error": self.error,
        }


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore_backup` restored.

    Attributes:
        database: the database file now in place.
        schema_revision: its schema revision (run :func:`storage.db.upgrade` next).
        faces: original image path (as in ``face_embeddings.image_path``) -> restored file.
        config: the restored config file (``<data_dir>/restored-config/<name>``), or None.
        previous: a copy of the database that was replaced, or None when there was none.
    """

    database: Path
    schema_revision: str | None
    faces: dict[str, Path]
    config: Path | None
    previous: Path | None


@dataclass(frozen=True)
class _Entry:
    path: str
    role: str
    size: int
    sha256: str
    source: str | None


# ------------------------------------------------------------------ create


def create_backup(url: str, data_dir: Path, config_path: Path | None, dest_dir: Path) -> Path:
    """Write a backup archive of the SQLite database at ``url``, its face images and the config file.

    Safe while the pipeline writes: the database copy is one consistent
    snapshot taken with SQLite's online backup API (the writer is not
    blocked). The archive appears under its final name only when complete.

    Args:
        url: SQLAlchemy URL of a SQLite file (``sqlite:////path/facepro.db``).
        data_dir: FacePro data folder; relative ``image_path`` values are resolved against it.
        config_path: the YAML config to include, or None.
        dest_dir: folder for the archive (created if missing).

    Returns:
        The archive's path.

    Raises:
        ValueError: ``config_path`` is given but is not a file.
        StorageError: not a SQLite URL, the database file is missing or
            unreadable, or writing the archive failed (disk full...).
    """
    db = _sqlite_file(url)
    if not db.is_file():
        raise StorageError(f"backup: database file {db} does not exist; check storage.url / FACEPRO_DATA_DIR")
    if config_path is not None and not Path(config_path).is_file():
        raise ValueError(f"config_path: {config_path} is not a file; pass the YAML config used by the pipeline, or None")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".facepro-backup-") as tmp:
            staging = Path(tmp)
            copy = staging / "facepro.db"
            copy_sqlite(db, copy)
            revision, images = _read_copy(copy)
            sources = [(DB_MEMBER, "database", copy, None)]
            sources += _face_sources(images, data_dir)
            if config_path is not None:
                sources.append((f"config/{Path(config_path).name}", "config", Path(config_path), str(config_path)))
            return _write_archive(staging, dest_dir, revision, sources)
    except OSError as err:
        raise StorageError(f"backup to {dest_dir} failed: {err}; check free space and permissions") from None


def _sqlite_file(url: str) -> Path:
    path = sqlite_path(url)
    if path is None:
        raise StorageError(
            f"backup/restore handles SQLite files only, got {describe(url)}; "
            "back up PostgreSQL with pg_dump / pg_restore"
        )
    return path


def _read_copy(copy: Path) -> tuple[str | None, list[str]]:
    """Schema revision and distinct face image paths of a database copy."""
    conn = sqlite3.connect(str(copy))
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        images: list[str] = []
        if "face_embeddings" in tables:
            images = [r[0] for r in conn.execute("SELECT DISTINCT image_path FROM face_embeddings WHERE image_path IS NOT NULL ORDER BY 1")]
        return revision, images
    except sqlite3.Error as err:
        raise StorageError(f"backup: cannot read the database copy: {err}; is it a FacePro database?") from None
    finally:
        conn.close()


def _face_sources(images: list[str], data_dir: Path) -> list[tuple[str, str, Path, str | None]]:
    """``(member, role, file, source)`` for each image that exists, named by content hash."""
    out: dict[str, tuple[str, str, Path, str | None]] = {}
    for image in images:
        p = Path(image)
        p = p if p.is_absolute() else data_dir / p
        if not p.is_file():
            continue  # enrolled from a file that is gone: the vectors are still in the database
        digest = _sha256_file(p)
        member = f"faces/{digest[:16]}-{_safe_name(p.name)}"
        out.setdefault(member, (member, "face", p, image))
    return list(out.values())


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned or "image"


def _sha256_file(path: Path) -> str:
    from pipeline.models import sha256_file

    return sha256_file(path)


def _write_archive(staging: Path, dest_dir: Path, revision: str | None, sources: list[tuple[str, str, Path, str | None]]) -> Path:
    now = datetime.now(timezone.utc)
    entries = [_Entry(m, role, f.stat().st_size, _sha256_file(f), src) for m, role, f, src in sources]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": now.isoformat(),
        "schema_revision": revision,
        "files": [e.__dict__ for e in entries],
    }
    partial = staging / "archive.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode(), now)
        for (member, _, path, _), entry in zip(sources, entries):
            with open(path, "rb") as f:
                tar.addfile(_tarinfo(member, entry.size, now), f)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    target = _unused_name(dest_dir, now)
    os.replace(partial, target)
    return target


def _tarinfo(name: str, size: int, when: datetime) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(when.timestamp())
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, when: datetime) -> None:
    tar.addfile(_tarinfo(name, len(data), when), io.BytesIO(data))


def _unused_name(dest_dir: Path, now: datetime) -> Path:
    stem = f"facepro-backup-{now.strftime('%Y%m%dT%H%M%SZ')}"
    target, n = dest_dir / f"{stem}.tar.gz", 1
    while target.exists():
        target, n = dest_dir / f"{stem}-{n}.tar.gz", n + 1
    return target


# ------------------------------------------------------------------ list / prune


def list_backups(dest_dir: Path) -> list[BackupInfo]:
    """The archives named ``facepro-backup-*.tar.gz`` in ``dest_dir``, newest first.

    Only each manifest is read (the first member), not the whole archive; an
    archive whose manifest cannot be read is listed with ``error`` set (and
    sorted by file time). A missing folder gives ``[]``.
    """
    if not dest_dir.is_dir():
        return []
    infos = [_info(p) for p in dest_dir.glob(ARCHIVE_GLOB) if p.is_file()]
    return sorted(infos, key=lambda i: (i.created_at or datetime.fromtimestamp(i.path.stat().st_mtime, timezone.utc), i.path.name), reverse=True)


def _info(path: Path) -> BackupInfo:
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:gz") as tar:
            manifest = _read_manifest(tar)
    except (BackupError, tarfile.TarError, OSError, EOFError) as err:
        return BackupInfo(path, size, None, None, 0, error=str(err))
    return BackupInfo(path, size, manifest["created_at"], manifest["schema_revision"], len(manifest["files"]))


def prune_backups(dest_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest readable archives in ``dest_dir``.

    Archives whose manifest cannot be read are never deleted (inspect them by hand).

    Args:
        keep: archives to keep, >= 1.

    Returns:
        The deleted archives, newest first.

    Raises:
        ValueError: ``keep < 1``.
        StorageError: an archive could not be deleted.
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1 (the newest backups to keep), got {keep}")
    readable = [i for i in list_backups(dest_dir) if i.error is None]
    doomed = [i.path for i in readable[keep:]]
    for path in doomed:
        try:
            path.unlink()
        except OSError as err:
            raise StorageError(f"prune: cannot delete {path}: {err.strerror}; check permissions") from None
    return doomed


# ------------------------------------------------------------------ restore


def restore_backup(archive: Path, url: str, data_dir: Path, running: bool) -> RestoreResult:
    """Verify ``archive`` completely, then put its database, face images and config in place.

    The database replaces the file of ``url`` atomically (``os.replace``;
    a copy of the replaced file is kept as ``<db>.bak-<revision>-<time>``
    and its stale ``-wal`` / ``-shm`` files are removed). Face images go to
    ``<data_dir>/faces/``, the config to ``<data_dir>/restored-config/``
    (the current config is never overwritten). Run
    :func:`storage.db.upgrade` afterwards when the archive's schema is older.

    Args:
        archive: a ``.tar.gz`` written by :func:`create_backup`.
        url: SQLAlchemy URL of the SQLite file to replace.
        data_dir: FacePro data folder.
        running: whether a pipeline is running on this data; True refuses.

    Returns:
        A :class:`RestoreResult`.

    Raises:
        StorageError: ``running`` is True (stop the pipeline first), or not a SQLite URL.
        BackupError: unreadable archive, unknown format, a member that is not
            a regular file, has an absolute or ``..`` name or is not in the
            manifest, a missing file, a size or SHA-256 mismatch, or a
            database that fails ``quick_check``. Nothing was changed.
        SchemaError: the backed-up schema is newer than this FacePro's. Nothing was changed.
    """
    if running:
        raise StorageError("restore refused: the pipeline is running; stop it first ('facepro stop'), then restore")
    db = _sqlite_file(url)
    db.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=db.parent, prefix=".facepro-restore-") as tmp:
        staging = Path(tmp)
        manifest = _extract_verified(Path(archive), staging)
        revision = _check_database(staging / DB_MEMBER, manifest["schema_revision"], url)
        previous = _replace_database(staging / DB_MEMBER, db, revision)
        entries: list[_Entry] = manifest["files"]
        faces = {e.source or e.path: _place(staging / e.path, data_dir / "faces" / PurePosixPath(e.path).name) for e in entries if e.role == "face"}
        configs = [_place(staging / e.path, data_dir / "restored-config" / PurePosixPath(e.path).name) for e in entries if e.role == "config"]
    return RestoreResult(db, revision, faces, configs[0] if configs else None, previous)


def _extract_verified(archive: Path, staging: Path) -> dict[str, Any]:
    """Stream every member into ``staging`` after checking it against the manifest; returns the manifest."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            manifest = _read_manifest(tar)
            expected: dict[str, _Entry] = {e.path: e for e in manifest["files"]}
            seen: set[str] = set()
            for member in _members(tar):
                entry = _check_member(member, expected, seen)
                _stream(tar, member, entry, staging / entry.path)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BackupError(f"backup {archive}: cannot read the archive: {err}; is it a facepro backup (.tar.gz)?") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise BackupError(f"backup {archive}: files listed in the manifest are missing from the archive: {missing}; the archive is incomplete")
    return manifest


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member


def _check_member(member: tarfile.TarInfo, expected: dict[str, _Entry], seen: set[str]) -> _Entry:
    name = member.name
    _check_name(name)
    if not member.isreg():
        raise BackupError(f"backup member {name!r}: not a regular file (link, folder or device); refusing the archive")
    if name in seen:
        raise BackupError(f"backup member {name!r}: appears twice; refusing the archive")
    if name not in expected:
        raise BackupError(f"backup member {name!r}: not listed in manifest.json; refusing the archive")
    if member.size != expected[name].size:
        raise BackupError(f"backup member {name!r}: {member.size} bytes, the manifest says {expected[name].size}; the archive was modified")
    seen.add(name)
    return expected[name]


def _check_name(name: str) -> None:
    """Refuse absolute, ``..``, ``.``, empty-part, backslash or NUL names."""
    p = PurePosixPath(name)
    bad = (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(part in ("", ".", "..") for part in name.split("/"))
        or p.as_posix() != name
    )
    if bad:
        raise BackupError(f"backup member {name!r}: unsafe path (absolute, '..' or not normalised); refusing the archive")


def _stream(tar: tarfile.TarFile, member: tarfile.TarInfo, entry: _Entry, target: Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise BackupError(f"backup member {member.name!r}: cannot be read")
    target.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with src, open(target, "xb") as out:
        for block in iter(lambda: src.read(_BLOCK), b""):
            size += len(block)
            if size > entry.size:
                raise BackupError(f"backup member {member.name!r}: longer than the {entry.size} bytes in the manifest")
            h.update(block)
            out.write(block)
    if size != entry.size or h.hexdigest() != entry.sha256:
        raise BackupError(f"backup member {member.name!r}: SHA-256 or size does not match the manifest; the archive is damaged or was modified")


def _read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise BackupError(f"not a facepro backup: the first member must be {MANIFEST}")
    if first.size > _MAX_MANIFEST_BYTES:
        raise BackupError(f"{MANIFEST}: {first.size} bytes, larger than {_MAX_MANIFEST_BYTES}")
    f = tar.extractfile(first)
    assert f is not None  # a regular file
    try:
        doc = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BackupError(f"{MANIFEST}: invalid JSON: {err}") from None
    return _parse_manifest(doc)


def _parse_manifest(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupError(f"{MANIFEST}: format is not {FORMAT!r}; not a facepro backup")
    version = doc.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise BackupError(f"{MANIFEST}: format_version {version!r} is not supported (this FacePro reads 1..{FORMAT_VERSION}); upgrade FacePro")
    try:
        created = datetime.fromisoformat(doc["created_at"])
        revision = doc["schema_revision"]
        entries = [_parse_entry(e) for e in doc["files"]]
    except (KeyError, TypeError, ValueError) as err:
        raise BackupError(f"{MANIFEST}: missing or invalid field ({err})") from None
    if created.tzinfo is None or not (revision is None or isinstance(revision, str)):
        raise BackupError(f"{MANIFEST}: created_at must carry a time zone and schema_revision be text or null")
    if [e.role for e in entries].count("database") != 1 or not any(e.path == DB_MEMBER for e in entries):
        raise BackupError(f"{MANIFEST}: expected exactly one database file at {DB_MEMBER}")
    if len({e.path for e in entries}) != len(entries):
        raise BackupError(f"{MANIFEST}: a path is listed twice")
    return {"created_at": created, "schema_revision": revision, "files": entries}


def _parse_entry(e: Any) -> _Entry:
    entry = _Entry(path=e["path"], role=e["role"], size=e["size"], sha256=e["sha256"], source=e.get("source"))
    _check_name(entry.path)
    prefix = _ROLE_PREFIX.get(entry.role)
    if prefix is None or not entry.path.startswith(prefix) or entry.path.count("/") != 1:
        raise BackupError(f"{MANIFEST}: file {entry.path!r} with role {entry.role!r}: expected <{'|'.join(_ROLE_PREFIX.values())}><name>")
    if not isinstance(entry.size, int) or entry.size < 0 or not isinstance(entry.sha256, str) or not _SHA256.match(entry.sha256):
        raise BackupError(f"{MANIFEST}: file {entry.path!r}: size must be a non-negative integer and sha256 64 lowercase hex characters")
    if entry.source is not None and not isinstance(entry.source, str):
        raise BackupError(f"{MANIFEST}: file {entry.path!r}: source must be text or null")
    return entry


def _check_database(path: Path, manifest_revision: str | None, url: str) -> str | None:
    """``quick_check`` the extracted database and check its revision against the manifest and this code."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA quick_check").fetchone()
            has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone()
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone() if has else None
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise BackupError(f"backup database: not a readable SQLite file ({err})") from None
    if ok != ("ok",):
        raise BackupError(f"backup database: quick_check failed ({ok[0] if ok else 'no answer'}); the backup is damaged")
    revision = row[0] if row else None
    if revision != manifest_revision:
        raise BackupError(f"backup database: schema revision {revision!r} differs from the manifest's {manifest_revision!r}")
    check_known(url, revision)
    return revision


def _replace_database(new: Path, db: Path, revision: str | None) -> Path | None:
    """Keep a copy of the current database, drop its WAL/SHM, and move ``new`` over it atomically."""
    previous = None
    if db.exists() and db.stat().st_size > 0:
        previous = _keep_previous(db)
    for suffix in ("-wal", "-shm", "-journal"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)  # a stale WAL would be replayed onto the restored file
    with open(new, "rb") as f:
        os.fsync(f.fileno())
    os.replace(new, db)
    _fsync_dir(db.parent)
    return previous


def _keep_previous(db: Path) -> Path:
    """A consistent copy of the current database; a raw file copy when it cannot be read as SQLite."""
    try:
        return backup_sqlite(db, "prerestore")
    except StorageError:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = db.with_name(f"{db.name}.bak-prerestore-raw-{stamp}")
        shutil.copy2(db, target)
        wal = db.with_name(db.name + "-wal")
        if wal.exists():
            shutil.copy2(wal, target.with_name(target.name + "-wal"))
        return target


def _place(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` atomically (temporary file in the target folder, then ``os.replace``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore-tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
