"""Unknown faces: anonymous clusters, the event's cluster, negative examples.

Revision ID: 0008
Revises: 0007

- ``unknown_clusters``: one row per anonymous identity ``unknown-<id>`` (model, the sum of its tracks' unit face
  vectors, track count, first/last seen). ``AUTOINCREMENT`` on SQLite (a PostgreSQL ``SERIAL`` never reuses
  either): an ``unknown-<n>`` number is never given twice.
- ``events.unknown_id``: the event's cluster, NULL for named or unclustered events. Not a foreign key (adding
  one would rebuild ``events`` on SQLite; the code that deletes clusters moves or clears their events first).
  ``ix_events_unknown_id_started_at`` is partial (``WHERE unknown_id IS NOT NULL``).
- ``face_negatives``: face vectors an identity must not match (``facepro events relabel EVENT --not NAME``),
  deleted with their identity.

Downgrade drops them (``events`` is rebuilt on SQLite to drop the column; cluster assignments and negatives are lost).
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: Union[str, Sequence[str], None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_UNKNOWN_INDEX = "ix_events_unknown_id_started_at"
_WITH_UNKNOWN = "unknown_id IS NOT NULL"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _vector_checks(table: str) -> list[sa.CheckConstraint]:
    return [sa.CheckConstraint("dim > 0", name=op.f(f"ck_{table}_dim_positive")),
            sa.CheckConstraint("length(vector) = dim * 4", name=op.f(f"ck_{table}_vector_size"))]


def upgrade() -> None:
    op.create_table(
        "unknown_clusters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("tracks", sa.Integer(), nullable=False),
        sa.Column("first_seen", _utc(), nullable=False),
        sa.Column("last_seen", _utc(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        *_vector_checks("unknown_clusters"),
        sa.CheckConstraint("tracks >= 1", name=op.f("ck_unknown_clusters_tracks_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unknown_clusters")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_unknown_clusters_model_dim_tracks"), "unknown_clusters", ["model", "dim", "tracks"])
    op.create_table(
        "face_negatives",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        *_vector_checks("face_negatives"),
        sa.ForeignKeyConstraint(["identity_id"], ["identities.id"], name=op.f("fk_face_negatives_identity_id_identities"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_face_negatives")),
    )
    op.create_index(op.f("ix_face_negatives_identity_id"), "face_negatives", ["identity_id"])
    op.create_index(op.f("ix_face_negatives_model_identity_id"), "face_negatives", ["model", "identity_id"])
    op.add_column("events", sa.Column("unknown_id", sa.Integer(), nullable=True))
    op.create_index(_UNKNOWN_INDEX, "events", ["unknown_id", "started_at"],
                    sqlite_where=sa.text(_WITH_UNKNOWN), postgresql_where=sa.text(_WITH_UNKNOWN))


def downgrade() -> None:
    op.drop_index(_UNKNOWN_INDEX, table_name="events")
    with op.batch_alter_table("events") as batch:  # SQLite: table rebuild; PostgreSQL: ALTER
        batch.drop_column("unknown_id")
    op.drop_index(op.f("ix_face_negatives_model_identity_id"), table_name="face_negatives")
    op.drop_index(op.f("ix_face_negatives_identity_id"), table_name="face_negatives")
    op.drop_table("face_negatives")
    op.drop_index(op.f("ix_unknown_clusters_model_dim_tracks"), table_name="unknown_clusters")
    op.drop_table("unknown_clusters")
