"""Quarantine for ledger rows the database refuses.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-03

Chained after 0002, the current head (the history is 0001 -> 0003 -> 0002 -> 0004).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "usage_quarantine",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("quarantined_at", sa.BigInteger(), nullable=False),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("row", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_quarantine"),
    )


def downgrade() -> None:
    op.drop_table("usage_quarantine")
