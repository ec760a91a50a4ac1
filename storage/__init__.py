"""FacePro storage: schema, migrations, batched event writer and queries.

Modules:
    :mod:`storage.models`: SQLAlchemy models and float32 vector helpers.
    :mod:`storage.db`: engines (SQLite WAL / PostgreSQL), Alembic migrations,
        :class:`~storage.db.StorageError` and :class:`~storage.db.SchemaError`.
    :mod:`storage.writer`: :class:`~storage.writer.EventWriter`.
    :mod:`storage.queries`: event listing, enrollment, gallery loading.
    :mod:`storage.retention`: deleting old events by age / total size, ``db_stats``.
    :mod:`storage.backup`: backup archives (database, face images, config), verified restore.

Typical use::

    from storage import open_engine, upgrade, EventWriter
    upgrade(url)                      # before the first write
    engine = open_engine(url)
    writer = EventWriter(engine, batch_rows=500, batch_ms=200)

This package never imports :mod:`stages`; it depends only on
:mod:`pipeline.messages` for the message types it stores.
"""

from storage.backup import BackupError, BackupInfo, RestoreResult, create_backup, list_backups, prune_backups, restore_backup
from storage.db import (
    RevisionInfo,
    SchemaError,
    StorageError,
    current_revision,
    downgrade,
    head_revision,
    history,
    open_engine,
    upgrade,
)
from storage.queries import (EventRow, Gallery, MergeResult, count_rows, delete_identity, enroll, list_events, list_identities,
                             load_gallery, merge_identities)
from storage.retention import RetentionResult, apply_retention, db_stats
from storage.writer import EventWriter

__all__ = [
    "BackupError",
    "BackupInfo",
    "EventRow",
    "EventWriter",
    "Gallery",
    "MergeResult",
    "RestoreResult",
    "RetentionResult",
    "RevisionInfo",
    "SchemaError",
    "StorageError",
    "apply_retention",
    "count_rows",
    "create_backup",
    "current_revision",
    "db_stats",
    "delete_identity",
    "downgrade",
    "enroll",
    "head_revision",
    "history",
    "list_backups",
    "list_events",
    "list_identities",
    "load_gallery",
    "merge_identities",
    "open_engine",
    "prune_backups",
    "restore_backup",
    "upgrade",
]
