"""Consistent-mode authority state.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "consistent_keys",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("cur_start", sa.BigInteger(), nullable=False),
        sa.Column("cur_end", sa.BigInteger(), nullable=False),
        sa.Column("cur", sa.BigInteger(), nullable=False),
        sa.Column("cur_denied", sa.BigInteger(), nullable=False),
        sa.Column("prev", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.Text(), nullable=False),
        sa.Column("level_at", sa.BigInteger(), nullable=False),
        sa.Column("limit", sa.BigInteger(), nullable=False),
        sa.Column("burst", sa.BigInteger(), nullable=True),
        sa.Column("duration", sa.Text(), nullable=False),
        sa.Column("algorithm", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "key_hash", name=op.f("pk_consistent_keys")),
    )


def downgrade() -> None:
    op.drop_table("consistent_keys")
