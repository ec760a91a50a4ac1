"""MQTT outbox: event changes to publish, written in the transaction that commits them.

Revision ID: 0005
Revises: 0004

Adds ``mqtt_outbox`` (see :class:`storage.models.MqttOutbox`): one row per
event change (``new`` / ``update`` / ``end``) with its per-event sequence
number and the JSON payload, ``sent_at`` NULL until the broker acknowledged
it. A partial index on ``id`` covers the unsent rows. Downgrade drops the
table: rows not yet published are lost (stop the pipeline first, or let it
publish them).
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_UNSENT = "sent_at IS NULL"


def upgrade() -> None:
    op.create_table(
        "mqtt_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=8), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("type IN ('new', 'update', 'end')", name=op.f("ck_mqtt_outbox_type")),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_mqtt_outbox_seq_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mqtt_outbox")),
        sa.UniqueConstraint("event_id", "seq", name=op.f("uq_mqtt_outbox_event_id_seq")),
    )
    op.create_index("ix_mqtt_outbox_unsent", "mqtt_outbox", ["id"],
                    sqlite_where=sa.text(_UNSENT), postgresql_where=sa.text(_UNSENT))


def downgrade() -> None:
    op.drop_index("ix_mqtt_outbox_unsent", table_name="mqtt_outbox")
    op.drop_table("mqtt_outbox")
