"""Fewer index updates per stored event: drop redundant indexes, make the identity index partial.

Revision ID: 0004
Revises: 0003

Every stored event costs one insert in each of its table's indexes, so the
write path only keeps indexes a real query or foreign key needs:

- ``ix_<table>_event_id`` on the three event-vector tables is dropped: the
  unique ``(event_id, model, frame_index)`` constraint of 0003 starts with
  ``event_id`` and serves the same lookups ("vectors of an event") and the
  ``ON DELETE CASCADE`` from ``events``;
- ``ix_events_identity_id_started_at`` becomes partial (``WHERE identity_id
  IS NOT NULL``): it serves "events of identity X" (``identity_id = ?``,
  which implies NOT NULL) and the ``ON DELETE SET NULL`` from ``identities``,
  while most events (nobody recognised) no longer pay an index entry.

Measured with ``scripts/bench_storage.py`` (see the README). Downgrade
restores both as they were.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_VECTOR_TABLES = ("track_embeddings", "reid_embeddings", "gait_embeddings")
_IDENTITY_INDEX = "ix_events_identity_id_started_at"
_NAMED = "identity_id IS NOT NULL"


def upgrade() -> None:
    for table in _VECTOR_TABLES:
        op.drop_index(f"ix_{table}_event_id", table_name=table)
    op.drop_index(_IDENTITY_INDEX, table_name="events")
    op.create_index(_IDENTITY_INDEX, "events", ["identity_id", "started_at"],
                    sqlite_where=sa.text(_NAMED), postgresql_where=sa.text(_NAMED))


def downgrade() -> None:
    op.drop_index(_IDENTITY_INDEX, table_name="events")
    op.create_index(_IDENTITY_INDEX, "events", ["identity_id", "started_at"])
    for table in _VECTOR_TABLES:
        op.create_index(f"ix_{table}_event_id", table, ["event_id"])
