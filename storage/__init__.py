"""FacePro storage: schema, migrations, batched event writer and queries.

Modules:
    :mod:`storage.models`: SQLAlchemy models and float32 vector helpers.
    :mod:`storage.db`: engines (SQLite WAL / PostgreSQL), Alembic migrations,
        :class:`~storage.db.StorageError` and :class:`~storage.db.SchemaError`.
    :mod:`storage.writer`: :class:`~storage.writer.EventWriter`.
    :mod:`storage.queries`: event listing, enrollment, gallery loading.

Typical use::

    from storage import open_engine, upgrade, EventWriter
    upgrade(url)                      # before the first write
    engine = open_engine(url)
    writer = EventWriter(engine, batch_rows=500, batch_ms=200)

This package never imports :mod:`stages`; it depends only on
:mod:`pipeline.messages` for the message types it stores.
"""

from storage.db import SchemaError, StorageError, current_revision, head_revision, open_engine, upgrade
from storage.queries import EventRow, Gallery, count_rows, delete_identity, enroll, list_events, list_identities, load_gallery
from storage.writer import EventWriter

__all__ = [
    "EventRow",
    "EventWriter",
    "Gallery",
    "SchemaError",
    "StorageError",
    "count_rows",
    "current_revision",
    "delete_identity",
    "enroll",
    "head_revision",
    "list_events",
    "list_identities",
    "load_gallery",
    "open_engine",
    "upgrade",
]
