"""Persisting usage: component maxima and hourly buckets (see DESIGN, "the ledger").

Components merge by maximum, so replaying a batch (redelivery, a new leader re-reading
the stream) changes nothing. Buckets add; the caller adds only the rise of a component's
maximum, so they inherit the same idempotency.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import fields, replace
from operator import attrgetter
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Insert,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from central.consistent.state import idle_keys_delete
from central.leadership import LeaderLease
from central.ledger_rows import BucketIncrement as BucketIncrement
from central.ledger_rows import ComponentRow as ComponentRow  # re-exported: rows are pure
from central.models import components, usage_hourly, usage_quarantine

# Selected in this order, so a result row builds a ComponentRow positionally (a dict per
# row, Row._asdict, was 29% of a new leader's load).
_COMPONENT_FIELDS = tuple(f.name for f in fields(ComponentRow))
_COMPONENT_KEY = ("namespace", "key_hash", "window_start", "node_id")
# Taken from the incoming row when it is at least as far along as the stored one.
_COMPONENT_LATEST = tuple(
    name for name in _COMPONENT_FIELDS if name not in (*_COMPONENT_KEY, "admitted", "denied")
)
_BUCKET_KEY = ("namespace", "key_hash", "region", "hour_start")
_BUCKET_FIELDS = tuple(f.name for f in fields(BucketIncrement))
# dataclasses.asdict deep-copies field by field: ten times slower than this on 10k rows.
_component_values = attrgetter(*_COMPONENT_FIELDS)
_bucket_values = attrgetter(*_BUCKET_FIELDS)


def _component_params(row: ComponentRow) -> dict[str, Any]:
    return dict(zip(_COMPONENT_FIELDS, _component_values(row), strict=True))


def _bucket_params(increment: BucketIncrement) -> dict[str, Any]:
    return dict(zip(_BUCKET_FIELDS, _bucket_values(increment), strict=True))


class LedgerStore:
    """Reads and writes the usage tables.

    With a ``lease``, writes run through the lease's fenced transaction (on Postgres, the
    connection that holds the leader lock), so a deposed leader cannot commit.
    """

    def __init__(self, engine: AsyncEngine, *, lease: LeaderLease | None = None) -> None:
        self._engine = engine
        self._lease = lease
        dialect = engine.dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported database dialect {dialect!r}")
        self._upsert_components = _component_upsert(dialect)
        self._add_buckets = _bucket_upsert(dialect)
        # Postgres takes a batch as one statement over arrays (sqlite3 loops over an
        # executemany in C); refused rows are then isolated row by row with the plain
        # statements above.
        self._arrays = dialect == "postgresql"
        self._component_batch = _component_upsert(dialect, arrays=self._arrays)
        self._bucket_batch = _bucket_upsert(dialect, arrays=self._arrays)

    async def write(
        self,
        components: Sequence[ComponentRow],
        increments: Sequence[BucketIncrement],
        *,
        now: int = 0,
    ) -> int:
        """Merge ``components`` and add ``increments`` in one transaction.

        A row the database refuses (a value it cannot hold, a violated constraint) must
        not block the rest: the write is redone in one transaction that isolates such
        rows (savepoints, halving the batch) into ``usage_quarantine``, stamped ``now``,
        and commits everything else. Returns how many rows were quarantined. Any other
        failure (connection, lease) raises and writes nothing.
        """
        merged = merge_components(components)
        summed = sum_increments(increments)
        if not merged and not summed:
            return 0
        try:
            async with self._write_transaction() as connection:
                if merged:
                    await connection.execute(self._component_batch, self._batch_params(
                        _COMPONENT_FIELDS, map(_component_values, merged)))
                if summed:
                    await connection.execute(self._bucket_batch, self._batch_params(
                        _BUCKET_FIELDS, map(_bucket_values, summed)))
            return 0
        except Exception as exc:
            if not refused_row(exc):
                raise
        component_rows = [_component_params(row) for row in merged]
        bucket_rows = [_bucket_params(inc) for inc in summed]
        async with self._write_transaction() as connection:
            refused = await _isolate(connection, self._upsert_components, component_rows)
            refused_buckets = await _isolate(connection, self._add_buckets, bucket_rows)
            quarantine = [
                _quarantine_params(table, row, reason, now)
                for table, found in (("components", refused), ("usage_hourly", refused_buckets))
                for row, reason in found
            ]
            if quarantine:
                await connection.execute(usage_quarantine.insert(), quarantine)
        return len(quarantine)

    def _batch_params(self, names: Sequence[str], rows: Iterable[tuple[Any, ...]]
                      ) -> dict[str, list[Any]] | list[dict[str, Any]]:
        """Rows of values (in ``names`` order) as the batch statements take them."""
        if self._arrays:
            return _as_arrays(names, rows)
        return [dict(zip(names, row, strict=True)) for row in rows]

    async def load_components(self, *, window_end_after: int) -> list[ComponentRow]:
        """Components of windows ending after ``window_end_after``: a new leader's state."""
        query = select(*(components.c[name] for name in _COMPONENT_FIELDS)).where(
            components.c.window_end > window_end_after
        )
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            return [ComponentRow(*row) for row in result]

    async def stream_components(
        self, *, window_end_after: int, chunk: int = 2000
    ) -> AsyncIterator[list[ComponentRow]]:
        """``load_components`` in chunks from a server-side cursor, so a caller can let
        other work run between chunks (a new leader must keep answering checks)."""
        query = select(*(components.c[name] for name in _COMPONENT_FIELDS)).where(
            components.c.window_end > window_end_after
        )
        async with self._engine.connect() as connection:
            result = await connection.stream(query.execution_options(yield_per=chunk))
            async for rows in result.partitions(chunk):
                yield [ComponentRow(*row) for row in rows]

    async def prune_components(self, *, window_end_before: int) -> int:
        """Delete components of windows that ended before ``window_end_before``."""
        async with self._write_transaction() as connection:
            result = await connection.execute(
                delete(components).where(components.c.window_end < window_end_before)
            )
            return int(result.rowcount)

    async def prune_consistent_keys(self, *, now: int, updated_before: int) -> int:
        """Delete consistent-mode keys gone idle (central/consistent/state.py)."""
        async with self._write_transaction() as connection:
            result = await connection.execute(
                idle_keys_delete(now=now, updated_before=updated_before))
            return int(result.rowcount)

    async def usage_totals(
        self,
        namespace: str,
        key_hash: str | None = None,
        *,
        hour_from: int | None = None,
        hour_to: int | None = None,
    ) -> dict[tuple[str, str], tuple[int, int]]:
        """(key_hash, region) -> (admitted, denied) summed over hours in [from, to)."""
        table = usage_hourly.c
        query = (
            select(table.key_hash, table.region, func.sum(table.admitted), func.sum(table.denied))
            .where(table.namespace == namespace)
            .group_by(table.key_hash, table.region)
        )
        if key_hash is not None:
            query = query.where(table.key_hash == key_hash)
        if hour_from is not None:
            query = query.where(table.hour_start >= hour_from)
        if hour_to is not None:
            query = query.where(table.hour_start < hour_to)
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            # Postgres sums BIGINT into NUMERIC (Decimal): back to int.
            return {(k, r): (int(a), int(d)) for k, r, a, d in result}

    @contextlib.asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        if self._lease is not None:
            async with self._lease.transaction() as connection:
                yield connection
        else:
            async with self._engine.begin() as connection:
                yield connection


