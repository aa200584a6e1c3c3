"""SQLAlchemy models of the central ledger and configuration.

Times are epoch milliseconds (UTC) in BIGINT columns, as everywhere in the contract.
The schema itself is created by the Alembic migrations in ``central/migrations``; these
models describe it for queries and must be kept in step with the migrations by hand.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so later migrations can alter them by name on every
# backend (SQLite batch mode needs names to drop or recreate constraints).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Component(Base):
    """One node's grow-only counts for one key in one limit window.

    The maximum per component is what makes redelivery and reordering harmless; the
    policy columns carry the limit resolved by the node, so central can decide blocks
    for inline and file-configured namespaces too.
    """

    __tablename__ = "components"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    node_id: Mapped[str] = mapped_column(Text, primary_key=True)
    region: Mapped[str] = mapped_column(Text)
    window_end: Mapped[int] = mapped_column(BigInteger)
    admitted: Mapped[int] = mapped_column(BigInteger)
    denied: Mapped[int] = mapped_column(BigInteger)
    limit: Mapped[int] = mapped_column(BigInteger)
    duration: Mapped[str] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(Text)
    burst: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)

    # Lookups by (namespace, key_hash, window_start) use the primary key's leading
    # columns; a separate index on them would only slow the upserts down.
    __table_args__ = (Index("ix_components_window_end", "window_end"),)


# A usage row is "pending" while part of its count has not been folded into the next
# coarser level yet (see central/billing/rollups.py). The same text serves the partial indexes and
# the queries, so that Postgres can prove a query's WHERE implies the index predicate.
PENDING_SQL = "admitted <> rolled_admitted OR denied <> rolled_denied"


class UsageHourly(Base):
    """Admitted and denied cost per key, region and UTC hour: what billing reads.

    ``admitted``/``denied`` only ever grow (ingest adds). ``rolled_*`` is the part already
    added to ``usage_daily``; the difference is pending. Rows are rolled up into
    ``usage_daily`` and ``usage_monthly`` and pruned after the hourly retention.
    """

    __tablename__ = "usage_hourly"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    region: Mapped[str] = mapped_column(Text, primary_key=True)
    hour_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    admitted: Mapped[int] = mapped_column(BigInteger)
    denied: Mapped[int] = mapped_column(BigInteger)
    # Server defaults: ingest inserts rows without naming these columns.
    rolled_admitted: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    rolled_denied: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))

    __table_args__ = (
        Index("ix_usage_hourly_pending", "hour_start",
              postgresql_where=text(PENDING_SQL), sqlite_where=text(PENDING_SQL)),
    )


class UsageDaily(Base):
    """Hourly usage rolled up per UTC day; ``rolled_*`` is the part added to monthly."""

    __tablename__ = "usage_daily"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    region: Mapped[str] = mapped_column(Text, primary_key=True)
    day_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    admitted: Mapped[int] = mapped_column(BigInteger)
    denied: Mapped[int] = mapped_column(BigInteger)
    rolled_admitted: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    rolled_denied: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))

    __table_args__ = (
        Index("ix_usage_daily_pending", "day_start",
              postgresql_where=text(PENDING_SQL), sqlite_where=text(PENDING_SQL)),
    )


class UsageMonthly(Base):
    """Daily usage rolled up per UTC calendar month; kept forever."""

    __tablename__ = "usage_monthly"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    region: Mapped[str] = mapped_column(Text, primary_key=True)
    month_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    admitted: Mapped[int] = mapped_column(BigInteger)
    denied: Mapped[int] = mapped_column(BigInteger)


class UsageRetention(Base):
    """The single row saying from when on the fine levels are complete.

    ``hourly_from`` (a UTC day start): hourly rows of every hour at or after it are
    present; earlier hours were pruned. ``daily_from`` (a UTC month start): the same for
    daily rows. Queries read both in the snapshot they read usage in, so they never ask a
    pruned level for detail. ``rollup_at`` is when the last rollup run completed.
    """

    __tablename__ = "usage_retention"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    hourly_from: Mapped[int] = mapped_column(BigInteger)
    daily_from: Mapped[int] = mapped_column(BigInteger)
    rollup_at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class Namespace(Base):
    """A namespace configured at central (wins over node files and inline fields)."""

    __tablename__ = "namespaces"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    limit: Mapped[int] = mapped_column(BigInteger)
    duration: Mapped[str] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(Text)
    burst: Mapped[int | None] = mapped_column(BigInteger)
    mode: Mapped[str] = mapped_column(Text)
    on_unavailable: Mapped[str] = mapped_column(Text)
    timeout: Mapped[str] = mapped_column(Text)
    shadow_mode: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    version: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class Override(Base):
    """Per-identifier replacement of namespace fields; NULL means "the namespace's".

    No foreign key to ``namespaces``: an override may target a namespace that is only
    configured in node files or used inline.
    """

    __tablename__ = "overrides"

    namespace: Mapped[str] = mapped_column(Text, primary_key=True)
    identifier_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    limit: Mapped[int | None] = mapped_column(BigInteger)
    duration: Mapped[str | None] = mapped_column(Text)
    algorithm: Mapped[str | None] = mapped_column(Text)
    burst: Mapped[int | None] = mapped_column(BigInteger)
    mode: Mapped[str | None] = mapped_column(Text)
    on_unavailable: Mapped[str | None] = mapped_column(Text)
    timeout: Mapped[str | None] = mapped_column(Text)
    shadow_mode: Mapped[bool | None] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class ConfigState(Base):
    """The single row holding the configuration version.

    Every configuration change bumps it in the same transaction (an UPDATE of this row,
    which also serializes concurrent writers across replicas), so nodes can tell a stale
    snapshot from a current one with one integer.
    """

    __tablename__ = "config_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class QuarantinedRow(Base):
    """A ledger row the database refused, set aside so the rest of its batch commits.

    ``row`` is the refused row as ASCII JSON (a NUL the database refused is escaped, so
    it can be stored here); ``reason`` is the database's error class and message.
    """

    __tablename__ = "usage_quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    quarantined_at: Mapped[int] = mapped_column(BigInteger)
    table_name: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    row: Mapped[str] = mapped_column(Text)


class PartitionLease(Base):
    """The term of each partition's leader lease. A new leader raises the term as it
    takes the lock; every ledger write first reads the term FOR SHARE and aborts unless
    it is its own, so a deposed leader cannot write, and the new leader's raise waits
    for the old leader's write in flight to finish (central/leadership.py)."""

    __tablename__ = "partition_leases"

    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    term: Mapped[int] = mapped_column(BigInteger)


# Core tables, for bulk statements (upserts) that bypass the ORM unit of work.
components = cast(Table, Component.__table__)
usage_hourly = cast(Table, UsageHourly.__table__)
usage_daily = cast(Table, UsageDaily.__table__)
usage_quarantine = cast(Table, QuarantinedRow.__table__)
partition_leases = cast(Table, PartitionLease.__table__)
usage_monthly = cast(Table, UsageMonthly.__table__)
usage_retention = cast(Table, UsageRetention.__table__)
namespaces = cast(Table, Namespace.__table__)
overrides = cast(Table, Override.__table__)
config_state = cast(Table, ConfigState.__table__)
