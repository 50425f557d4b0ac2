"""Ingest: uid_derived flags on studies and series.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    for table in ("studies", "series"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("uid_derived", sa.Boolean(), nullable=False, server_default=sa.false())
            )


def downgrade() -> None:
    """Revert this migration."""
    for table in ("series", "studies"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("uid_derived")
