"""Initial schema: cameras, identities, face_embeddings, events, track_embeddings.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Constraint and index names follow storage.models.NAMING_CONVENTION. Types
are plain SQLAlchemy types (DateTime(timezone=True) is what
storage.models.UTCDateTime stores), so this script never imports app code.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_METHODS = "'face', 'reid', 'gait'"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cameras",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cameras")),
        sa.UniqueConstraint("name", name=op.f("uq_cameras_name")),
    )
    op.create_table(
        "identities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identities")),
        sa.UniqueConstraint("name", name=op.f("uq_identities_name")),
    )
    op.create_table(
        "face_embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("image_path", sa.String(length=1024), nullable=True),
        sa.Column("image_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.CheckConstraint("dim > 0", name=op.f("ck_face_embeddings_dim_positive")),
        sa.CheckConstraint("length(vector) = dim * 4", name=op.f("ck_face_embeddings_vector_size")),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["identities.id"],
            name=op.f("fk_face_embeddings_identity_id_identities"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_face_embeddings")),
    )
    op.create_index(op.f("ix_face_embeddings_identity_id"), "face_embeddings", ["identity_id"])
    op.create_index(op.f("ix_face_embeddings_model_identity_id"), "face_embeddings", ["model", "identity_id"])

    op.create_table(
        "events",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("camera_id", sa.Integer(), nullable=False),
        sa.Column("track_id", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("ended_at", _utc(), nullable=False),
        sa.Column("first_frame", sa.BigInteger(), nullable=False),
        sa.Column("last_frame", sa.BigInteger(), nullable=False),
        sa.Column("best_score", sa.Float(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=True),
        sa.Column("identity_score", sa.Float(), nullable=False),
        sa.Column("snapshot_path", sa.String(length=1024), nullable=True),
        sa.Column("ended", sa.Boolean(), nullable=False),
        sa.CheckConstraint(f"method IN ({_METHODS})", name=op.f("ck_events_method")),
        sa.CheckConstraint("last_frame >= first_frame", name=op.f("ck_events_frame_order")),
        sa.ForeignKeyConstraint(["camera_id"], ["cameras.id"], name=op.f("fk_events_camera_id_cameras")),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["identities.id"],
            name=op.f("fk_events_identity_id_identities"), ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_camera_id_started_at"), "events", ["camera_id", "started_at"])
    op.create_index(op.f("ix_events_identity_id_started_at"), "events", ["identity_id", "started_at"])
    op.create_index(op.f("ix_events_started_at"), "events", ["started_at"])

    op.create_table(
        "track_embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("frame_index", sa.BigInteger(), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.CheckConstraint(f"kind IN ({_METHODS})", name=op.f("ck_track_embeddings_kind")),
        sa.CheckConstraint("dim > 0", name=op.f("ck_track_embeddings_dim_positive")),
        sa.CheckConstraint("length(vector) = dim * 4", name=op.f("ck_track_embeddings_vector_size")),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"],
            name=op.f("fk_track_embeddings_event_id_events"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_track_embeddings")),
    )
    op.create_index(op.f("ix_track_embeddings_event_id"), "track_embeddings", ["event_id"])


def downgrade() -> None:
    op.drop_table("track_embeddings")
    op.drop_table("events")
    op.drop_table("face_embeddings")
    op.drop_table("identities")
    op.drop_table("cameras")
