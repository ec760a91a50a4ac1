"""Events of a fleet hub: the box that reported an event and the message that set its row.

Revision ID: 0007
Revises: 0006

- ``events.box_id``: the ``box_id`` of the box whose MQTT messages the fleet hub (``facepro hub``) stored this
  event from; NULL for a box's own events (written by its storage process).
- ``events.box_seq``: the ``seq`` of that box's message the row holds (the hub applies a message only when its
  ``seq`` is larger, so repeats and late messages change nothing); NULL for a box's own events.
- ``ix_events_box_id_started_at`` serves ``GET /api/events?box=<id>`` / ``facepro events --box`` newest first;
  partial (``WHERE box_id IS NOT NULL``), so a box's own events pay no index entry.

The event id stays the primary key: the hub keeps one row per event id across every box.

Downgrade drops both columns and the index (the events table is rebuilt on SQLite; the hub's rows stay,
without their box).
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_BOX_INDEX = "ix_events_box_id_started_at"
_WITH_BOX = "box_id IS NOT NULL"


def upgrade() -> None:
    op.add_column("events", sa.Column("box_id", sa.String(length=64), nullable=True))
    op.add_column("events", sa.Column("box_seq", sa.Integer(), nullable=True))
    op.create_index(_BOX_INDEX, "events", ["box_id", "started_at"],
                    sqlite_where=sa.text(_WITH_BOX), postgresql_where=sa.text(_WITH_BOX))


def downgrade() -> None:
    op.drop_index(_BOX_INDEX, table_name="events")
    with op.batch_alter_table("events") as batch:  # SQLite: table rebuild; PostgreSQL: ALTER
        batch.drop_column("box_seq")
        batch.drop_column("box_id")