def refused_row(exc: BaseException) -> bool:
    """True when the database (or its driver) refused a value in a row, rather than the
    connection, the lease or the statement failing: SQLSTATE class 22 (data exception)
    or 23 (integrity), or sqlite3's OverflowError for an int beyond 64 bits."""
    if isinstance(exc, IntegrityError | OverflowError):
        return True
    if isinstance(exc, DBAPIError) and not exc.connection_invalidated:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23")
    return False


async def _isolate(
    connection: AsyncConnection, statement: Insert, rows: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], str]]:
    """Execute ``rows`` under savepoints, halving the batch around refused rows; returns
    the refused rows with the reason. Everything else is written (not yet committed)."""
    if not rows:
        return []
    try:
        async with connection.begin_nested():
            await connection.execute(statement, rows)
        return []
    except Exception as exc:
        if not refused_row(exc):
            raise
        if len(rows) == 1:
            return [(rows[0], _reason(exc))]
    middle = len(rows) // 2
    return [
        *await _isolate(connection, statement, rows[:middle]),
        *await _isolate(connection, statement, rows[middle:]),
    ]


def _reason(exc: BaseException) -> str:
    # The driver's message without SQLAlchemy's statement and parameters.
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    message = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {message}"[:300]


def _quarantine_params(table: str, row: dict[str, Any], reason: str, now: int
                       ) -> dict[str, Any]:
    # ASCII JSON: a NUL the database refused in a text column is stored escaped.
    return {"quarantined_at": now, "table_name": table, "reason": reason,
            "row": json.dumps(row, ensure_ascii=True, sort_keys=True, default=str)}


