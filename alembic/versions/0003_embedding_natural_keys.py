"""Unique (event_id, model, frame_index) on every event-vector table, so re-sent embeddings are ignored.

Revision ID: 0003
Revises: 0002

Delivery from the recognition processes to storage is at-least-once (a
producer re-sends what storage has not acknowledged, e.g. after a storage
restart), so every write must be idempotent: events are upserted by UUID and
embeddings now have a natural key. Upgrade first deletes duplicate rows
(keeping the lowest id) so the constraint can be created on existing data;
downgrade drops the constraints.
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TABLES = ("track_embeddings", "reid_embeddings", "gait_embeddings")
_COLUMNS = ["event_id", "model", "frame_index"]


def _name(table: str) -> str:
    return f"uq_{table}_event_id_model_frame_index"


def upgrade() -> None:
    for table in _TABLES:
        op.execute(
            f"DELETE FROM {table} WHERE id NOT IN "
            f"(SELECT min_id FROM (SELECT MIN(id) AS min_id FROM {table} GROUP BY event_id, model, frame_index) AS keep)"
        )
        with op.batch_alter_table(table) as batch:
            batch.create_unique_constraint(_name(table), _COLUMNS)


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(_name(table), type_="unique")
