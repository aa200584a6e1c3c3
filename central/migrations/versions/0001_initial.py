"""Initial schema: usage components and hourly buckets, configuration tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "components",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("node_id", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("window_end", sa.BigInteger(), nullable=False),
        sa.Column("admitted", sa.BigInteger(), nullable=False),
        sa.Column("denied", sa.BigInteger(), nullable=False),
        sa.Column("limit", sa.BigInteger(), nullable=False),
        sa.Column("duration", sa.Text(), nullable=False),
        sa.Column("algorithm", sa.Text(), nullable=False),
        sa.Column("burst", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "namespace", "key_hash", "window_start", "node_id", name=op.f("pk_components")
        ),
    )
    op.create_index(op.f("ix_components_window_end"), "components", ["window_end"])

    op.create_table(
        "usage_hourly",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("hour_start", sa.BigInteger(), nullable=False),
        sa.Column("admitted", sa.BigInteger(), nullable=False),
        sa.Column("denied", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "namespace", "key_hash", "region", "hour_start", name=op.f("pk_usage_hourly")
        ),
    )

    op.create_table(
        "namespaces",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("limit", sa.BigInteger(), nullable=False),
        sa.Column("duration", sa.Text(), nullable=False),
        sa.Column("algorithm", sa.Text(), nullable=False),
        sa.Column("burst", sa.BigInteger(), nullable=True),
        sa.Column("mode", sa.Text(), nullable=False),
        sa.Column("on_unavailable", sa.Text(), nullable=False),
        sa.Column("timeout", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_namespaces")),
    )

    op.create_table(
        "overrides",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("identifier_hash", sa.Text(), nullable=False),
        sa.Column("limit", sa.BigInteger(), nullable=True),
        sa.Column("duration", sa.Text(), nullable=True),
        sa.Column("algorithm", sa.Text(), nullable=True),
        sa.Column("burst", sa.BigInteger(), nullable=True),
        sa.Column("mode", sa.Text(), nullable=True),
        sa.Column("on_unavailable", sa.Text(), nullable=True),
        sa.Column("timeout", sa.Text(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "identifier_hash", name=op.f("pk_overrides")),
    )

    config_state = op.create_table(
        "config_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_config_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_state")),
    )
    # The row exists from the start, so bumping the version is always a plain UPDATE.
    op.bulk_insert(config_state, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("config_state")
    op.drop_table("overrides")
    op.drop_table("namespaces")
    op.drop_table("usage_hourly")
    op.drop_index(op.f("ix_components_window_end"), table_name="components")
    op.drop_table("components")
