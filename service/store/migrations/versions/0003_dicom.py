"""DICOM networking: series body part, job destinations, deliveries, PACS-query cohorts.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COHORT_COLUMNS = ("source_node", "source_query", "fetch_state", "fetch_error", "fetch_detail")


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("body_part", sa.String(64), nullable=False, server_default="")
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("deliver_to", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
    with op.batch_alter_table("cohorts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source_node", sa.String(64), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("source_query", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
        batch_op.add_column(
            sa.Column("fetch_state", sa.String(16), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("fetch_error", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("fetch_detail", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=True),
        sa.Column("run_token", sa.String(32), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=True),
        sa.Column("instances_sent", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.UniqueConstraint("job_id", "node"),
    )
    op.create_index("ix_deliveries_tenant_id", "deliveries", ["tenant_id"])
    op.create_index("ix_deliveries_job_id", "deliveries", ["job_id"])
    op.create_index("ix_deliveries_state", "deliveries", ["state"])


def downgrade() -> None:
    """Revert this migration."""
    op.drop_table("deliveries")
    op.drop_index("ix_instances_sop_instance_uid", table_name="instances")
    with op.batch_alter_table("cohorts", schema=None) as batch_op:
        for column in _COHORT_COLUMNS:
            batch_op.drop_column(column)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("deliver_to")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("body_part")
