"""Jobs: extra inputs of a pipeline by name (``{input name: series id}``), e.g. a reference CT.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("inputs", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    """Revert this migration."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("inputs")
