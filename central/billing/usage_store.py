"""Reading usage from the three levels of the ledger, in one consistent snapshot.

Every unit of usage is counted at exactly one level at any moment (see
``central/billing/rollups.py``): in monthly rows, or as the part of a daily or hourly row not yet
rolled up (its "pending" part). A segment planned by ``usage_query.plan`` therefore sums
- ``hour``: hourly rows in full (hour detail exists from ``hourly_from`` on);
- ``day``: daily rows in full, plus the pending part of hourly rows;
- ``month``: monthly rows, plus the pending parts of daily and hourly rows.
A rollup moves usage from one term to the next inside one transaction, and a prune only
deletes rows whose whole count lives on in a coarser level, so no total ever changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Table,
    and_,
    case,
    func,
    literal_column,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncResult

from central.billing.usage_query import (
    DAY_MS,
    Segment,
    UsageQuery,
    UsageRow,
    month_starts,
    period_label,
    plan,
)
from central.models import usage_daily, usage_hourly, usage_monthly, usage_retention

STREAM_CHUNK = 2000
NAMESPACE_WORK_MEM = "64MB"


def pending(table: Table) -> ColumnElement[bool]:
    """Rows with a part not yet rolled up; matches the partial index predicate."""
    c = table.c
    return or_(c.admitted != c.rolled_admitted, c.denied != c.rolled_denied)


@dataclass(frozen=True, slots=True)
class Retention:
    hourly_from: int
    daily_from: int


async def read_retention(connection: AsyncConnection) -> Retention:
    row = (await connection.execute(
        select(usage_retention.c.hourly_from, usage_retention.c.daily_from)
        .where(usage_retention.c.id == 1))).first()
    return Retention(0, 0) if row is None else Retention(int(row[0]), int(row[1]))


class UsageSnapshot:
    """An open read transaction: the retention marks and the usage are read together."""

    def __init__(self, connection: AsyncConnection, retention: Retention) -> None:
        self.connection = connection
        self.retention = retention

    def statement(self, query: UsageQuery) -> Select[Any]:
        """The SQL for ``query``; raises ``InvalidField`` when it needs pruned detail."""
        segments = plan(query, hourly_from=self.retention.hourly_from,
                        daily_from=self.retention.daily_from)
        return usage_statement(query, segments, self.connection.dialect.name)

    async def rows(self, query: UsageQuery) -> list[UsageRow]:
        statement = self.statement(query)
        await self._tune(query)
        result = await self.connection.execute(statement)
        return [_row(query, record) for record in result]

    async def stream(self, query: UsageQuery) -> AsyncIterator[list[UsageRow]]:
        """Rows in chunks from a server-side cursor: memory stays flat for any export.
        The query runs (and fails, if it does) on the first ``__anext__``."""
        result = await self.open_cursor(query)
        async for rows in self.chunks(query, result):
            yield rows

    async def open_cursor(self, query: UsageQuery) -> AsyncResult[Any]:
        statement = self.statement(query)
        await self._tune(query)
        result: AsyncResult[Any] = await self.connection.stream(statement)
        return result

    @staticmethod
    async def chunks(query: UsageQuery, result: AsyncResult[Any]
                     ) -> AsyncIterator[list[UsageRow]]:
        try:
            async for records in result.partitions(STREAM_CHUNK):
                yield [_row(query, record) for record in records]
        finally:
            await result.close()

    async def _tune(self, query: UsageQuery) -> None:
        """Postgres settings for this transaction only. JIT compiles these plain
        aggregations in ~300 ms, longer than they run; a namespace-wide query groups up to
        millions of keys, which the default 4 MB of work_mem would spill to disk."""
        if self.connection.dialect.name != "postgresql":
            return
        await self.connection.exec_driver_sql("SET LOCAL jit = off")
        if query.key_hash is None:
            await self.connection.exec_driver_sql(
                f"SET LOCAL work_mem = '{NAMESPACE_WORK_MEM}'")


class UsageStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[UsageSnapshot]:
        async with self._engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                # One snapshot for the marks and every level: a rollup or prune that
                # commits meanwhile is either wholly visible or not at all. (SQLite's
                # transactions are serializable already.)
                connection = await connection.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True)
            async with connection.begin():
                yield UsageSnapshot(connection, await read_retention(connection))

    async def query(self, query: UsageQuery) -> list[UsageRow]:
        async with self.snapshot() as snapshot:
            return await snapshot.rows(query)


def usage_statement(query: UsageQuery, segments: Sequence[Segment], dialect: str
                    ) -> Select[Any]:
    parts: list[Select[Any]] = []
    for segment in segments:
        a, b = segment.start, segment.end
        if segment.level == "hour":
            parts.append(_level_sums(query, usage_hourly, "hour_start", a, b, full=True))
        elif segment.level == "day":
            parts.append(_level_sums(query, usage_daily, "day_start", a, b, full=True))
            parts.append(_level_sums(query, usage_hourly, "hour_start", a, b, full=False))
        else:
            parts.append(_level_sums(query, usage_monthly, "month_start", a, b, full=True))
            parts.append(_level_sums(query, usage_daily, "day_start", a, b, full=False))
            parts.append(_level_sums(query, usage_hourly, "hour_start", a, b, full=False))
    union = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery("levels")

    c = union.c
    keys: list[Any] = [c[name] for name in _group_names(query)]
    admitted, denied = func.sum(c.admitted), func.sum(c.denied)
    # Byte order on Postgres too, whatever the database's collation: the same rows come
    # out in the same order everywhere.
    order = [k.collate("C") if dialect == "postgresql" and k.name != "period" else k
             for k in keys]
    return (select(*keys, admitted.label("admitted"), denied.label("denied"))
            .group_by(*keys)
            .having(or_(admitted != 0, denied != 0))
            .order_by(*order))


def _group_names(query: UsageQuery) -> list[str]:
    return ["key_hash", *(["region"] if query.by_region else []),
            *(["period"] if query.period else [])]


def _level_sums(query: UsageQuery, table: Table, start: str, a: int, b: int, *, full: bool
                ) -> Select[Any]:
    """One level's rows in ``[a, b)``, in full or only their pending (not yet rolled up)
    part, summed per group. Summing in each branch lets Postgres aggregate in parallel
    right on the scan, with the table's statistics; the outer query adds few rows."""
    c = table.c
    admitted: ColumnElement[Any] = c.admitted
    denied: ColumnElement[Any] = c.denied
    if not full:
        admitted, denied = c.admitted - c.rolled_admitted, c.denied - c.rolled_denied
    conditions = [c.namespace == query.namespace, c[start] >= a, c[start] < b]
    if query.key_hash is not None:
        conditions.append(c.key_hash == query.key_hash)
    if not full:
        conditions.append(pending(table))
    keys: list[Any] = [c.key_hash]
    if query.by_region:
        keys.append(c.region)
    constant: list[Any] = []  # a constant in GROUP BY would mean "column number N"
    if query.period == "day":
        keys.append((c[start] - c[start] % DAY_MS).label("period"))
    elif query.period == "month":
        months = month_starts(a, b)
        if len(months) == 1:
            constant.append(literal_column(str(months[0]), BigInteger).label("period"))
        elif table is usage_monthly:
            keys.append(c[start].label("period"))
        else:
            keys.append(_month_of(c[start], months).label("period"))
    return (select(*keys, *constant, func.sum(admitted).label("admitted"),
                   func.sum(denied).label("denied"))
            .where(and_(*conditions))
            .group_by(*keys))


def _month_of(t: ColumnElement[Any], months: list[int]) -> ColumnElement[Any]:
    """The start of the month holding ``t``, one of ``months`` (ascending, two or more).

    A CASE over the month starts, newest first (recent rows are the many), with the bounds
    inlined as integer literals: portable, and cheaper per row than calendar functions.
    """
    newest_first = [literal_column(str(m), BigInteger) for m in reversed(months)]
    return case(*((t >= m, m) for m in newest_first[:-1]), else_=newest_first[-1])


def _row(query: UsageQuery, record: Any) -> UsageRow:
    mapping = record._mapping
    return UsageRow(
        identifier_hash=mapping["key_hash"],
        region=mapping["region"] if query.by_region else None,
        period=period_label(int(mapping["period"]), query.period) if query.period else None,
        # Postgres sums BIGINT into NUMERIC (Decimal): back to int.
        admitted=int(mapping["admitted"]),
        denied=int(mapping["denied"]),
    )
