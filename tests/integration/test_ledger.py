"""The ledger tables against real databases: SQLite and Postgres (``ledger_url``)."""

from __future__ import annotations

import importlib
import itertools
import json
import pkgutil
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

import central
from central.database import make_engine, normalize_url
from central.ledger import BucketIncrement, ComponentRow, LedgerStore, refused_row
from central.migrate import alembic_config, run_migrations
from central.models import Base, components, usage_hourly, usage_quarantine

HOUR = 3_600_000
MINUTE = 60_000
T0 = 1_795_400_000_000 - 1_795_400_000_000 % HOUR


def component(
    *,
    namespace: str = "api",
    key_hash: str = "k1",
    window_start: int = T0,
    node_id: str = "eu-a-1",
    admitted: int = 1,
    denied: int = 0,
    limit: int = 100,
    updated_at: int = T0 + 1,
    **other: object,
) -> ComponentRow:
    row = ComponentRow(
        namespace=namespace,
        key_hash=key_hash,
        window_start=window_start,
        node_id=node_id,
        region="eu",
        window_end=window_start + MINUTE,
        admitted=admitted,
        denied=denied,
        limit=limit,
        duration="1m",
        algorithm="sliding_window",
        burst=None,
        updated_at=updated_at,
    )
    return replace(row, **other)  # type: ignore[arg-type]


def bucket(
    *,
    namespace: str = "api",
    key_hash: str = "k1",
    region: str = "eu",
    hour_start: int = T0,
    admitted: int = 1,
    denied: int = 0,
) -> BucketIncrement:
    return BucketIncrement(namespace, key_hash, region, hour_start, admitted, denied)


@pytest.fixture
async def engine(ledger_url: str) -> AsyncIterator[AsyncEngine]:
    await run_migrations(ledger_url)
    engine = make_engine(ledger_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> LedgerStore:
    return LedgerStore(engine)


async def stored(store: LedgerStore) -> dict[tuple[str, str, int, str], ComponentRow]:
    return {row.key: row for row in await store.load_components(window_end_after=0)}


async def count(engine: AsyncEngine, table: str) -> int:
    target = {"components": components, "usage_hourly": usage_hourly}[table]
    async with engine.connect() as connection:
        return int(
            (await connection.execute(select(func.count()).select_from(target))).scalar_one()
        )


# --- URLs and engines -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@db:5432/rl", "postgresql+asyncpg://u:p@db:5432/rl"),
        ("postgres://u@db/rl", "postgresql+asyncpg://u@db/rl"),
        ("postgresql+asyncpg://u@db/rl", "postgresql+asyncpg://u@db/rl"),
        ("postgres://u@db/rl?sslmode=require", "postgresql+asyncpg://u@db/rl?ssl=require"),
        ("sqlite:///var/rl.sqlite", "sqlite+aiosqlite:///var/rl.sqlite"),
        ("sqlite:////abs/rl.sqlite", "sqlite+aiosqlite:////abs/rl.sqlite"),
        ("sqlite+aiosqlite:///rl.sqlite", "sqlite+aiosqlite:///rl.sqlite"),
    ],
)
def test_urls_normalize_to_async_drivers(url: str, expected: str) -> None:
    assert normalize_url(url).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize("url", ["mysql://u@db/rl", "postgresql+psycopg2://u@db/rl"])
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        normalize_url(url)


async def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url.replace("sqlite+aiosqlite", "sqlite"))
    try:
        async with engine.connect() as connection:
            mode = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
            timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
        assert (mode, timeout) == ("wal", 5000)
    finally:
        await engine.dispose()


# --- migrations -------------------------------------------------------------------------


async def test_migrations_apply_twice_and_match_the_models(ledger_url: str) -> None:
    await run_migrations(ledger_url)
    await run_migrations(ledger_url)  # already at head: a no-op, not an error
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None

    engine = make_engine(ledger_url)
    try:
        async with engine.connect() as connection:
            version = await connection.execute(text("SELECT version_num FROM alembic_version"))
            assert version.scalars().all() == [head]
            state = await connection.execute(text("SELECT id, version FROM config_state"))
            assert [tuple(row) for row in state] == [(1, 0)]

            # Models may live outside central.models (on its Base): import every module.
            for module in pkgutil.iter_modules(central.__path__):
                importlib.import_module(f"central.{module.name}")

            def diff(sync_connection: Connection) -> list[object]:
                context = MigrationContext.configure(sync_connection)
                return list(compare_metadata(context, Base.metadata))

            # The hand-written migration and the models describe the same schema.
            assert await connection.run_sync(diff) == []
    finally:
        await engine.dispose()


# --- components: merge by maximum -------------------------------------------------------


