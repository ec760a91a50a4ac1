"""Re-ID and gait vectors in their own tables; snapshot files in ``snapshots``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Upgrade:
  - creates ``reid_embeddings``, ``gait_embeddings`` (event vectors, same
    columns as ``track_embeddings`` without ``kind``) and ``snapshots``
    (``event_id``, ``path``, ``created_at``, ``bytes``);
  - moves the ``kind`` 'reid' / 'gait' rows of ``track_embeddings`` into the
    new tables (ids are renumbered) and narrows ``ck_track_embeddings_kind``
    to ``kind = 'face'``;
  - adds one ``snapshots`` row per event with a ``snapshot_path``
    (``created_at`` = the event's ``started_at``, ``bytes`` unknown: NULL).

Downgrade moves the Re-ID and gait rows back into ``track_embeddings`` (kinds
'reid' / 'gait', new ids), widens the check again and drops the three tables;
``events.snapshot_path`` still names each event's latest snapshot, but
further snapshot rows and their sizes are lost.

Constraint and index names follow storage.models.NAMING_CONVENTION; this
script never imports app code.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_VECTOR_TABLES = {"reid": "reid_embeddings", "gait": "gait_embeddings"}
_COLUMNS = "event_id, model, dim, vector, frame_index, quality, created_at"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _create_vector_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("frame_index", sa.BigInteger(), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.CheckConstraint("dim > 0", name=op.f(f"ck_{name}_dim_positive")),
        sa.CheckConstraint("length(vector) = dim * 4", name=op.f(f"ck_{name}_vector_size")),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], name=op.f(f"fk_{name}_event_id_events"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
    )
    op.create_index(op.f(f"ix_{name}_event_id"), name, ["event_id"])


def _create_snapshots() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("bytes >= 0", name=op.f("ck_snapshots_bytes_non_negative")),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], name=op.f("fk_snapshots_event_id_events"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
        sa.UniqueConstraint("event_id", "path", name=op.f("uq_snapshots_event_id_path")),
    )


def _set_kind_check(condition: str) -> None:
    with op.batch_alter_table("track_embeddings") as batch:  # SQLite: table rebuild; PostgreSQL: ALTER
        batch.drop_constraint(op.f("ck_track_embeddings_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_track_embeddings_kind"), condition)


def upgrade() -> None:
    for name in _VECTOR_TABLES.values():
        _create_vector_table(name)
    _create_snapshots()
    for kind, name in _VECTOR_TABLES.items():
        op.execute(
            f"INSERT INTO {name} ({_COLUMNS}) SELECT {_COLUMNS} FROM track_embeddings "
            f"WHERE kind = '{kind}' ORDER BY id"
        )
    op.execute("DELETE FROM track_embeddings WHERE kind <> 'face'")
    _set_kind_check("kind = 'face'")
    op.execute(
        "INSERT INTO snapshots (event_id, path, created_at, bytes) "
        "SELECT id, snapshot_path, started_at, NULL FROM events WHERE snapshot_path IS NOT NULL ORDER BY started_at, id"
    )


def downgrade() -> None:
    _set_kind_check("kind IN ('face', 'reid', 'gait')")
    for kind, name in _VECTOR_TABLES.items():
        op.execute(
            f"INSERT INTO track_embeddings (kind, {_COLUMNS}) SELECT '{kind}', {_COLUMNS} FROM {name} ORDER BY id"
        )
    op.drop_table("snapshots")
    for name in reversed(_VECTOR_TABLES.values()):
        op.drop_index(op.f(f"ix_{name}_event_id"), table_name=name)
        op.drop_table(name)