def merge_components(rows: Iterable[ComponentRow]) -> list[ComponentRow]:
    """Fold rows with the same key the way the upsert would, sorted by key.

    One statement may not touch a row twice on Postgres, and sorted keys make concurrent
    writers take row locks in the same order (no deadlock).
    """
    merged: dict[tuple[str, str, int, str], ComponentRow] = {}
    for row in rows:
        old = merged.get(row.key)
        merged[row.key] = row if old is None else _merge(old, row)
    return [merged[key] for key in sorted(merged)]


def _merge(old: ComponentRow, new: ComponentRow) -> ComponentRow:
    # Mirrors the upsert below: its WHERE decides whether anything changes, its SET how.
    advances = new.admitted > old.admitted or new.denied > old.denied
    same_later = (
        new.admitted == old.admitted
        and new.denied == old.denied
        and new.updated_at > old.updated_at
    )
    if not (advances or same_later):
        return old
    if new.admitted >= old.admitted and new.denied >= old.denied:
        return new
    return replace(
        old, admitted=max(old.admitted, new.admitted), denied=max(old.denied, new.denied)
    )


def sum_increments(increments: Iterable[BucketIncrement]) -> list[BucketIncrement]:
    """Add up increments with the same bucket, drop zero ones, sort by key."""
    sums: dict[tuple[str, str, str, int], tuple[int, int]] = {}
    for inc in increments:
        if inc.admitted < 0 or inc.denied < 0:
            raise ValueError(f"negative usage increment for bucket {inc.key}")
        admitted, denied = sums.get(inc.key, (0, 0))
        sums[inc.key] = (admitted + inc.admitted, denied + inc.denied)
    return [
        BucketIncrement(*key, admitted=admitted, denied=denied)
        for key, (admitted, denied) in sorted(sums.items())
        if admitted or denied
    ]


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _greatest(dialect: str, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    # SQLite's two-argument max() is the scalar maximum, not the aggregate.
    return func.greatest(a, b) if dialect == "postgresql" else func.max(a, b)


def _unnest_insert(table: Table, names: Sequence[str]) -> Insert:
    """INSERT ... SELECT unnest(:name) for each column: one parameter set of arrays for
    the whole batch, so a batch is one statement, its rows encoded by the driver in C
    (an executemany costs SQLAlchemy and asyncpg a parameter set per row)."""
    arrays = [func.unnest(bindparam(name, type_=ARRAY(table.c[name].type))) for name in names]
    return postgresql.insert(table).from_select(list(names), select(*arrays))


def _as_arrays(names: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """Rows of values (in ``names`` order) as one array per column."""
    return dict(zip(names, map(list, zip(*rows, strict=True)), strict=True))


def _component_upsert(dialect: str, *, arrays: bool = False) -> Insert:
    stmt: Any = (_unnest_insert(components, _COMPONENT_FIELDS) if arrays
                 else _insert(dialect)(components))
    old, new = components.c, stmt.excluded
    newer = and_(new.admitted >= old.admitted, new.denied >= old.denied)
    set_: dict[str, Any] = {
        "admitted": _greatest(dialect, old.admitted, new.admitted),
        "denied": _greatest(dialect, old.denied, new.denied),
    }
    for name in _COMPONENT_LATEST:
        set_[name] = case((newer, new[name]), else_=old[name])
    # Skip the update (and on Postgres a dead row version) for duplicates and stale rows:
    # only a higher count, or the same counts reported later, changes anything.
    changes = or_(
        new.admitted > old.admitted,
        new.denied > old.denied,
        and_(
            new.admitted == old.admitted,
            new.denied == old.denied,
            new.updated_at > old.updated_at,
        ),
    )
    upsert: Insert = stmt.on_conflict_do_update(
        index_elements=list(_COMPONENT_KEY), set_=set_, where=changes
    )
    return upsert


def _bucket_upsert(dialect: str, *, arrays: bool = False) -> Insert:
    stmt: Any = (_unnest_insert(usage_hourly, _BUCKET_FIELDS) if arrays
                 else _insert(dialect)(usage_hourly))
    old, new = usage_hourly.c, stmt.excluded
    upsert: Insert = stmt.on_conflict_do_update(
        index_elements=list(_BUCKET_KEY),
        set_={"admitted": old.admitted + new.admitted, "denied": old.denied + new.denied},
    )
    return upsert


def bucket_upsert(dialect: str) -> Insert:
    """The statement adding increments to usage_hourly (executemany over BucketIncrement
    fields), for writers that run their own transaction (the consistent authority)."""
    return _bucket_upsert(dialect)
