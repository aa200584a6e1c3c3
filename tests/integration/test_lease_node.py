"""The node's lease client against a real authority in process: real nats-server, the
ledger on SQLite and Postgres, an injected wall clock (windows are an hour long; the
token buckets refill one token every 72 s of that clock, which stands still unless a
test moves it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from central.database import make_engine
from central.lease.authority import LeaseAuthority
from central.lease.state import lease_grants, lease_keys
from central.lease.tx import PRUNE_GRACE_MS, LeaseTransactions
from central.metrics import CentralMetrics
from central.migrate import run_migrations
from region_node.check_result import CheckResult
from region_node.counters import CounterStore
from region_node.lease import LeaseClient
from region_node.lease_exhaustion import RECHECK_S
from region_node.metrics import NodeMetrics
from sync.connection import NatsLink, NatsOptions
from sync.policy import Policy, build_policy
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


class Authority:
    """One lease authority serving a real nats-server, and the node clients asking it."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self.clock = Clock()
        self.transactions = LeaseTransactions(engine, clock=self.clock, ttl_ms=60_000,
                                              reclaim_after_ms=0)
        self._url = url
        self._links: list[NatsLink] = []

    async def start(self) -> asyncio.Task[None]:
        link = await self._link()
        assert link.nc is not None
        serving = asyncio.create_task(LeaseAuthority(
            self.transactions, metrics=CentralMetrics("test"), lanes=1).serve(link.nc))
        await asyncio.sleep(0.2)  # the subscription is registered before the first request
        return serving

    async def node(self, node_id: str, monotonic: Callable[[], float] = time.monotonic
                   ) -> tuple[LeaseClient, CounterStore]:
        store = CounterStore()
        client = LeaseClient(link=await self._link(), node_id=node_id, region="eu",
                             store=store, metrics=NodeMetrics("eu"), clock=self.clock,
                             idle_s=0.0, monotonic=monotonic)
        return client, store

    async def _link(self) -> NatsLink:
        link = NatsLink(NatsOptions(url=self._url))
        await link.run()
        self._links.append(link)
        return link

    async def close(self) -> None:
        for link in self._links:
            await link.close()


@pytest.fixture
async def authority(engine: AsyncEngine, nats_server: NatsServer
                    ) -> AsyncIterator[Authority]:
    system = Authority(engine, nats_server.url)
    serving = await system.start()
    try:
        yield system
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await system.close()


@pytest.fixture
async def system(authority: Authority) -> tuple[LeaseClient, CounterStore]:
    return await authority.node("eu.test.1")


async def decide(client: LeaseClient, policy: Policy = POLICY, key: str = KEY
                 ) -> CheckResult:
    outcome = client.check("plans", key, policy, 1, "plans")
    return outcome if isinstance(outcome, CheckResult) else await outcome


async def test_a_slice_given_back_mid_window_is_not_spent_twice(
        system: tuple[LeaseClient, CounterStore]) -> None:
    client, store = system
    admitted = [(await decide(client)).allowed for _ in range(4)]
    assert admitted == [True] * 4
    await settled(client)
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


BUCKET = build_policy(limit=50, duration="1h", algorithm="token_bucket", burst=50,
                      mode="lease", timeout="5s", on_unavailable="closed")


async def test_three_nodes_admit_exactly_one_buckets_worth_of_concurrent_checks(
        authority: Authority) -> None:
    nodes = [await authority.node(f"{region}.test.1") for region in ("eu", "us", "ap")]
    results = await asyncio.gather(*(decide(client, BUCKET)
                                     for client, _ in nodes for _ in range(50)))
    # The clock stands still: no refill, so one bucket of 50 admits exactly 50.
    assert sum(r.allowed for r in results) == 50
    assert {r.source for r in results} == {"local"}
    # A denied check may be allowed again once a token has refilled: 1h / 50.
    assert {r.retry_after_ms for r in results if not r.allowed} == {72_000}
    assert sum(store.get("plans", KEY).cur for _, store in nodes) == 50  # type: ignore[union-attr]


async def test_a_returned_slice_goes_back_into_the_bucket_and_time_refills_it(
        authority: Authority) -> None:
    (eu, _), (us, _), (ap, _) = [await authority.node(f"{r}.test.1")
                                 for r in ("eu", "us", "ap")]
    admitted = [(await decide(eu, BUCKET)).allowed for _ in range(30)]
    assert admitted == [True] * 30
    await settled(eu)
    await eu.tick()  # idle (idle_s 0): eu gives back what it holds of the other 20
    assert eu.units_held() == 0
    outcomes = [(await decide(us, BUCKET)).allowed for _ in range(21)]
    assert outcomes == [True] * 20 + [False]
    await settled(us)  # us's last refill is answered before time moves on
    authority.clock.now += 3 * 72_000  # three tokens refill
    # (Asked by a third node: us denies locally until its next re-ask.)
    outcomes = [(await decide(ap, BUCKET)).allowed for _ in range(4)]
    assert outcomes == [True] * 3 + [False]