async def test_higher_counts_replace_lower_ones_never_the_reverse(store: LedgerStore) -> None:
    await store.write([component(admitted=10, denied=2, limit=100, updated_at=T0 + 10)], [])
    # A stale batch (lower counts, other policy) arrives late: nothing changes.
    await store.write([component(admitted=5, denied=1, limit=50, updated_at=T0 + 5)], [])
    row = (await stored(store))[component().key]
    assert (row.admitted, row.denied, row.limit, row.updated_at) == (10, 2, 100, T0 + 10)

    # A newer batch: counts and policy move forward together.
    await store.write([component(admitted=12, denied=2, limit=200, updated_at=T0 + 12)], [])
    row = (await stored(store))[component().key]
    assert (row.admitted, row.denied, row.limit, row.updated_at) == (12, 2, 200, T0 + 12)


async def test_a_duplicate_changes_nothing(store: LedgerStore) -> None:
    first = component(admitted=7, denied=3, burst=20)
    await store.write([first], [])
    await store.write([first], [])
    await store.write([first, first], [])
    assert await stored(store) == {first.key: first}


async def test_counts_merge_independently_and_policy_needs_both_ahead(
    store: LedgerStore,
) -> None:
    await store.write([component(admitted=10, denied=1, limit=100)], [])
    await store.write([component(admitted=8, denied=4, limit=999, updated_at=T0 + 99)], [])
    row = (await stored(store))[component().key]
    assert (row.admitted, row.denied) == (10, 4)
    assert (row.limit, row.updated_at) == (100, T0 + 1)


async def test_same_counts_reported_later_refresh_the_policy(store: LedgerStore) -> None:
    await store.write([component(admitted=3, limit=100, updated_at=T0 + 1)], [])
    await store.write([component(admitted=3, limit=300, updated_at=T0 + 2)], [])
    row = (await stored(store))[component().key]
    assert (row.admitted, row.limit, row.updated_at) == (3, 300, T0 + 2)


async def test_any_arrival_order_ends_at_the_newest_report(store: LedgerStore) -> None:
    """A node's reports only grow, so in whatever order and batching they arrive, the
    component ends up equal to the newest one."""
    reports = [
        component(admitted=1, denied=0, limit=10, updated_at=T0 + 1),
        component(admitted=4, denied=0, limit=10, updated_at=T0 + 2),
        component(admitted=4, denied=2, limit=20, updated_at=T0 + 3),
        component(admitted=9, denied=5, limit=30, updated_at=T0 + 4),
    ]
    expected = {}
    for number, order in enumerate(itertools.permutations(reports)):
        one_by_one = [replace(r, key_hash=f"seq{number}") for r in order]
        in_one_batch = [replace(r, key_hash=f"batch{number}") for r in order]
        for report in one_by_one:
            await store.write([report], [])
        await store.write(in_one_batch, [])
        for key_hash in (f"seq{number}", f"batch{number}"):
            newest = replace(reports[-1], key_hash=key_hash)
            expected[newest.key] = newest
    assert await stored(store) == expected


async def test_components_of_other_nodes_and_windows_are_separate(store: LedgerStore) -> None:
    rows = [
        component(node_id="eu-a-1", admitted=1),
        component(node_id="us-b-1", admitted=2, region="us"),
        component(window_start=T0 + MINUTE, admitted=3),
        component(key_hash="k2", admitted=4),
        component(namespace="login", admitted=5),
    ]
    await store.write(rows, [])
    assert await stored(store) == {row.key: row for row in rows}


# --- usage buckets: increments add ------------------------------------------------------


async def test_increments_add_up(store: LedgerStore) -> None:
    await store.write([], [bucket(admitted=3, denied=1)])
    await store.write([], [bucket(admitted=2), bucket(admitted=1, denied=4)])
    await store.write([], [bucket(region="us", admitted=7)])
    await store.write([], [bucket(hour_start=T0 + HOUR, admitted=5)])
    await store.write([], [bucket(key_hash="k2", admitted=6)])

    assert await store.usage_totals("api") == {
        ("k1", "eu"): (11, 5),
        ("k1", "us"): (7, 0),
        ("k2", "eu"): (6, 0),
    }
    assert await store.usage_totals("api", "k1") == {("k1", "eu"): (11, 5), ("k1", "us"): (7, 0)}
    assert await store.usage_totals("api", "k1", hour_from=T0 + HOUR) == {("k1", "eu"): (5, 0)}
    assert await store.usage_totals("api", "k1", hour_to=T0 + HOUR) == {
        ("k1", "eu"): (6, 5),
        ("k1", "us"): (7, 0),
    }
    assert await store.usage_totals("other") == {}


async def test_zero_increments_write_no_rows(store: LedgerStore, engine: AsyncEngine) -> None:
    await store.write([], [bucket(admitted=0, denied=0)])
    assert await count(engine, "usage_hourly") == 0


async def test_negative_increments_are_refused(store: LedgerStore, engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="negative"):
        await store.write([component()], [bucket(admitted=-1)])
    assert await count(engine, "components") == 0


# --- refused rows (issue 10: one row the database refuses once blocked all billing) ----------


async def quarantined(engine: AsyncEngine) -> list[tuple[str, str, dict[str, object]]]:
    async with engine.connect() as connection:
        result = await connection.execute(
            select(usage_quarantine.c.table_name, usage_quarantine.c.reason,
                   usage_quarantine.c.row).order_by(usage_quarantine.c.id))
        return [(table, reason, json.loads(row)) for table, reason, row in result]


