"""An identity's sample face.

Revision ID: 0009
Revises: 0008

- ``identities.sample``: a small JPEG of the identity's face (:mod:`stages.sample`: 112x112, a few KiB), cut
  from an enrollment photo when the identity got its first embeddings with a photo; NULL for identities
  enrolled before this revision (or without a photo). It lives in the row, so deleting or merging an identity
  and backups (the database file) take it along.

Downgrade drops the column (SQLite: the table is rebuilt); the samples are lost.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: Union[str, Sequence[str], None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("identities", sa.Column("sample", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("identities") as batch:  # SQLite: table rebuild; PostgreSQL: ALTER
        batch.drop_column("sample")
