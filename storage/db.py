"""Engines, schema migrations (Alembic) and storage errors.

The Alembic scripts live in the repository's top-level ``alembic/`` folder
(``alembic.ini`` next to it serves the ``alembic`` command line). FacePro
builds its :class:`alembic.config.Config` in code (:func:`alembic_config`),
with ``script_location`` found by :func:`script_location`: first
``storage/alembic`` (where the wheel ships them: setup.cfg's ``package_dir``
maps the top-level ``alembic/`` folder to the ``storage.alembic`` package),
then ``<repo>/alembic`` next to the ``storage`` package (a source checkout or
an editable install). When neither exists, :func:`upgrade` raises
:class:`StorageError` naming both places it looked.

SQLite engines set, on every connection, only connection state that needs no
lock: ``synchronous=NORMAL``, ``busy_timeout`` and ``foreign_keys=ON`` (and
``cache_size``). A database not yet in WAL mode (a new file) also gets
``page_size`` = :data:`PAGE_SIZE`, ``auto_vacuum=INCREMENTAL`` (both only
take effect on a database without tables; older files keep their page size
and are converted to incremental vacuum by :func:`upgrade` /
:func:`enable_incremental_vacuum`) and ``journal_mode=WAL``; a database
already in WAL mode is left as it is, so readers (``facepro events``, the
gallery load) work while another process holds the write lock, and readers
never block the writer. Transactions are begun explicitly (``BEGIN``, or
``BEGIN IMMEDIATE`` with the ``sqlite_begin="IMMEDIATE"`` execution option)
instead of by the driver, so DDL and savepoints are transactional.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

#: Default SQLite busy timeout: how long a connection waits for another's write lock, ms.
BUSY_TIMEOUT_MS = 5000
#: Page size of new SQLite files, bytes. A 512-float vector row (~2.1 KiB) fills half
#: of a 4 KiB page (one row per page); 16 KiB pages hold 7, so files are ~40 % smaller
#: and batched writes ~1.5x faster (scripts/bench_storage.py).
PAGE_SIZE = 16384

# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock, lock not available.
_PG_TRANSIENT = frozenset({"40001", "40P01", "55P03"})


class StorageError(RuntimeError):
    """A database problem the caller cannot fix by changing its input (locked, unreachable, failed write)."""


class SchemaError(StorageError):
    """The database schema does not match this FacePro (unknown/newer revision, unmanaged tables, broken keys)."""


def describe(url: str | URL) -> str:
    """``url`` as text with any password hidden, for error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def _parse_url(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError as err:
        raise StorageError(
            f"invalid database URL {url!r}: {err}; expected e.g. sqlite:////path/facepro.db "
            "or postgresql+psycopg2://user@host/db"
        ) from None


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory and non-SQLite URLs."""
    u = _parse_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    if u.database.startswith("file:"):
        return None
    return Path(u.database).expanduser()


def open_engine(url: str | URL, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS, foreign_keys: bool = True,
                cache_mb: int | None = None) -> Engine:
    """Create an engine for ``url`` with FacePro's connection settings.

    Args:
        url: SQLAlchemy URL (``sqlite:///...`` or ``postgresql+psycopg2://...``).
        busy_timeout_ms: SQLite only: how long to wait for another process's
            write lock before failing with "database is locked", milliseconds.
        foreign_keys: SQLite only: enforce foreign keys. False only for
            schema migrations (table rebuilds must not cascade deletes).
        cache_mb: SQLite only: page cache per connection, MiB (``PRAGMA
            cache_size``); None keeps SQLite's default of 2 MiB. The storage
            process sets ``storage.cache_mb`` (32): a cache that holds the hot
            table and index pages made batched writes 8-20 % faster in
            alternating runs of plain sqlite3 inserts on this project's schema.

    Returns:
        A new :class:`~sqlalchemy.Engine`; call ``dispose()`` when done.

    Raises:
        StorageError: invalid URL, missing driver, or the SQLite folder cannot be created.
        ValueError: ``busy_timeout_ms < 0`` or ``cache_mb < 1``.
    """
    u = _with_installed_driver(_parse_url(url))
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u, busy_timeout_ms, foreign_keys, cache_mb)
    try:
        return create_engine(u, pool_pre_ping=True)
    except (ImportError, ArgumentError) as err:
        raise StorageError(f"cannot open {describe(u)}: {err}; install the driver (pip install -e .[postgres])") from None


def _with_installed_driver(u: URL) -> URL:
    """A ``postgresql://`` URL without a driver names psycopg2 when psycopg (SQLAlchemy 2.1's default for
    it) is not installed but psycopg2 (FacePro's ``postgres`` extra) is; any other URL is returned as is."""
    if u.drivername != "postgresql":
        return u
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return u.set(drivername="postgresql+psycopg2")
    return u


def _sqlite_engine(u: URL, busy_timeout_ms: int, foreign_keys: bool, cache_mb: int | None) -> Engine:
    if busy_timeout_ms < 0:
        raise ValueError(f"busy_timeout_ms: expected >= 0, got {busy_timeout_ms}")
    if cache_mb is not None and cache_mb < 1:
        raise ValueError(f"cache_mb: expected >= 1, got {cache_mb}")
    path = sqlite_path(u)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the database folder {path.parent}: {err.strerror}; check FACEPRO_DATA_DIR / storage.url") from None
    engine = create_engine(u)
    per_connection = (  # connection state only: never needs a lock
        f"PRAGMA busy_timeout={int(busy_timeout_ms)}",  # first: switching to WAL may wait for a lock
        "PRAGMA synchronous=NORMAL",
        f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}",
        *((f"PRAGMA cache_size={-1024 * int(cache_mb)}",) if cache_mb is not None else ()),  # negative: KiB
    )
    new_file = (  # stored in the file: set once, by the first connection to a new (or non-WAL) database
        f"PRAGMA page_size={PAGE_SIZE}",  # before WAL, like auto_vacuum: only a new file takes it
        "PRAGMA auto_vacuum=INCREMENTAL",  # before WAL: a new file records it when its first table is created
        "PRAGMA journal_mode=WAL",
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        for pragma in per_connection:
            cur.execute(pragma)
        # Reading the journal mode needs no write lock; a database already in WAL mode is configured, so a
        # reader never asks for the lock another process may hold for a long write (issue: readers failing
        # with "database is locked" while a backup tool or a second writer held it).
        if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            for pragma in new_file:
                cur.execute(pragma)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine


def is_transient(err: BaseException) -> bool:
    """True for errors a retry may fix: SQLite "database is locked/busy", PostgreSQL deadlock or serialization failure."""
    if not isinstance(err, OperationalError):
        return False
    orig = err.orig
    if getattr(orig, "pgcode", None) in _PG_TRANSIENT:
        return True
    msg = str(orig).lower()
    return "database is locked" in msg or "database table is locked" in msg or "database is busy" in msg


def locked_error(url: str | URL, err: BaseException, what: str) -> StorageError:
    """A :class:`StorageError` for a lock that outlived the busy timeout / retries."""
    return StorageError(
        f"{what}: database {describe(url)} is locked by another process ({err.__class__.__name__}: "
        f"{getattr(err, 'orig', err)}); stop the other FacePro process or writer, or retry later"
    )


@contextlib.contextmanager
def storage_errors(url: str | URL, what: str) -> Iterator[None]:
    """Re-raise database errors inside the block as :class:`StorageError` naming ``what`` and the database."""
    try:
        yield
    except StorageError:
        raise
    except SQLAlchemyError as err:
        if is_transient(err):
            raise locked_error(url, err, what) from err
        detail = getattr(err, "orig", None) or err
        path = sqlite_path(_parse_url(url)) if "unable to open" in str(detail) else None
        hint = f"; {_unreadable_hint(path, detail)}" if path is not None else ""
        detail = " ".join(str(detail).split())  # one line (the server's message may span several)
        raise StorageError(f"{what}: database {describe(url)}: {detail}{hint}") from err


def _unreadable_hint(path: Path, err: object) -> str:
    """What to check when SQLite cannot open or read ``path``: a WAL database needs a writable folder
    (its ``-wal`` and ``-shm`` files are created next to it, also by readers)."""
    folder = path.parent
    if "unable to open" in str(err) and folder.is_dir() and not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable (SQLite needs to create {path.name}-wal/-shm there); fix its permissions or set FACEPRO_DATA_DIR"
    if "unable to open" in str(err):
        return f"check that {folder} exists and is writable (FACEPRO_DATA_DIR / storage.url)"
    return "is it a SQLite database?"


# --------------------------------------------------------------------- migrations


def script_location() -> Path:
    """The folder holding Alembic's ``env.py`` and ``versions/``.

    Raises:
        StorageError: neither ``storage/alembic`` nor ``<repo>/alembic`` exists.
    """
    here = Path(__file__).resolve().parent
    candidates = (here / "alembic", here.parent / "alembic")
    for folder in candidates:
        if (folder / "env.py").is_file() and (folder / "versions").is_dir():
            return folder
    raise StorageError(
        "Alembic migration scripts not found (looked in "
        + " and ".join(str(c) for c in candidates)
        + "); the installed package is incomplete: reinstall FacePro from its wheel or sdist, or run from a source checkout"
    )


def alembic_config(connection: Connection | None = None) -> Config:
    """A programmatic Alembic config for FacePro's migrations.

    Args:
        connection: when given, ``env.py`` migrates over this connection
            (the caller owns its transaction and commits it).

    Raises:
        StorageError: the migration scripts cannot be found.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest schema revision this code knows (e.g. ``"0001"``).

    Raises:
        StorageError: the migration scripts cannot be found or have several heads.
    """
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise StorageError(f"migration scripts in {script_location()} have {len(heads)} heads {heads}; expected one")
    return heads[0]


def current_revision(url: str | URL) -> str | None:
    """The database's schema revision, or None when it has none (new or empty database).

    Reads without modifying anything: a SQLite file is opened read-only and
    a missing file is not created.

    Raises:
        StorageError: the database cannot be read (locked, unreachable, bad URL).
    """
    revs = _revisions(url)
    if len(revs) > 1:
        raise SchemaError(f"database {describe(url)} has several schema revisions {revs}; restore a backup")
    return revs[0] if revs else None


def _revisions(url: str | URL) -> list[str]:
    u = _parse_url(url)
    path = sqlite_path(u)
    if path is not None:
        return _sqlite_revisions(u, path)
    engine = open_engine(u)
    try:
        with storage_errors(u, "reading the schema revision"), engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return []
            return [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")]
    finally:
        engine.dispose()


def _sqlite_revisions(u: URL, path: Path) -> list[str]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as err:
        raise StorageError(f"cannot open {path} read-only: {err}") from None
    try:
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'").fetchone()
        if not has:
            return []
        return [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise locked_error(u, err, "reading the schema revision") from None
        raise StorageError(f"cannot read {path}: {err}; {_unreadable_hint(path, err)}") from None
    except sqlite3.DatabaseError as err:
        raise StorageError(f"cannot read {path}: {err}; is it a SQLite database?") from None
    finally:
        conn.close()


def check_known(url: str | URL, revision: str | None) -> None:
    """Raise :class:`SchemaError` when ``revision`` is not one of this code's migrations.

    Raises:
        SchemaError: the database was written by a newer FacePro (or another app).
    """
    if revision is None:
        return
    script = ScriptDirectory.from_config(alembic_config())
    try:
        known = script.get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise SchemaError(
            f"database {describe(url)} has schema revision {revision!r}, unknown to this FacePro "
            f"(its newest revision is {head_revision()!r}): it was created by a newer FacePro. "
            "Upgrade FacePro, or restore a backup (<database>.bak-*) made before the upgrade; "
            "the database was not modified"
        )


def backup_sqlite(path: Path, revision: str | None) -> Path:
    """Copy a SQLite database to ``<path>.bak-<revision>-<UTC timestamp>`` with the online backup API.

    The copy is consistent even while other connections use the database.

    Returns:
        The backup file's path.

    Raises:
        StorageError: the copy failed (disk full, locked beyond the busy timeout...).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.bak-{revision or 'base'}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.bak-{revision or 'base'}-{stamp}-{n}")
        n += 1
    copy_sqlite(path, target)
    return target


def copy_sqlite(source: Path, target: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    """Copy a SQLite database to a new standalone file with the online backup API.

    The copy is one consistent snapshot (committed transactions only, WAL
    content included) even while another process writes; the writer is not
    blocked. ``target`` is written in rollback-journal mode, so it is a single
    self-contained file.

    Raises:
        StorageError: ``source`` cannot be read, the copy failed (disk full,
            locked beyond the busy timeout...); ``target`` is removed.
    """
    try:
        if not source.is_file():
            raise sqlite3.OperationalError("no such file")
        src = sqlite3.connect(str(source), timeout=busy_timeout_ms / 1000)
        try:
            dst = sqlite3.connect(str(target))
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as err:
        target.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm", "-journal"):
            target.with_name(target.name + suffix).unlink(missing_ok=True)
        raise StorageError(f"copying {source} to {target} failed: {err}; free disk space or stop other writers") from None


def upgrade(url: str | URL, backup: bool = True, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> str:
    """Migrate the database at ``url`` to this code's newest schema revision.

    A SQLite file that exists and is behind head is first copied to
    ``<db>.bak-<rev>-<timestamp>`` (``rev`` is ``base`` for a database
    without revision) when ``backup`` is true. The migration runs in one
    transaction, with SQLite foreign keys off during table rebuilds and
    checked before commit. A SQLite file created without
    ``auto_vacuum=INCREMENTAL`` is then converted (one ``VACUUM``, see
    :func:`enable_incremental_vacuum`), so retention can shrink it.

    Args:
        url: SQLAlchemy URL of the database (a missing SQLite file is created).
        backup: copy an existing SQLite file before migrating it.
        busy_timeout_ms: SQLite: wait this long for another writer's lock, ms.

    Returns:
        The new revision (:func:`head_revision`).

    Raises:
        SchemaError: the database's revision is unknown (newer FacePro) or it
            has FacePro tables but no revision (both raised before anything is
            written), or the migration left broken foreign keys (rolled back).
        StorageError: locked database, unreachable server, failed backup.
    """
    rev = current_revision(url)
    check_known(url, rev)
    head = head_revision()
    if rev == head:
        return head
    path = sqlite_path(url)
    if backup and path is not None and path.exists() and path.stat().st_size > 0:
        backup_sqlite(path, rev)
    engine = open_engine(url, busy_timeout_ms=busy_timeout_ms, foreign_keys=False)
    try:
        with storage_errors(url, "upgrading the schema"), engine.begin() as conn:
            _refuse_unmanaged(url, conn, rev)
            command.upgrade(alembic_config(conn), "head")
            check_foreign_keys(url, conn)
        _enable_incremental_vacuum(url, engine)
    finally:
        engine.dispose()
    return head


@dataclass(frozen=True)
class RevisionInfo:
    """One migration script (see :func:`history`).

    Attributes:
        revision: its id (``"0001"``...).
        down_revision: the revision it migrates from, None for the first one.
        message: the first line of its docstring.
        is_head: True for the newest revision.
    """

    revision: str
    down_revision: str | None
    message: str
    is_head: bool


def history() -> list[RevisionInfo]:
    """Every migration of this FacePro, oldest first (for ``facepro db history``).

    Raises:
        StorageError: the migration scripts cannot be found.
    """
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    revs = list(script.walk_revisions())[::-1]
    return [
        RevisionInfo(
            revision=r.revision,
            down_revision=r.down_revision if isinstance(r.down_revision, str) or r.down_revision is None else ",".join(r.down_revision),
            message=(r.doc or "").strip().splitlines()[0] if r.doc else "",
            is_head=r.revision in heads,
        )
        for r in revs
    ]


def downgrade(url: str | URL, revision: str, backup: bool = True, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> str | None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop every FacePro table).

    Like :func:`upgrade`: an existing SQLite file is first copied to
    ``<db>.bak-<current rev>-<timestamp>`` when ``backup`` is true, the
    migration runs in one transaction with SQLite foreign keys off and
    checked before commit. Data only the newer schema can hold is lost (each
    migration's docstring says what); stop the pipeline first.

    Args:
        url: SQLAlchemy URL of the database.
        revision: a revision id older than or equal to the current one, or ``"base"``.
        backup: copy an existing SQLite file before migrating it.
        busy_timeout_ms: SQLite: wait this long for another writer's lock, ms.

    Returns:
        The new revision, None after ``"base"``.

    Raises:
        ValueError: ``revision`` is not a known revision, or is newer than the
            database's (use :func:`upgrade`); nothing was modified.
        SchemaError: the database's revision is unknown (newer FacePro), or the
            migration left broken foreign keys (rolled back).
        StorageError: locked database, unreachable server, failed backup.
    """
    rev = current_revision(url)
    check_known(url, rev)
    target = None if revision == "base" else revision
    _check_downgrade_target(url, rev, target, revision)
    if target == rev:
        return rev
    path = sqlite_path(url)
    if backup and path is not None and path.exists():
        backup_sqlite(path, rev)
    engine = open_engine(url, busy_timeout_ms=busy_timeout_ms, foreign_keys=False)
    try:
        with storage_errors(url, f"downgrading the schema to {revision}"), engine.begin() as conn:
            command.downgrade(alembic_config(conn), revision)
            check_foreign_keys(url, conn)
    finally:
        engine.dispose()
    return target


def _check_downgrade_target(url: str | URL, rev: str | None, target: str | None, given: str) -> None:
    known = [r.revision for r in history()]
    if target is not None and target not in known:
        raise ValueError(f"revision {given!r}: unknown; expected 'base' or one of {known} (see 'facepro db history')")
    if target is None or rev is None:
        if target is not None:
            raise ValueError(f"database {describe(url)} has no schema revision: nothing to downgrade to {given!r}")
        return
    if known.index(target) > known.index(rev):
        raise ValueError(
            f"revision {given!r} is newer than the database's {rev!r}: downgrade only goes back; "
            "use 'facepro db upgrade' to go forward"
        )


def enable_incremental_vacuum(url: str | URL) -> bool:
    """Make a SQLite file use ``auto_vacuum=INCREMENTAL`` (so deleted rows can give space back to the disk).

    A file created by :func:`open_engine` already has it; an older file is
    converted with one ``VACUUM`` (rewrites the whole file: needs free disk
    space about its size and blocks writers meanwhile, so run it when the
    pipeline is stopped, as :func:`upgrade` does).

    Returns:
        True if the file was converted, False if it already had it or ``url``
        is not a SQLite file.

    Raises:
        StorageError: locked database, disk full.
    """
    if sqlite_path(url) is None:
        return False
    engine = open_engine(url)
    try:
        return _enable_incremental_vacuum(url, engine)
    finally:
        engine.dispose()


def _enable_incremental_vacuum(url: str | URL, engine: Engine) -> bool:
    if engine.dialect.name != "sqlite" or sqlite_path(url) is None:
        return False
    raw = engine.raw_connection()  # VACUUM cannot run inside the transaction SQLAlchemy would begin
    try:
        cur = raw.cursor()
        if cur.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return False
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
        cur.execute("VACUUM")
        return True
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise locked_error(url, err, "converting to auto_vacuum=INCREMENTAL") from None
        raise StorageError(f"converting {describe(url)} to auto_vacuum=INCREMENTAL failed: {err}; free disk space and retry") from None
    finally:
        raw.close()


def _refuse_unmanaged(url: str | URL, conn: Connection, rev: str | None) -> None:
    if rev is None and inspect(conn).has_table("events"):
        raise SchemaError(
            f"database {describe(url)} has FacePro tables but no schema revision (alembic_version); "
            "it was not created by 'facepro' migrations: move it away or restore a backup"
        )


def check_foreign_keys(url: str | URL, conn: Connection) -> None:
    """SQLite: raise :class:`SchemaError` if any row violates a foreign key (run before committing a migration)."""
    if conn.dialect.name != "sqlite":
        return
    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if bad:
        tables = sorted({r[0] for r in bad})
        raise SchemaError(f"upgrading {describe(url)} left {len(bad)} rows with broken foreign keys in {tables}; rolled back")


def dialect_insert(conn: Connection) -> Any:
    """The dialect's ``insert`` construct supporting ``on_conflict_do_*`` (SQLite or PostgreSQL).

    Raises:
        StorageError: any other backend.
    """
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert
    if name == "postgresql":
        return postgresql.insert
    raise StorageError(f"unsupported database backend {name!r}: FacePro supports sqlite and postgresql")

