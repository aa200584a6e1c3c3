"""Rolling usage up (hour -> day -> month) and pruning the fine levels (DESIGN: the ledger).

Accounting. Hourly and daily rows carry ``rolled_admitted``/``rolled_denied``: the part
of their count already added to the next coarser level. The rest is "pending". At every
moment each unit of usage is counted exactly once: as the pending part of an hourly row,
the pending part of a daily row, or in a monthly row. Queries sum exactly that
(``central/billing/usage_store.py``). A fold moves pending amounts one level up - add them to the
coarser row, mark them rolled (or delete the finer row) - in ONE transaction, so a query
sees the amount on one side or the other, never on both or neither.

Why totals never change:
- a fold is a transfer within a transaction (above);
- a prune deletes only rows with nothing pending: their whole count lives on in the
  coarser level; and it advances the retention mark (``usage_retention``) in the same
  transaction, so a query never asks a level for detail it no longer has;
- late usage - a node that was offline, a spill file - is added by ingest to an hourly
  row as always, even for an hour that was rolled up or pruned long ago. It is simply
  pending there: counted by every query at once, and folded by the next run (deleted
  after the fold when its hour is older than the hourly retention).
Concurrent writers (ingest, a deposed leader's last run) are handled by REPEATABLE READ
on Postgres: a row changed after the fold read it makes the fold fail and start over,
so an increment can never be marked rolled without having been added. SQLite runs one
writer at a time.

Only complete periods are folded, a lag after their end, so a day is normally folded
once; a later increment for it costs one more small fold, not a recount. A fold takes a
bounded number of rows per transaction: a day of a busy ledger is folded in chunks of
whole hours, a busy hour (or day, into its month) in slices of the key space. A prune
runs when its retention mark moves: once a day for hourly rows, once a month for daily.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    and_,
    delete,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from central.billing.usage_query import DAY_MS, HOUR_MS, floor_day, floor_month, next_month
from central.billing.usage_store import Retention, pending, read_retention
from central.cancellation import stop_if_cancelled
from central.database import make_engine
from central.models import usage_daily, usage_hourly, usage_monthly, usage_retention
from central.settings import CentralSettings
from sync.clock import Clock
from sync.durations import setting_ms

log = logging.getLogger("regionlimit.central.billing.rollups")

# A day (month) is folded this long after it ended: usage flushed just before midnight is
# usually ingested by then. Later arrivals are still correct, only folded again.
ROLLUP_LAG_MS = HOUR_MS
MAX_ATTEMPTS = 8
MAINTENANCE_TIMEOUT_S = 900.0  # per statement; a hung one must fail eventually
FOLD_BATCH_ROWS = 50_000  # source rows per fold transaction, about
MAX_KEY_SPLIT_DEPTH = 3  # up to 16^3 key slices of one hour or day
HEX = "0123456789abcdef"
# Postgres: serialization failure, deadlock. SQLite: "database is locked" has no code.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

T = TypeVar("T")


@dataclass(slots=True)
class RollupReport:
    days_folded: int = 0
    months_folded: int = 0
    hourly_pruned: int = 0
    daily_pruned: int = 0

    @property
    def changed(self) -> bool:
        return any((self.days_folded, self.months_folded, self.hourly_pruned,
                    self.daily_pruned))


@dataclass(frozen=True, slots=True)
class _Level:
    """A fold from ``source`` (rows of ``unit_ms`` starting at ``source_start``) into
    ``target`` (periods from ``period_of`` to ``period_end``)."""

    source: Table
    source_start: str
    unit_ms: int
    target: Table
    target_start: str
    period_of: Callable[[int], int]
    period_end: Callable[[int], int]


HOURS_TO_DAYS = _Level(usage_hourly, "hour_start", HOUR_MS, usage_daily, "day_start",
                       floor_day, lambda day: day + DAY_MS)
DAYS_TO_MONTHS = _Level(usage_daily, "day_start", DAY_MS, usage_monthly, "month_start",
                        floor_month, next_month)


@dataclass(frozen=True, slots=True)
class KeyRange:
    """``[low, high)`` of key hashes in byte order (None: unbounded), from splitting the
    key space by hex prefix. The ranges of one split cover every string, hex or not."""

    low: str | None = None
    high: str | None = None
    prefix: str = ""
    depth: int = 0

    def split(self) -> list[KeyRange]:
        bounds: list[str | None] = [self.low, *(self.prefix + d for d in HEX[1:]), self.high]
        return [KeyRange(bounds[i], bounds[i + 1], self.prefix + HEX[i], self.depth + 1)
                for i in range(len(HEX))]

    def conditions(self, key_hash: ColumnElement[str], engine: AsyncEngine
                   ) -> list[ColumnElement[bool]]:
        # Byte order, whatever the database's collation, so the ranges partition exactly.
        column = key_hash.collate("C") if engine.dialect.name == "postgresql" else key_hash
        found = []
        if self.low is not None:
            found.append(column >= self.low)
        if self.high is not None:
            found.append(column < self.high)
        return found


class RollupJob:
    def __init__(self, engine: AsyncEngine, *, hourly_retention_ms: int,
                 daily_retention_ms: int, interval_s: float = 600.0,
                 lag_ms: int = ROLLUP_LAG_MS, owns_engine: bool = False) -> None:
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported database dialect {engine.dialect.name!r}")
        self._engine = engine
        self._owns_engine = owns_engine
        self.hourly_retention_ms = hourly_retention_ms
        self.daily_retention_ms = daily_retention_ms
        self.interval_s = interval_s
        self.lag_ms = lag_ms

    @classmethod
    def from_settings(cls, engine: AsyncEngine, settings: CentralSettings) -> RollupJob:
        """A job on its own small engine for ``engine``'s database (see
        ``maintenance_engine``); ``aclose`` or the end of ``run_forever`` disposes it."""
        return cls(maintenance_engine(engine),
                   hourly_retention_ms=setting_ms(settings.hourly_retention),
                   daily_retention_ms=setting_ms(settings.daily_retention),
                   interval_s=settings.seconds("rollup_interval"), owns_engine=True)

    async def aclose(self) -> None:
        if self._owns_engine:
            await self._engine.dispose()

    async def run_forever(self, clock: Clock) -> None:
        """The leader's loop: a failed run is logged and retried at the next interval.
        The first run waits an interval too: a new leader lets ingest catch up first."""
        try:
            while True:
                stop_if_cancelled()
                await asyncio.sleep(self.interval_s)
                try:
                    report = await self.run_once(clock())
                except Exception as exc:
                    log.warning("usage rollup failed (%s: %s); retrying in %.0fs",
                                type(exc).__name__, str(exc)[:200], self.interval_s)
                else:
                    if report.changed:
                        log.info("usage rollup: %d days and %d months folded, %d hourly "
                                 "and %d daily rows pruned", report.days_folded,
                                 report.months_folded, report.hourly_pruned,
                                 report.daily_pruned)
        finally:
            await self.aclose()

    async def run_once(self, now_ms: int) -> RollupReport:
        """Fold complete days and months, then prune past the retentions. Idempotent: a
        second run at the same ``now_ms`` finds nothing to do."""
        report = RollupReport()
        report.days_folded = await self._fold_all(
            HOURS_TO_DAYS, floor_day(now_ms - self.lag_ms))
        report.months_folded = await self._fold_all(
            DAYS_TO_MONTHS, floor_month(now_ms - self.lag_ms))
        report.hourly_pruned = await self._transaction(lambda c: self._prune(
            c, usage_hourly, "hour_start", "hourly_from",
            floor_day(now_ms - self.hourly_retention_ms)))
        report.daily_pruned = await self._transaction(lambda c: self._prune(
            c, usage_daily, "day_start", "daily_from",
            floor_month(now_ms - self.daily_retention_ms)))
        await self._transaction(lambda c: c.execute(
            update(usage_retention).where(usage_retention.c.id == 1)
            .values(rollup_at=now_ms)))
        return report

    # --- folding ---------------------------------------------------------------------

    async def _fold_all(self, level: _Level, before: int) -> int:
        """Fold the pending rows of every period that ends by ``before``, oldest first;
        returns how many target periods received usage.

        One transaction per chunk of at most ``FOLD_BATCH_ROWS`` rows (whole source units,
        within one target period): a fold adds deltas, so a period may be folded in any
        number of pieces; bounded transactions keep statements short and locks brief,
        and progress survives a failure.
        """
        periods: set[int] = set()
        cursor = 0
        while True:
            oldest = await self._oldest_pending(level, cursor, before)
            if oldest is None:
                return len(periods)
            period = level.period_of(oldest)
            end = await self._chunk_end(level, oldest, level.period_end(period))
            await self._fold_range(level, period, oldest, end, KeyRange())
            periods.add(period)
            cursor = end  # later increments for earlier periods wait for the next run

    async def _fold_range(self, level: _Level, period: int, start: int, end: int,
                          keys: KeyRange) -> None:
        """Fold ``[start, end)`` in one transaction - or, when it is a single source unit
        (an hour, a day) holding more than ``FOLD_BATCH_ROWS`` rows, in slices of the key
        space, so that no statement grows with the number of keys."""
        if (end - start == level.unit_ms and keys.depth < MAX_KEY_SPLIT_DEPTH
                and await self._more_than(level, start, end, keys, FOLD_BATCH_ROWS)):
            for part in keys.split():
                await self._fold_range(level, period, start, end, part)
            return
        await self._transaction(lambda c: self._fold(c, level, period, start, end, keys))

    async def _more_than(self, level: _Level, start: int, end: int, keys: KeyRange,
                         limit: int) -> bool:
        s = level.source.c
        column = s[level.source_start]
        inner = (select(column).where(pending(level.source), column >= start, column < end,
                                      *keys.conditions(s.key_hash, self._engine))
                 .limit(limit + 1).subquery())
        async with self._engine.connect() as connection:
            found = (await connection.execute(select(func.count()).select_from(inner))
                     ).scalar_one()
        return int(found) > limit

    async def _chunk_end(self, level: _Level, start: int, period_end: int) -> int:
        """Where a fold starting at ``start`` stops: the period's end, or earlier so that
        it takes about ``FOLD_BATCH_ROWS`` rows (at least one whole source unit)."""
        c = level.source.c
        column = c[level.source_start]
        async with self._engine.connect() as connection:
            beyond = (await connection.execute(
                select(column).where(pending(level.source), column >= start,
                                     column < period_end)
                .order_by(column).offset(FOLD_BATCH_ROWS).limit(1))).scalar()
        if beyond is None:
            return period_end
        return max(int(beyond), start + level.unit_ms)

    async def _oldest_pending(self, level: _Level, cursor: int, before: int) -> int | None:
        c = level.source.c
        start = c[level.source_start]
        async with self._engine.connect() as connection:
            # The partial index on pending rows answers this from its first entry.
            oldest = (await connection.execute(
                select(func.min(start)).where(pending(level.source), start >= cursor,
                                              start < before))).scalar()
        return None if oldest is None else int(oldest)

    async def _fold(self, connection: AsyncConnection, level: _Level, period: int, start: int,
                    end: int, keys: KeyRange) -> None:
        """Add the pending part of ``level.source`` rows in ``[start, end)`` (inside the
        target ``period``) and ``keys`` to the target rows, then mark it rolled - or delete
        the source rows when their detail is past retention (a late arrival for a pruned
        period)."""
        source, target = level.source, level.target
        s = source.c
        in_period = and_(s[level.source_start] >= start, s[level.source_start] < end,
                         pending(source), *keys.conditions(s.key_hash, self._engine))
        # Lock the rows in primary-key order first: ingest upserts in that order too, so
        # the two never deadlock (and under REPEATABLE READ a row ingest changed since
        # this transaction's snapshot fails the lock, and the fold starts over).
        locked = (select(s[level.source_start]).where(in_period)
                  .order_by(s.namespace, s.key_hash, s.region, s[level.source_start])
                  .with_for_update().subquery())
        await connection.execute(select(func.count()).select_from(locked))  # no rows back
        sums = (select(s.namespace, s.key_hash, s.region,
                       literal_column(str(int(period)), BigInteger),
                       func.sum(s.admitted - s.rolled_admitted),
                       func.sum(s.denied - s.rolled_denied))
                .where(in_period)
                .group_by(s.namespace, s.key_hash, s.region))
        insert = _insert(connection)(target).from_select(
            ["namespace", "key_hash", "region", level.target_start, "admitted", "denied"],
            sums)
        t, new = target.c, insert.excluded
        await connection.execute(insert.on_conflict_do_update(
            index_elements=["namespace", "key_hash", "region", level.target_start],
            set_={"admitted": t.admitted + new.admitted, "denied": t.denied + new.denied}))
        retention = await read_retention(connection)
        # Retention marks fall on target period boundaries: the whole chunk is on one side.
        if period < _detail_from(level, retention):
            await connection.execute(delete(source).where(in_period))
        else:
            await connection.execute(update(source).where(in_period).values(
                rolled_admitted=s.admitted, rolled_denied=s.denied))

    # --- pruning ---------------------------------------------------------------------

    async def _prune(self, connection: AsyncConnection, table: Table, start: str, mark: str,
                     cutoff: int) -> int:
        """Delete the rows before ``cutoff`` whose whole count was rolled up, and move the
        retention mark to ``cutoff`` in the same transaction. Pending rows before it (an
        increment that arrived after the fold) stay, counted, until the next fold."""
        retention = await read_retention(connection)
        if cutoff <= getattr(retention, mark):
            return 0  # the mark only advances: once a day (month), not every run
        c = table.c
        result = await connection.execute(delete(table).where(
            c[start] < cutoff, c.admitted == c.rolled_admitted, c.denied == c.rolled_denied))
        await connection.execute(update(usage_retention).where(usage_retention.c.id == 1)
                                 .values({mark: cutoff}))
        return int(result.rowcount)

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        for attempt in range(MAX_ATTEMPTS):
            try:
                async with self._engine.connect() as connection:
                    if connection.dialect.name == "postgresql":
                        connection = await connection.execution_options(
                            isolation_level="REPEATABLE READ")
                    async with connection.begin():
                        return await work(connection)
            except DBAPIError as exc:
                if attempt + 1 == MAX_ATTEMPTS or not _retryable(exc):
                    raise
                log.debug("rollup transaction conflicted (%s); retrying", exc.orig)
            await asyncio.sleep(min(2.0, 0.02 * 2 ** attempt))
        raise AssertionError("unreachable")


def maintenance_engine(engine: AsyncEngine) -> AsyncEngine:
    """An engine for the job alone: a pruning DELETE of a busy day may run longer than
    the command timeout that keeps ingest's statements short, and the job needs only one
    connection at a time, not a share of the service's pool."""
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name == "postgresql":
        return make_engine(url, pool_size=1, max_overflow=1,
                           connect_args={"command_timeout": MAINTENANCE_TIMEOUT_S})
    return make_engine(url)


def _detail_from(level: _Level, retention: Retention) -> int:
    return retention.hourly_from if level is HOURS_TO_DAYS else retention.daily_from


def _insert(connection: AsyncConnection) -> Any:
    return postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert


def _retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code in RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig)
