"""Usage rollups: daily and monthly levels, rolled amounts, retention watermarks.

Revision ID: 0002
Revises: 0003
Create Date: 2026-11-23

Chained after 0003 (consistent-mode state), which was written first against 0001, so the
history stays linear: 0001 -> 0003 -> 0002. Revision ids are names, not an order.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# Must stay textually equal to central.models.PENDING_SQL (partial index predicates).
PENDING_SQL = "admitted <> rolled_admitted OR denied <> rolled_denied"


def _usage_columns(start: str) -> list[sa.Column[object]]:
    return [
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column(start, sa.BigInteger(), nullable=False),
        sa.Column("admitted", sa.BigInteger(), nullable=False),
        sa.Column("denied", sa.BigInteger(), nullable=False),
    ]


def _rolled_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("rolled_admitted", sa.BigInteger(), server_default=sa.text("0"),
                  nullable=False),
        sa.Column("rolled_denied", sa.BigInteger(), server_default=sa.text("0"),
                  nullable=False),
    ]


def _pending_index(table: str, column: str) -> None:
    op.create_index(op.f(f"ix_{table}_pending"), table, [column],
                    postgresql_where=sa.text(PENDING_SQL), sqlite_where=sa.text(PENDING_SQL))


def upgrade() -> None:
    # Existing hourly rows start as entirely pending: the first rollup folds them.
    for column in _rolled_columns():
        op.add_column("usage_hourly", column)
    _pending_index("usage_hourly", "hour_start")

    op.create_table(
        "usage_daily",
        *_usage_columns("day_start"),
        *_rolled_columns(),
        sa.PrimaryKeyConstraint("namespace", "key_hash", "region", "day_start",
                                name=op.f("pk_usage_daily")),
    )
    _pending_index("usage_daily", "day_start")

    op.create_table(
        "usage_monthly",
        *_usage_columns("month_start"),
        sa.PrimaryKeyConstraint("namespace", "key_hash", "region", "month_start",
                                name=op.f("pk_usage_monthly")),
    )

    retention = op.create_table(
        "usage_retention",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hourly_from", sa.BigInteger(), nullable=False),
        sa.Column("daily_from", sa.BigInteger(), nullable=False),
        sa.Column("rollup_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_usage_retention_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_retention")),
    )
    # Nothing pruned yet: every level is complete from the epoch on.
    op.bulk_insert(retention, [{"id": 1, "hourly_from": 0, "daily_from": 0, "rollup_at": 0}])


def downgrade() -> None:
    # Rolled-up usage cannot be spread back over hours: a downgrade loses the history
    # older than the hourly retention. Fold it back into hourly rows first if needed.
    op.drop_table("usage_retention")
    op.drop_table("usage_monthly")
    op.drop_index(op.f("ix_usage_daily_pending"), table_name="usage_daily")
    op.drop_table("usage_daily")
    op.drop_index(op.f("ix_usage_hourly_pending"), table_name="usage_hourly")
    with op.batch_alter_table("usage_hourly") as batch:
        batch.drop_column("rolled_denied")
        batch.drop_column("rolled_admitted")
