"""When retention purged a study's received instances and its results (`state.retention`).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch_op:
        batch_op.add_column(sa.Column("instances_purged_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("results_purged_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch_op:
        batch_op.drop_column("results_purged_at")
        batch_op.drop_column("instances_purged_at")
