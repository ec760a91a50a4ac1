"""Jobs of the HTTP API and the job that produced an event.

Revision ID: 0006
Revises: 0005

- ``jobs``: one row per background job (``POST /api/jobs``: analyze a clip, backup, enroll) with its state
  (queued, running, done, failed, cancelled), progress (0..1, frames done of total), parameters and result
  (JSON text), error, the pid of its pipeline while it runs, and its times. The queue is
  ``ix_jobs_state_created_at`` (oldest queued first).
- ``events.job_id``: the analysis job whose pipeline stored the event; NULL for live cameras. Not a
  foreign key (events outlive job rows; the write path pays no lookup). ``ix_events_job_id_started_at``
  serves ``GET /api/events?job=<id>`` and is partial (``WHERE job_id IS NOT NULL``), so live events pay
  no index entry.

Downgrade drops both (the events table is rebuilt on SQLite to drop the column; their job ids are lost).
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_JOB_INDEX = "ix_events_job_id_started_at"
_WITH_JOB = "job_id IS NOT NULL"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("frames_done", sa.BigInteger(), nullable=False),
        sa.Column("frames_total", sa.BigInteger(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("ended_at", _utc(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint("type IN ('analyze', 'backup', 'enroll')", name=op.f("ck_jobs_type")),
        sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed', 'cancelled')", name=op.f("ck_jobs_state")),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_state_created_at"), "jobs", ["state", "created_at"])
    op.add_column("events", sa.Column("job_id", sa.String(length=36), nullable=True))
    op.create_index(_JOB_INDEX, "events", ["job_id", "started_at"],
                    sqlite_where=sa.text(_WITH_JOB), postgresql_where=sa.text(_WITH_JOB))


def downgrade() -> None:
    op.drop_index(_JOB_INDEX, table_name="events")
    with op.batch_alter_table("events") as batch:  # SQLite: table rebuild; PostgreSQL: ALTER
        batch.drop_column("job_id")
    op.drop_index(op.f("ix_jobs_state_created_at"), table_name="jobs")
    op.drop_table("jobs")
