"""One authority lane's transaction: lock the batch's keys, decide, write, commit.

Two implementations of one seam. ``PostgresDecisions`` talks to asyncpg directly with
prepared statements over unnest() arrays: BEGIN, one SELECT ... FOR UPDATE, one statement
that writes the keys' state and the usage buckets, COMMIT. That is four round trips
whatever the batch size, and none of SQLAlchemy's per-statement CPU, which on a shared
core set the consistent-mode latency (bench/consistent_bench.py). ``SqlDecisions`` is
the same transaction through SQLAlchemy, for SQLite (`regionlimit dev`).

Rows are locked in key order, so lanes and replicas never deadlock. A key seen for the
first time gets its row in a short transaction of its own before the locking one, so no
transaction ever inserts while holding locks out of key order. That row starts from the
fast-mode usage the ledger's components hold for its windows (read outside the locking
transaction: a commit interval behind at most).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import bindparam, func, select, tuple_
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from central.consistent.decide import (
    STATE_FIELDS,
    BatchOutcome,
    KeyId,
    WindowUsage,
    decide_batch,
    first_policies,
    fresh_row,
    seed_starts,
    state_columns,
    state_from_row,
)
from central.consistent.state import consistent_keys
from central.ledger import bucket_upsert
from central.models import components
from sync.clock import Clock
from sync.messages import ConsistentDecision, ConsistentRequest
from sync.policy import Policy

# Every column of a consistent_keys row but its key, in one order for all statements.
ROW_COLUMNS = (*STATE_FIELDS, "level", "limit", "burst", "duration", "algorithm",
               "updated_at")
_COLUMN_TYPES = {"level": "text", "duration": "text", "algorithm": "text"}


def _typed(names: Sequence[str], first: int) -> str:
    return ", ".join(f"${i}::{_COLUMN_TYPES.get(name, 'bigint')}[]"
                     for i, name in enumerate(names, start=first))


_QUOTED = ", ".join(f'"{name}"' for name in ROW_COLUMNS)
LOCK_SQL = """
SELECT k.* FROM consistent_keys AS k
JOIN unnest($1::text[], $2::text[]) AS v(namespace, key_hash)
  ON k.namespace = v.namespace AND k.key_hash = v.key_hash
ORDER BY k.namespace, k.key_hash
FOR UPDATE OF k"""
CREATE_SQL = f"""
INSERT INTO consistent_keys (namespace, key_hash, {_QUOTED})
SELECT * FROM unnest($1::text[], $2::text[], {_typed(ROW_COLUMNS, 3)})
ON CONFLICT DO NOTHING"""
_USAGE_ARGS = 2 + len(ROW_COLUMNS) + 1  # first parameter number of the usage arrays
WRITE_SQL = f"""
WITH state AS (
  UPDATE consistent_keys AS k
  SET ({_QUOTED}) = ({", ".join(f'v."{name}"' for name in ROW_COLUMNS)})
  FROM unnest($1::text[], $2::text[], {_typed(ROW_COLUMNS, 3)})
    AS v(namespace, key_hash, {_QUOTED})
  WHERE k.namespace = v.namespace AND k.key_hash = v.key_hash
  RETURNING 1)
INSERT INTO usage_hourly (namespace, key_hash, region, hour_start, admitted, denied)
SELECT * FROM unnest(${_USAGE_ARGS}::text[], ${_USAGE_ARGS + 1}::text[],
                     ${_USAGE_ARGS + 2}::text[], ${_USAGE_ARGS + 3}::bigint[],
                     ${_USAGE_ARGS + 4}::bigint[], ${_USAGE_ARGS + 5}::bigint[])
ON CONFLICT (namespace, key_hash, region, hour_start) DO UPDATE
  SET admitted = usage_hourly.admitted + excluded.admitted,
      denied = usage_hourly.denied + excluded.denied"""


WINDOW_USAGE_SQL = """
SELECT c.namespace, c.key_hash, c.window_start, SUM(c.admitted)::bigint AS admitted
FROM components AS c
JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS v(namespace, key_hash, window_start)
  ON c.namespace = v.namespace AND c.key_hash = v.key_hash
 AND c.window_start = v.window_start
GROUP BY c.namespace, c.key_hash, c.window_start"""


def _seed_windows(policies: dict[KeyId, Policy], now: int) -> list[tuple[str, str, int]]:
    return [(*key, start) for key, policy in policies.items()
            for start in seed_starts(policy, now)]


class DecisionTransactions(Protocol):
    """Decides batches on one connection it keeps; closing drops that connection."""

    async def decide(self, requests: Sequence[ConsistentRequest]
                     ) -> list[ConsistentDecision]:
        """Decide ``requests`` in arrival order, committed before it returns."""

    async def close(self) -> None: ...


def decisions_for(engine: AsyncEngine, clock: Clock) -> DecisionTransactions:
    if engine.dialect.name == "postgresql":
        return PostgresDecisions(engine, clock)
    return SqlDecisions(engine, clock)


def _key_arrays(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Column arrays for unnest(): namespace, key_hash, then ROW_COLUMNS."""
    return [[row[name] for row in rows] for name in ("namespace", "key_hash", *ROW_COLUMNS)]


