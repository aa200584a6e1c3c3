"""Lease mode for token buckets (the key's global bucket) and pruning of ended rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("lease_keys") as batch:
        batch.add_column(sa.Column("tokens", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("tokens_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("unit", sa.BigInteger(), nullable=True))
    op.create_index(op.f("ix_lease_keys_window_end"), "lease_keys", ["window_end"])


def downgrade() -> None:
    op.drop_index(op.f("ix_lease_keys_window_end"), table_name="lease_keys")
    with op.batch_alter_table("lease_keys") as batch:
        batch.drop_column("unit")
        batch.drop_column("tokens_at")
        batch.drop_column("tokens")
