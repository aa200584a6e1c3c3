"""The authority's transactions against real Postgres and SQLite: exact under concurrency,
the same decisions on both, usage buckets written, and a broken connection replaced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from central.consistent.tx import (
    DecisionTransactions,
    PostgresDecisions,
    SqlDecisions,
    decisions_for,
)
from central.database import make_engine
from central.ledger import LedgerStore
from central.migrate import run_migrations
from central.models import components
from sync.messages import ConsistentDecision, ConsistentRequest
from sync.policy import Policy, build_policy

HOUR = 3_600_000
T0 = 1_795_400_000_000 - 1_795_400_000_000 % HOUR + 10 * 60_000  # 10 minutes into an hour


def policy(limit: int, algorithm: str = "fixed_window", duration: str = "1h") -> Policy:
    return build_policy(limit=limit, duration=duration, algorithm=algorithm,
                        mode="consistent")


def request(key: str, p: Policy, *, cost: int = 1, region: str = "us",
            namespace: str = "ns") -> ConsistentRequest:
    return ConsistentRequest(namespace, key, cost, p, "node-1", region)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def engine(ledger_url: str) -> AsyncIterator[AsyncEngine]:
    await run_migrations(ledger_url)
    engine = make_engine(ledger_url, pool_size=12)
    try:
        yield engine
    finally:
        await engine.dispose()


async def stored(engine: AsyncEngine, sql: str) -> list[tuple[object, ...]]:
    async with engine.connect() as connection:
        return [tuple(row) for row in (await connection.execute(text(sql))).all()]


def test_postgres_gets_the_asyncpg_transaction_and_sqlite_the_generic_one(
        engine: AsyncEngine) -> None:
    kind = PostgresDecisions if engine.dialect.name == "postgresql" else SqlDecisions
    assert isinstance(decisions_for(engine, Clock()), kind)


async def test_lanes_racing_on_one_new_key_admit_exactly_the_limit(engine: AsyncEngine) -> None:
    # Eight lanes (each its own connection, as lanes and replicas are) decide batches for
    # one hot key, which none of them has seen: the first inserts race too.
    clock, limit = Clock(), 100
    lanes = [decisions_for(engine, clock) for _ in range(8)]
    hot = policy(limit)

    async def lane(transactions: DecisionTransactions, index: int) -> list[ConsistentDecision]:
        out: list[ConsistentDecision] = []
        for round_ in range(10):
            # Batches mix the hot key with keys of this lane only, cost 1 or 2.
            batch = [request("hot", hot, cost=1 + (round_ + i) % 2) for i in range(3)]
            batch.append(request(f"own-{index}", policy(5)))
            out.extend(await transactions.decide(batch))
        return out

    try:
        results = await asyncio.gather(*(lane(t, i) for i, t in enumerate(lanes)))
    finally:
        for transactions in lanes:
            await transactions.close()

    hot_costs = [(1 + (round_ + i) % 2) for round_ in range(10) for i in range(3)]
    admitted = sum(cost for decisions in results
                   for cost, d in zip(hot_costs, [d for j, d in enumerate(decisions)
                                                  if j % 4 != 3], strict=True)
                   if d.allowed)
    offered = sum(hot_costs) * len(lanes)
    # Costs of 1 and 2 against 100: the count can stop at 99 only if every later request
    # costs 2; with 1s still coming it reaches exactly 100.
    assert admitted == limit
    own = [d.allowed for decisions in results for j, d in enumerate(decisions) if j % 4 == 3]
    assert own.count(True) == 5 * len(lanes)  # 10 tries each against a limit of 5
    rows = await stored(engine, "SELECT key_hash, cur, cur_denied FROM consistent_keys "
                                "WHERE key_hash = 'hot'")
    assert rows == [("hot", limit, offered - limit)]
    usage = await stored(engine, "SELECT SUM(admitted), SUM(denied) FROM usage_hourly "
                                 "WHERE key_hash = 'hot'")
    assert usage == [(limit, offered - limit)]


async def test_decisions_match_the_node_algorithms_across_a_window_roll(
        engine: AsyncEngine) -> None:
    clock = Clock()
    transactions = decisions_for(engine, clock)
    sliding = policy(4, "sliding_window")
    bucket = policy(3, "token_bucket", "1m")
    try:
        first = await transactions.decide(
            [request("s", sliding) for _ in range(5)] + [request("b", bucket, cost=2)] * 2)
        clock.now = T0 - T0 % HOUR + HOUR + 15 * 60_000  # a quarter into the next hour
        second = await transactions.decide([request("s", sliding)] * 2 + [request("b", bucket)])
    finally:
        await transactions.close()
    assert [d.allowed for d in first] == [True] * 4 + [False, True, False]
    # Token bucket: 3 tokens, 2 taken, 1 left; 2 more need one token at 3/min: 20 s.
    assert first[6].retry_after_ms == 20_000
    # Sliding: the previous hour's 4 weigh 3 at a quarter in, so one more fits, not two.
    assert [d.allowed for d in second] == [True, False, True]
    assert second[0].remaining == 0
    rows = await stored(engine, "SELECT key_hash, cur, prev FROM consistent_keys "
                                "ORDER BY key_hash")
    assert rows == [("b", 1, 0), ("s", 1, 4)]  # the bucket's 1m window moved on
    usage = await stored(engine, "SELECT key_hash, hour_start, admitted, denied "
                                 "FROM usage_hourly ORDER BY key_hash, hour_start")
    next_hour = T0 - T0 % HOUR + HOUR
    assert usage == [("b", T0 - T0 % HOUR, 2, 2), ("b", next_hour, 1, 0),
                     ("s", T0 - T0 % HOUR, 4, 1), ("s", next_hour, 1, 1)]


async def test_cost_zero_asks_without_writing_usage(engine: AsyncEngine) -> None:
    transactions = decisions_for(engine, Clock())
    try:
        [probe] = await transactions.decide([request("k", policy(2), cost=0)])
    finally:
        await transactions.close()
    assert probe.allowed and probe.remaining == 2
    assert await stored(engine, "SELECT COUNT(*) FROM usage_hourly") == [(0,)]


async def test_a_broken_connection_fails_one_batch_and_the_next_reconnects(
        postgres_url: str) -> None:
    await run_migrations(postgres_url)
    engine = make_engine(postgres_url)
    transactions = decisions_for(engine, Clock())
    try:
        await transactions.decide([request("k", policy(10))])
        async with engine.connect() as connection:
            # Kill the lane's backend, as a Postgres restart or a network cut would.
            await connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        with pytest.raises(Exception):  # noqa: B017 - whatever asyncpg raises for it
            await transactions.decide([request("k", policy(10))])
        [after] = await transactions.decide([request("k", policy(10))])
    finally:
        await transactions.close()
        await engine.dispose()
    # The failed batch wrote nothing: 1 before, 1 after.
    assert after.allowed and after.remaining == 8


async def test_idle_keys_are_pruned_and_decide_as_before(engine: AsyncEngine) -> None:
    # Each key used at T0, then asked about well after the retention: a key is deleted
    # only when its row can no longer change a decision, so a fresh row decides the same.
    clock, day = Clock(), 24 * HOUR
    keys = {
        "fixed-hour": policy(3),
        "sliding-hour": policy(3, "sliding_window"),
        "month": policy(3, duration="month"),
        "bucket-fast": policy(3, "token_bucket", "1h"),
        # 1,000 tokens at 1 per day: 1,000 days to refill, so kept long after the rest.
        "bucket-slow": build_policy(limit=1, duration="1d", algorithm="token_bucket",
                                    burst=1000, mode="consistent"),
    }
    transactions = decisions_for(engine, clock)
    ledger = LedgerStore(engine)
    try:
        await transactions.decide([request(k, p, cost=3 if p.limit == 3 else 999)
                                   for k, p in keys.items()])
        retention = 7 * day
        early = T0 + 2 * HOUR  # windows over, but inside the retention
        assert await ledger.prune_consistent_keys(now=early,
                                                  updated_before=early - retention) == 0
        clock.now = late = T0 + 40 * day
        assert await ledger.prune_consistent_keys(now=late,
                                                  updated_before=late - retention) == 4
        assert await stored(engine, "SELECT key_hash FROM consistent_keys") == [
            ("bucket-slow",)]
        again = await transactions.decide([request(k, p) for k, p in keys.items()])
    finally:
        await transactions.close()
    # The pruned keys start full; the slow bucket has refilled 40 of its 999 tokens.
    assert [(d.allowed, d.remaining) for d in again] == [
        (True, 2), (True, 2), (True, 2), (True, 2), (True, 1000 - 999 + 40 - 1)]


async def test_a_new_key_starts_from_the_fast_mode_usage_of_its_windows(
        engine: AsyncEngine) -> None:
    # A namespace switched from fast to consistent mid-window: two nodes admitted 3 + 4
    # this hour (and 8 the hour before), as the ledger's components hold it.
    hour = T0 - T0 % HOUR
    fixed, sliding = policy(10), policy(10, "sliding_window")
    bucket = policy(10, "token_bucket")
    rows = [{"namespace": "ns", "key_hash": key, "window_start": start, "node_id": node,
             "region": "us", "window_end": start + HOUR, "admitted": admitted, "denied": 0,
             "limit": 10, "duration": "1h", "algorithm": "fixed_window", "burst": None,
             "updated_at": T0}
            for key in ("fixed", "sliding", "bucket")
            for start, node, admitted in ((hour, "a", 3), (hour, "b", 4), (hour - HOUR, "a", 8))]
    rows.append({**rows[0], "namespace": "other"})  # another namespace's usage: not counted
    async with engine.begin() as connection:
        await connection.execute(insert(components), rows)
    transactions = decisions_for(engine, Clock())
    try:
        decisions = await transactions.decide([
            request("fixed", fixed, cost=3), request("fixed", fixed),
            request("sliding", sliding), request("bucket", bucket, cost=10)])
    finally:
        await transactions.close()
    # fixed: 7 used, 3 more fit, the 11th does not. sliding, 10 minutes into the hour:
    # 7 + 8 x 50/60 = 13.7 > 10, denied. token bucket: starts full.
    assert [(d.allowed, d.remaining) for d in decisions] == [
        (True, 0), (False, 0), (False, 0), (True, 0)]