def refused_components(dialect: str) -> list[tuple[ComponentRow, str]]:
    cases = [(component(key_hash="zz", algorithm=None), "algorithm"),
             (component(key_hash="big", admitted=2**63), "")]
    if dialect == "postgresql":  # SQLite stores a NUL in text
        cases.append((component(namespace="a\x00b", key_hash="nul"), "0x00"))
    return cases


async def test_a_refused_component_is_quarantined_and_the_rest_commits(
    store: LedgerStore, engine: AsyncEngine
) -> None:
    good = [component(key_hash=f"k{i}", admitted=i + 1) for i in range(50)]
    refused = refused_components(engine.dialect.name)
    assert await store.write([*good, *(row for row, _ in refused)], [bucket(admitted=9)],
                             now=T0 + 5) == len(refused)
    assert await count(engine, "components") == 50
    assert await store.usage_totals("api") == {("k1", "eu"): (9, 0)}
    found = await quarantined(engine)
    assert sorted(row["key_hash"] for _, _, row in found) == sorted(
        row.key_hash for row, _ in refused)
    for (row, words), (table, reason, data) in zip(
            sorted(refused, key=lambda case: case[0].key_hash),
            sorted(found, key=lambda entry: str(entry[2]["key_hash"])), strict=True):
        assert table == "components" and words in reason
        assert data["namespace"] == row.namespace and data["admitted"] == row.admitted

    # Nothing is left pending: the next write is an ordinary one.
    assert await store.write(good, [bucket(admitted=1)]) == 0
    assert await store.usage_totals("api") == {("k1", "eu"): (10, 0)}


async def test_a_refused_increment_is_quarantined_and_the_rest_commits(
    store: LedgerStore, engine: AsyncEngine
) -> None:
    bad = BucketIncrement("zzz", "k1", None, T0, 1, 0)  # type: ignore[arg-type]
    assert await store.write([component(admitted=5)], [bucket(admitted=1), bad]) == 1
    assert await count(engine, "components") == 1
    assert await store.usage_totals("api") == {("k1", "eu"): (1, 0)}
    [(table, reason, data)] = await quarantined(engine)
    assert table == "usage_hourly" and data["namespace"] == "zzz" and "region" in reason


async def test_a_lost_connection_is_not_a_refused_row(store: LedgerStore) -> None:
    assert not refused_row(OSError("connection reset"))
    assert refused_row(IntegrityError("stmt", {}, Exception("not null")))


# --- load and prune ---------------------------------------------------------------------


async def test_load_returns_full_rows_of_windows_ending_after(store: LedgerStore) -> None:
    old = component(window_start=T0, admitted=1)
    current = component(window_start=T0 + MINUTE, admitted=2, burst=50, algorithm="token_bucket")
    await store.write([old, current], [])

    assert await store.load_components(window_end_after=old.window_end) == [current]
    assert await store.load_components(window_end_after=current.window_end) == []
    assert sorted(await store.load_components(window_end_after=0), key=lambda r: r.key) == [
        old,
        current,
    ]


async def test_prune_deletes_windows_ended_before(store: LedgerStore) -> None:
    rows = [component(window_start=T0 + i * MINUTE, admitted=i + 1) for i in range(5)]
    await store.write(rows, [bucket(admitted=3)])

    cutoff = rows[2].window_end  # rows 0 and 1 ended before it; row 2 ends exactly at it
    assert await store.prune_components(window_end_before=cutoff) == 2
    assert sorted(await stored(store)) == sorted(row.key for row in rows[2:])
    assert await store.prune_components(window_end_before=cutoff) == 0
    # Billing buckets are not limit windows: pruning never touches them.
    assert await store.usage_totals("api") == {("k1", "eu"): (3, 0)}


async def test_large_batches_round_trip(store: LedgerStore) -> None:
    rows = [component(key_hash=f"key{i:05d}", admitted=i % 97 + 1) for i in range(10_000)]
    increments = [bucket(key_hash=f"key{i:05d}", admitted=i % 97 + 1) for i in range(10_000)]
    await store.write(rows, increments)
    await store.write(rows, [])  # a full redelivery: no change

    assert await stored(store) == {row.key: row for row in rows}
    totals = await store.usage_totals("api")
    assert len(totals) == 10_000
    assert sum(admitted for admitted, _ in totals.values()) == sum(r.admitted for r in rows)


async def test_streamed_components_are_the_loaded_ones_in_chunks(store: LedgerStore) -> None:
    rows = [component(key_hash=f"k{i:03d}", admitted=i + 1) for i in range(25)]
    await store.write(rows, [])
    chunks = [chunk async for chunk in store.stream_components(window_end_after=0, chunk=10)]
    assert [len(chunk) for chunk in chunks] == [10, 10, 5]
    assert sorted(r.key for chunk in chunks for r in chunk) == sorted(r.key for r in rows)
    assert [chunk async for chunk in store.stream_components(
        window_end_after=rows[0].window_end)] == []