class _HeldConnection:
    """An engine connection a lane keeps between batches (no checkout, no pre-ping)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None

    async def held(self) -> AsyncConnection:
        if self._connection is None or self._connection.closed:
            self._connection = await self._engine.connect()
        return self._connection

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


class PostgresDecisions(_HeldConnection):
    def __init__(self, engine: AsyncEngine, clock: Clock) -> None:
        super().__init__(engine)
        self._clock = clock

    async def decide(self, requests: Sequence[ConsistentRequest]
                     ) -> list[ConsistentDecision]:
        try:
            raw = await (await self.held()).get_raw_connection()
            driver: Any = raw.driver_connection  # asyncpg.Connection
            now = self._clock()
            policies = first_policies(requests)
            names = [key[0] for key in policies]
            hashes = [key[1] for key in policies]
            for _ in range(2):
                async with driver.transaction():
                    rows = await driver.fetch(LOCK_SQL, names, hashes)
                    if len(rows) == len(policies):
                        outcome = decide_batch(
                            requests, {(r["namespace"], r["key_hash"]): state_from_row(r, now)
                                       for r in rows}, now)
                        await driver.execute(WRITE_SQL, *_write_arguments(outcome, now))
                        return outcome.decisions
                found = {(r["namespace"], r["key_hash"]) for r in rows}
                missing = {k: p for k, p in policies.items() if k not in found}
                used = await _window_usage(driver, _seed_windows(missing, now))
                await driver.execute(CREATE_SQL, *_key_arrays(
                    [fresh_row(key, policy, now, used) for key, policy in missing.items()]))
            raise RuntimeError("consistent_keys rows missing right after their insert")
        except BaseException:
            await self.close()  # its transaction state is unknown
            raise


async def _window_usage(driver: Any, windows: list[tuple[str, str, int]]) -> WindowUsage:
    if not windows:
        return {}
    rows = await driver.fetch(WINDOW_USAGE_SQL, [w[0] for w in windows],
                              [w[1] for w in windows], [w[2] for w in windows])
    return {(r["namespace"], r["key_hash"], r["window_start"]): r["admitted"] for r in rows}


def _write_arguments(outcome: BatchOutcome, now: int) -> list[list[Any]]:
    states = [{"namespace": key[0], "key_hash": key[1], **state_columns(state, now)}
              for key, state in sorted(outcome.states.items())]
    usage = list(outcome.usage.items())
    return [*_key_arrays(states),
            [key[0] for key, _ in usage], [key[1] for key, _ in usage],
            [key[2] for key, _ in usage], [outcome.hour] * len(usage),
            [counts[0] for _, counts in usage], [counts[1] for _, counts in usage]]


class SqlDecisions(_HeldConnection):
    """The same transaction through SQLAlchemy, on SQLite."""

    def __init__(self, engine: AsyncEngine, clock: Clock) -> None:
        super().__init__(engine)
        self._clock = clock
        self._add_usage = bucket_upsert("sqlite")

    async def decide(self, requests: Sequence[ConsistentRequest]
                     ) -> list[ConsistentDecision]:
        try:
            connection = await self.held()
            now = self._clock()
            policies = first_policies(requests)
            async with connection.begin():
                used = await self._new_keys_usage(connection, policies, now)
            async with connection.begin():
                return await self._decide_on(connection, requests, policies, used, now)
        except BaseException:
            await self.close()
            raise

    @staticmethod
    async def _new_keys_usage(connection: AsyncConnection, policies: dict[KeyId, Policy],
                              now: int) -> WindowUsage:
        """Fast-mode usage in the windows of the keys that have no row yet."""
        table, c = consistent_keys, components.c
        found = set((await connection.execute(
            select(table.c.namespace, table.c.key_hash)
            .where(tuple_(table.c.namespace, table.c.key_hash).in_(list(policies))))).all())
        windows = _seed_windows({k: p for k, p in policies.items() if k not in found}, now)
        if not windows:
            return {}
        rows = await connection.execute(
            select(c.namespace, c.key_hash, c.window_start, func.sum(c.admitted))
            .where(tuple_(c.namespace, c.key_hash, c.window_start).in_(windows))
            .group_by(c.namespace, c.key_hash, c.window_start))
        return {(ns, key, start): int(admitted) for ns, key, start, admitted in rows}

    async def _decide_on(self, connection: AsyncConnection,
                         requests: Sequence[ConsistentRequest], policies: dict[KeyId, Policy],
                         used: WindowUsage, now: int) -> list[ConsistentDecision]:
        table = consistent_keys
        # Always an INSERT first: on SQLite it takes the write lock at once, so the
        # transaction never has to upgrade a read lock (which can fail without waiting).
        await connection.execute(sqlite.insert(table).on_conflict_do_nothing(), [
            fresh_row(key, policy, now, used) for key, policy in policies.items()])
        rows = (await connection.execute(
            select(table).where(tuple_(table.c.namespace, table.c.key_hash).in_(list(policies)))
            .order_by(table.c.namespace, table.c.key_hash).with_for_update())).all()
        outcome = decide_batch(requests, {(row.namespace, row.key_hash):
                                          state_from_row(row._mapping, now) for row in rows},
                               now)
        await connection.execute(
            table.update().where((table.c.namespace == bindparam("k_ns"))
                                 & (table.c.key_hash == bindparam("k_key"))),
            # Keys bound as k_*: the UPDATE's WHERE, not columns to set.
            [{"k_ns": key[0], "k_key": key[1], **state_columns(state, now)}
             for key, state in outcome.states.items()])
        if outcome.usage:
            await connection.execute(self._add_usage, [
                {"namespace": ns, "key_hash": key, "region": region,
                 "hour_start": outcome.hour, "admitted": a, "denied": d}
                for (ns, key, region), (a, d) in outcome.usage.items()])
        return outcome.decisions
