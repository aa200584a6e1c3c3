"""shadow_mode on namespaces and overrides.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Existing namespaces keep enforcing: false for every row already there.
    op.add_column("namespaces", sa.Column("shadow_mode", sa.Boolean(), nullable=False,
                                          server_default=sa.false()))
    # NULL on an override means "the namespace's", like its other fields.
    op.add_column("overrides", sa.Column("shadow_mode", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("overrides") as batch:
        batch.drop_column("shadow_mode")
    with op.batch_alter_table("namespaces") as batch:
        batch.drop_column("shadow_mode")
