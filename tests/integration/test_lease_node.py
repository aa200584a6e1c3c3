"""The node's lease client against a real authority in process: real nats-server, the
ledger on SQLite and Postgres, an injected wall clock (windows are an hour long)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from central.database import make_engine
from central.lease.authority import LeaseAuthority
from central.lease.tx import LeaseTransactions
from central.metrics import CentralMetrics
from central.migrate import run_migrations
from region_node.check_result import CheckResult
from region_node.counters import CounterStore
from region_node.lease import LeaseClient
from region_node.metrics import NodeMetrics
from sync.connection import NatsLink, NatsOptions
from sync.policy import build_policy
from tests.support.nats_server import NatsServer

T0 = 1_800_000_000_000 - 1_800_000_000_000 % 3_600_000 + 60_000  # a minute into an hour
POLICY = build_policy(limit=10, duration="1h", algorithm="fixed_window", mode="lease",
                      timeout="5s", on_unavailable="closed")
KEY = "0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def engine(ledger_url: str) -> AsyncIterator[AsyncEngine]:
    await run_migrations(ledger_url)
    engine = make_engine(ledger_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def system(engine: AsyncEngine, nats_server: NatsServer
                 ) -> AsyncIterator[tuple[LeaseClient, CounterStore]]:
    clock = Clock()
    central_link = NatsLink(NatsOptions(url=nats_server.url))
    node_link = NatsLink(NatsOptions(url=nats_server.url))
    await central_link.run()
    await node_link.run()
    assert central_link.nc is not None
    authority = LeaseAuthority(
        LeaseTransactions(engine, clock=clock, ttl_ms=60_000, reclaim_after_ms=0),
        metrics=CentralMetrics("test"), lanes=1)
    serving = asyncio.create_task(authority.serve(central_link.nc))
    await asyncio.sleep(0.2)  # the subscription is registered before the first request
    store = CounterStore()
    client = LeaseClient(link=node_link, node_id="eu.test.1", region="eu", store=store,
                         metrics=NodeMetrics("eu"), clock=clock, idle_s=0.0)
    try:
        yield client, store
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await node_link.close()
        await central_link.close()


async def decide(client: LeaseClient) -> CheckResult:
    outcome = client.check("plans", KEY, POLICY, 1, "plans")
    return outcome if isinstance(outcome, CheckResult) else await outcome


async def test_a_slice_given_back_mid_window_is_not_spent_twice(
        system: tuple[LeaseClient, CounterStore]) -> None:
    client, store = system
    admitted = [(await decide(client)).allowed for _ in range(4)]
    assert admitted == [True] * 4
    await client.tick()  # idle (idle_s 0): the unused slice goes back mid-window
    assert client.units_held() == 0
    outcomes = [(await decide(client)).allowed for _ in range(12)]
    # 6 more, not 6 + what the first slice had spent.
    assert outcomes == [True] * 6 + [False] * 6
    state = store.get("plans", KEY)
    assert state is not None and (state.cur, state.cur_denied) == (10, 6)


async def test_checks_waiting_on_one_request_share_it_and_stop_at_the_limit(
        system: tuple[LeaseClient, CounterStore]) -> None:
    client, _ = system
    results = await asyncio.gather(*(decide(client) for _ in range(25)))
    assert sum(r.allowed for r in results) == 10
    assert {r.source for r in results} == {"local"}