class SteppedMonotonic:
    """The real monotonic clock, plus what a test stepped it forward by."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


async def test_a_spent_key_is_denied_on_the_node_until_another_node_gives_budget_back(
        authority: Authority) -> None:
    mono = SteppedMonotonic()
    (eu, eu_store), (us, us_store) = (await authority.node("eu.test.1", mono),
                                      await authority.node("us.test.1"))
    assert all([(await decide(us)).allowed for _ in range(3)])
    await settled(us)
    us_holds = us.units_held()
    assert us_holds > 0  # us's slice keeps units eu cannot have
    outcomes = [(await decide(eu)).allowed for _ in range(10)]
    assert outcomes == [True] * (7 - us_holds) + [False] * (3 + us_holds)
    await settled(eu)
    counters = dict(eu._metrics.counters)

    # Spent: eu denies at once, without waiting for the authority's "no" each time.
    results = [await decide(eu) for _ in range(20)]
    assert {(r.allowed, r.source) for r in results} == {(False, "local")}
    window_end = T0 - T0 % 3_600_000 + 3_600_000
    assert {r.retry_after_ms for r in results} == {window_end - T0}
    assert eu._metrics.counters["lease_waits"] == counters["lease_waits"]
    assert (eu._metrics.counters["lease_local_denials"]
            == counters["lease_local_denials"] + 20)
    await settled(eu)  # a re-ask the denials started (a slow machine) is answered: no

    await us.stop()  # us gives its unused slice back
    assert us.units_held() == 0
    # eu finds it at its next re-ask: the check that starts it is denied without waiting,
    # the re-ask's answer refills eu's slice in the background.
    mono.ahead += RECHECK_S
    requests = eu._metrics.counters["lease_requests"]
    assert not (await decide(eu)).allowed
    await settled(eu)
    assert eu._metrics.counters["lease_requests"] == requests + 1
    outcomes = [(await decide(eu)).allowed for _ in range(us_holds + 5)]
    assert outcomes == [True] * us_holds + [False] * 5  # exactly what us gave back
    states = [store.get("plans", KEY) for store in (eu_store, us_store)]
    assert sum(state.cur for state in states if state is not None) == 10


async def settled(client: LeaseClient) -> None:
    """Wait for the background refills in flight (a key asking is not idle yet)."""
    pending = [s.request for s in client._slices.values() if s.request is not None]
    await asyncio.gather(*pending)


async def rows(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as connection:
        keys = (await connection.execute(select(func.count()).select_from(lease_keys)))
        grants = (await connection.execute(select(func.count()).select_from(lease_grants)))
        return int(keys.scalar_one()), int(grants.scalar_one())


async def test_rows_of_ended_windows_and_refilled_buckets_are_pruned(
        authority: Authority, engine: AsyncEngine) -> None:
    client, _ = await authority.node("eu.test.1")
    other = "fedcba9876543210fedcba9876543210"
    assert (await decide(client)).allowed  # a fixed window of an hour
    assert (await decide(client, BUCKET, other)).allowed  # a bucket: 1 of 50 spent
    await settled(client)
    await client.tick()  # idle: both slices go back (the node no longer holds any)
    assert await rows(engine) == (2, 2)
    assert await authority.transactions.prune() == 0
    # A bucket's row may go once its leases ended and what they held has refilled (a
    # fresh, full bucket is then the same), the grace after that: here the one token
    # spent refills in 72 s.
    async with engine.connect() as connection:
        bucket_end = (await connection.execute(select(lease_keys.c.window_end).where(
            lease_keys.c.key_hash == other))).scalar_one()
    assert bucket_end == T0 + 72_000
    authority.clock.now = bucket_end + PRUNE_GRACE_MS - 1
    assert await authority.transactions.prune() == 0
    authority.clock.now += 1
    assert await authority.transactions.prune() == 1
    assert await rows(engine) == (1, 1)
    # The hour's window ended (and the grace): its key goes, with its grant.
    window_end = T0 - T0 % 3_600_000 + 3_600_000
    authority.clock.now = window_end + PRUNE_GRACE_MS - 1
    assert await authority.transactions.prune() == 0
    authority.clock.now += 1
    assert await authority.transactions.prune(batch=1) == 1
    assert await rows(engine) == (0, 0)
    # A pruned key starts over when it is next asked for: a full bucket.
    results = [await decide(client, BUCKET, other) for _ in range(51)]
    assert sum(r.allowed for r in results) == 50
