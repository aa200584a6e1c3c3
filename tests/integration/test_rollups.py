"""Rollups and retention (central/billing/rollups.py) against SQLite and Postgres (``ledger_url``).

Usage is written the way ingest writes it (``LedgerStore.write``), kept in a Python model
alongside, and every query is compared with the model: before any rollup, after folding,
after pruning hourly and daily rows, and after late increments for pruned periods. The
clock is injected (``run_once(now)``); nothing here depends on the wall clock.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from central.billing import rollups
from central.billing.rollups import KeyRange, RollupJob
from central.billing.usage_query import (
    DAY_MS,
    HOUR_MS,
    UsageQuery,
    UsageRow,
    parse_time,
    period_label,
    period_start,
)
from central.billing.usage_store import UsageStore, pending
from central.database import make_engine
from central.ledger import BucketIncrement, LedgerStore
from central.migrate import run_migrations
from central.models import usage_daily, usage_hourly, usage_monthly, usage_retention
from sync.errors import InvalidField

Model = dict[tuple[str, str, str, int], list[int]]
KEYS = ["0" * 31 + str(i) for i in range(4)]
REGIONS = ["ap", "eu", "us"]


def ms(text: str) -> int:
    return parse_time(text, "t")


NOW = ms("2026-11-23T11:40:00Z")
DATA_FROM = ms("2025-06-01")


@pytest.fixture
async def engine(ledger_url: str) -> AsyncIterator[AsyncEngine]:
    await run_migrations(ledger_url)
    engine = make_engine(ledger_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def job(engine: AsyncEngine) -> RollupJob:
    return RollupJob(engine, hourly_retention_ms=35 * DAY_MS, daily_retention_ms=400 * DAY_MS)


async def add(engine: AsyncEngine, model: Model, increments: list[BucketIncrement]) -> None:
    await LedgerStore(engine).write([], increments)
    for inc in increments:
        counts = model.setdefault(inc.key, [0, 0])
        counts[0] += inc.admitted
        counts[1] += inc.denied


def traffic(rng: random.Random, count: int, start: int, end: int) -> list[BucketIncrement]:
    hours = (end - start) // HOUR_MS
    return [BucketIncrement(rng.choice(["api", "web"]), rng.choice(KEYS), rng.choice(REGIONS),
                            start + rng.randrange(hours) * HOUR_MS, rng.randint(1, 50),
                            rng.choice([0, 0, 1, 7]))
            for _ in range(count)]


def expected(model: Model, query: UsageQuery) -> list[UsageRow]:
    sums: dict[tuple[str, str | None, int | None], list[int]] = defaultdict(lambda: [0, 0])
    for (namespace, key, region, hour), (admitted, denied) in model.items():
        if namespace != query.namespace or not query.start <= hour < query.end:
            continue
        if query.key_hash is not None and key != query.key_hash:
            continue
        period = period_start(hour, query.period) if query.period else None
        counts = sums[(key, region if query.by_region else None, period)]
        counts[0] += admitted
        counts[1] += denied
    return [UsageRow(key, region, period_label(p, query.period) if query.period and p is not None
                     else None, a, d)
            for (key, region, p), (a, d) in sorted(sums.items(), key=lambda kv: (
                kv[0][0], kv[0][1] or "", kv[0][2] or 0))
            if a or d]


QUERIES = [
    UsageQuery("api", None, DATA_FROM, ms("2026-12-01"), True, "month"),
    UsageQuery("api", KEYS[1], DATA_FROM, ms("2026-12-01"), False, None),
    UsageQuery("web", None, ms("2025-01-01"), ms("2027-01-01"), True, None),
    UsageQuery("api", None, ms("2026-11-01"), ms("2026-12-01"), True, "day"),
    UsageQuery("api", KEYS[2], ms("2026-10-15T05:00:00Z"), ms("2026-11-20T13:00:00Z"), True,
               "month"),
    UsageQuery("web", None, ms("2026-02-03"), ms("2026-03-10"), False, "day"),
    UsageQuery("web", None, DATA_FROM, ms("2026-12-01"), False, "day"),
    UsageQuery("api", KEYS[0], ms("2026-11-22T22:00:00Z"), ms("2026-11-23T02:00:00Z"), True,
               "day"),
]


async def check_all(engine: AsyncEngine, model: Model) -> set[int]:
    """Compare every answerable query with the model; the indexes of the refused ones."""
    store, refused = UsageStore(engine), set()
    for index, query in enumerate(QUERIES):
        try:
            rows = await store.query(query)
        except InvalidField as exc:
            assert exc.field in ("from", "to")
            refused.add(index)
            continue
        assert rows == expected(model, query), f"query {index}: {query}"
    return refused


async def count(engine: AsyncEngine, table: object, *where: object) -> int:
    async with engine.connect() as connection:
        query = select(func.count()).select_from(table)  # type: ignore[arg-type]
        return int((await connection.execute(query.where(*where))).scalar_one())  # type: ignore[arg-type]


async def marks(engine: AsyncEngine) -> tuple[int, int, int]:
    async with engine.connect() as connection:
        row = (await connection.execute(select(
            usage_retention.c.hourly_from, usage_retention.c.daily_from,
            usage_retention.c.rollup_at))).one()
        return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.parametrize("batch_rows", [50_000, 20], ids=["whole-periods", "small-chunks"])
async def test_totals_never_change_across_rollups_and_prunes(
        engine: AsyncEngine, batch_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks: months (and busy days) are folded in several transactions.
    monkeypatch.setattr(rollups, "FOLD_BATCH_ROWS", batch_rows)
    rng, model = random.Random(1), {}
    await add(engine, model, traffic(rng, 1500, DATA_FROM, NOW - NOW % HOUR_MS + HOUR_MS))
    assert await check_all(engine, model) == set()
    hourly_rows = await count(engine, usage_hourly)

    report = await job(engine).run_once(NOW)
    # Complete days folded (up to yesterday), complete months folded (up to October).
    assert report.days_folded > 300 and report.months_folded == 17  # 2025-06..2026-10
    assert await marks(engine) == (ms("2026-10-19"), ms("2025-10-01"), NOW)
    assert await count(engine, usage_hourly) < hourly_rows
    assert await count(engine, usage_hourly, usage_hourly.c.hour_start < ms("2026-10-19")) == 0
    assert await count(engine, usage_daily, usage_daily.c.day_start < ms("2025-10-01")) == 0
    # Only today's hours are still pending; days of November await the month's end.
    assert await count(engine, usage_hourly, pending(usage_hourly),
                       usage_hourly.c.hour_start < ms("2026-11-23")) == 0
    assert await count(engine, usage_daily, pending(usage_daily),
                       usage_daily.c.day_start < ms("2026-11-01")) == 0
    # Hour detail before 2026-10-19 and day detail before 2025-10 are gone: the two
    # queries needing them are refused now, naming the bound; all others still agree.
    assert await check_all(engine, model) == {4, 6}

    # Idempotent: the same run again changes nothing.
    tables = [await count(engine, t) for t in (usage_hourly, usage_daily, usage_monthly)]
    again = await job(engine).run_once(NOW)
    assert not again.changed
    assert [await count(engine, t) for t in (usage_hourly, usage_daily, usage_monthly)] == tables

    # Much later: November rolls into a month, daily rows go after 400 days.
    later = NOW + 500 * DAY_MS
    await job(engine).run_once(later)
    assert await count(engine, usage_hourly) == 0
    assert await count(engine, usage_daily) == 0
    assert await check_all(engine, model) == {3, 4, 5, 6, 7}
    assert await count(engine, usage_monthly) > 0


async def test_late_increments_for_rolled_and_pruned_periods_still_count(
        engine: AsyncEngine) -> None:
    rng, model = random.Random(7), {}
    await add(engine, model, traffic(rng, 600, DATA_FROM, ms("2026-11-23")))
    await job(engine).run_once(NOW)
    hourly_from, daily_from, _ = await marks(engine)

    late = [
        BucketIncrement("api", KEYS[0], "eu", ms("2026-11-10T07:00:00Z"), 5, 1),  # rolled day
        BucketIncrement("api", KEYS[0], "eu", ms("2026-01-15T03:00:00Z"), 11, 0),  # hours pruned
        BucketIncrement("web", KEYS[3], "ap", ms("2025-07-04T12:00:00Z"), 13, 2),  # days pruned
        BucketIncrement("api", KEYS[1], "us", ms("2026-10-31T23:00:00Z"), 17, 0),  # month rolled
    ]
    await add(engine, model, late)
    # Counted at once, before any rollup: they are pending in hourly rows.
    assert await check_all(engine, model) == {4, 6}
    assert await count(engine, usage_hourly, usage_hourly.c.hour_start < hourly_from) == 2

    report = await job(engine).run_once(NOW + HOUR_MS)
    assert report.days_folded == 4 and report.months_folded == 3
    assert await check_all(engine, model) == {4, 6}
    # Rows older than the retentions were folded and deleted in the same transaction.
    assert await count(engine, usage_hourly, usage_hourly.c.hour_start < hourly_from) == 0
    assert await count(engine, usage_daily, usage_daily.c.day_start < daily_from) == 0
    assert await count(engine, usage_hourly, pending(usage_hourly),
                       usage_hourly.c.hour_start < ms("2026-11-23")) == 0
    assert await marks(engine) == (hourly_from, daily_from, NOW + HOUR_MS)


async def test_a_run_only_folds_complete_periods(engine: AsyncEngine) -> None:
    model: Model = {}
    today = ms("2026-11-23T00:00:00Z")
    await add(engine, model, [
        BucketIncrement("api", KEYS[0], "eu", ms("2026-11-22T23:00:00Z"), 3, 0),
        BucketIncrement("api", KEYS[0], "eu", today, 4, 0),
    ])
    # 00:30: yesterday ended less than the lag ago; nothing is folded yet.
    report = await job(engine).run_once(today + 30 * 60_000)
    assert (report.days_folded, report.months_folded) == (0, 0)
    report = await job(engine).run_once(today + HOUR_MS)
    assert (report.days_folded, report.months_folded) == (1, 0)
    assert await count(engine, usage_daily) == 1
    assert await check_all(engine, model) == {4, 6}  # the marks moved: see above


async def test_rollups_racing_with_ingest_lose_nothing(postgres_url: str) -> None:
    """Ingest keeps adding to hours of days being folded (late arrivals) while rollups run
    on another engine: REPEATABLE READ makes a conflicting fold start over, never drop or
    double an increment."""
    await run_migrations(postgres_url)
    ingest_engine, rollup_engine = make_engine(postgres_url), make_engine(postgres_url)
    rng, model = random.Random(3), {}
    try:
        await add(ingest_engine, model, traffic(rng, 400, ms("2026-10-01"), ms("2026-11-23")))
        done = asyncio.Event()

        async def ingest() -> None:
            for _ in range(60):
                batch = traffic(rng, 40, ms("2026-11-15"), ms("2026-11-23"))
                while True:  # a failed commit is retried, as LeaderIngest does
                    try:
                        await add(ingest_engine, model, batch)
                        break
                    except Exception:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0)
            done.set()

        async def rollups() -> int:
            runs = 0
            while not done.is_set():
                await job(rollup_engine).run_once(NOW)
                runs += 1
            return runs

        _, runs = await asyncio.gather(ingest(), rollups())
        assert runs >= 1
        await job(rollup_engine).run_once(NOW)
        assert await check_all(rollup_engine, model) == {4, 6}
        assert await count(rollup_engine, usage_hourly, pending(usage_hourly)) == 0
    finally:
        await ingest_engine.dispose()
        await rollup_engine.dispose()


async def test_a_busy_hour_is_folded_in_slices_of_the_key_space(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollups, "FOLD_BATCH_ROWS", 3)
    rng, model = random.Random(5), {}
    hour = ms("2026-11-20T10:00:00Z")
    keys = [f"{rng.getrandbits(128):032x}" for _ in range(60)] + ["k1", "ZZ", "0", "f" * 40]
    await add(engine, model, [BucketIncrement("api", key, region, hour, 2, 1)
                              for key in keys for region in ("eu", "us")])
    report = await job(engine).run_once(NOW)
    assert report.days_folded == 1
    assert await count(engine, usage_hourly, pending(usage_hourly)) == 0
    assert await count(engine, usage_daily) == len(keys) * 2
    assert await check_all(engine, model) == {4, 6}


@given(st.text(max_size=6), st.integers(1, 3))
@settings(max_examples=300, deadline=None)
def test_key_ranges_partition_every_string(key: str, depth: int) -> None:
    ranges = [KeyRange()]
    for _ in range(depth):
        ranges = [part for r in ranges for part in r.split()]
    holding = [r for r in ranges if (r.low is None or key >= r.low)
               and (r.high is None or key < r.high)]
    assert len(holding) == 1
