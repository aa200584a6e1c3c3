"""Checkpoints and replay against real NATS and Postgres (central/ingest.py).

A central process kills itself (SIGKILL) at a named point of its checkpoint task
(REGIONLIMIT_TEST_CRASH_AT): before a batch is written, after it is written but before
its messages are acked, and between two batches of one checkpoint. A fresh central then
replays what was not acked; the ledger must equal the published usage exactly, with
nothing lost and no bucket counted twice. A slow Postgres (a table lock held by the test)
must make ingest stop fetching, leave the rest in the stream and keep the lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.msg import Msg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from central.database import make_engine
from sync.messages import decode_totals
from sync.partitions import partition_token, partition_usage_subject
from sync.subjects import TOTALS, USAGE_CONSUMER, USAGE_STREAM
from tests.e2e.test_sync_e2e import batch, publish
from tests.support.cluster import HOUR_MS, Cluster, avoid_window_boundary, metric_value, wait_until
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess

PARTITION_CONSUMER = f"{USAGE_CONSUMER}-p{partition_token(0)}"
ACK_WAIT = "3s"  # redelivery to the restarted central after this (not a timing assert)
KEYS = [f"{i:032x}" for i in range(10)]
# Per key, the node reports 1, then 3, then its final count: the ledger must hold the
# final counts, billed once.
FINAL = {key: 5 + i for i, key in enumerate(KEYS)}


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     env={"REGIONLIMIT_ACK_WAIT": ACK_WAIT,
                          # 10 rows + 10 buckets owed: three batches of up to 4 + 4
                          "REGIONLIMIT_CHECKPOINT_BATCH": "4",
                          "REGIONLIMIT_LEASE_TIMEOUT": "3s",
                          # One partition: one leader and one consumer whose state the
                          # tests read (handover between partitions:
                          # test_partition_handover.py).
                          "REGIONLIMIT_PARTITIONS": "1"})
    try:
        yield system
    finally:
        system.close()


def central_with(cluster: Cluster, **env: str) -> ManagedProcess:
    base = cluster.env
    cluster.env = {**base, **env}
    try:
        return cluster.central()
    finally:
        cluster.env = base


def is_leader(central: ManagedProcess) -> bool:
    try:
        return bool(httpx.get(central.url + "/readyz", timeout=2).json()["leader"])
    except httpx.HTTPError:
        return False


def consumer_state(nats_url: str) -> tuple[int, int]:
    """(messages not yet delivered, delivered and not acked) of the partition's consumer."""
    async def run() -> tuple[int, int]:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(USAGE_STREAM, PARTITION_CONSUMER)
            return int(info.num_pending or 0), int(info.num_ack_pending or 0)
        finally:
            await nc.close()
    return asyncio.run(run())


def publish_usage(cluster: Cluster) -> None:
    payloads = [batch("hand.1", key, count) for count in (1, 3) for key in KEYS]
    payloads += [batch("hand.1", key, FINAL[key]) for key in KEYS]
    publish(cluster.nats.url, payloads, subject=partition_usage_subject(0, "hand"))


def ledger(cluster: Cluster) -> tuple[dict[str, int], dict[str, int]]:
    """Per key: component maxima and billed (bucket) sums."""
    components = {r[0]: int(r[1]) for r in cluster.query(
        "SELECT key_hash, SUM(admitted) FROM components GROUP BY key_hash")}
    billed = {r[0]: int(r[1]) for r in cluster.query(
        "SELECT key_hash, SUM(admitted) FROM usage_hourly GROUP BY key_hash")}
    return components, billed


def all_acked(cluster: Cluster) -> bool:
    return consumer_state(cluster.nats.url) == (0, 0)


@pytest.mark.parametrize(("point", "unacked_after_crash"),
                         [("before_write", 30), ("after_write", 30), ("mid_batch", 26)])
def test_a_crash_in_a_checkpoint_loses_nothing_and_counts_nothing_twice(
        cluster: Cluster, point: str, unacked_after_crash: int) -> None:
    avoid_window_boundary(HOUR_MS, span_s=120)
    # In the stream before central starts: its first fetch takes all 30 messages, long
    # before its first checkpoint (2 s later), which then owes 10 rows and 10 buckets.
    publish_usage(cluster)
    crashing = central_with(cluster, REGIONLIMIT_TEST_CRASH_AT=point,
                            REGIONLIMIT_COMMIT_INTERVAL="2s")
    assert crashing.proc is not None
    wait_until(lambda: crashing.proc is not None and crashing.proc.poll() is not None,
               what=f"the central process to kill itself at {point}")
    assert crashing.proc.returncode == -9, crashing.log()
    assert f"test crash point {point} reached" in crashing.log()

    components, billed = ledger(cluster)
    if point == "before_write":
        assert components == {} and billed == {}
    else:  # the first batch, the 4 oldest components and buckets, was committed
        assert components == {key: FINAL[key] for key in KEYS[:4]}
        assert billed == components
    # Acked is exactly what is durable: between batches, the first four keys' first
    # messages (the later ones raised keys of later batches too).
    assert consumer_state(cluster.nats.url) == (0, unacked_after_crash)

    survivor = cluster.central()
    wait_until(lambda: is_leader(survivor), what="the new replica leads")
    wait_until(lambda: all_acked(cluster), timeout=60, what="every message acked")
    components, billed = ledger(cluster)
    assert components == FINAL
    assert billed == FINAL


def test_a_slow_ledger_pauses_ingest_and_keeps_the_lease(cluster: Cluster) -> None:
    avoid_window_boundary(HOUR_MS, span_s=180)
    central = central_with(cluster, REGIONLIMIT_MAX_DIRTY="20",
                           REGIONLIMIT_COMMIT_INTERVAL="200ms")
    wait_until(lambda: is_leader(central), what="the replica leads")
    keys = [f"{i:032x}" for i in range(100)]
    asyncio.run(hold_the_ledger_while_usage_arrives(cluster, central, keys))
    wait_until(lambda: all_acked(cluster), timeout=60, what="every message acked")
    assert ledger(cluster) == ({k: 2 for k in keys}, {k: 2 for k in keys})
    assert is_leader(central)


async def hold_the_ledger_while_usage_arrives(cluster: Cluster, central: ManagedProcess,
                                              keys: list[str]) -> None:
    engine = make_engine(cluster.database_url)
    try:
        holder = await lease_holder(engine)
        async with engine.connect() as blocker:
            await blocker.begin()
            # Writes wait for this lock; reads (a new leader's load) would not.
            await blocker.execute(text("LOCK TABLE components IN EXCLUSIVE MODE"))
            await asyncio.to_thread(
                publish, cluster.nats.url, [batch("hand.1", key, 2) for key in keys])
            # Ingest paused: it fetches no more messages than there is room for under
            # REGIONLIMIT_MAX_DIRTY (each owes a component and a bucket), so at most 20
            # were taken; the rest stays in JetStream.
            await asyncio.to_thread(
                wait_until, lambda: paused(central), what="ingest paused by backpressure")
            undelivered, unacked = await asyncio.to_thread(consumer_state, cluster.nats.url)
            assert undelivered >= 80 and undelivered + unacked == 100
            # The checkpoint has waited for the lock longer than the lease timeout...
            await wait_for_blocked_write(engine, seconds=4)
            # ...and the lease is still held, by the same session.
            assert await asyncio.to_thread(is_leader, central)
            assert await lease_holder(engine) == holder
            assert "lease lost" not in central.log()
            await blocker.rollback()
    finally:
        await engine.dispose()


def paused(central: ManagedProcess) -> bool:
    body = httpx.get(central.url + "/metrics", timeout=2).text
    return metric_value(body, "regionlimit_ingest_paused") == 1


async def lease_holder(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        result = await connection.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
        return int(result.scalar_one())


async def wait_for_blocked_write(engine: AsyncEngine, *, seconds: float) -> None:
    """Until a write on the ledger has waited for a lock for ``seconds`` (by Postgres'
    clock; awaited, not asserted on time)."""

    async def blocked() -> bool:
        async with engine.connect() as connection:
            result = await connection.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query ILIKE '%components%'"
                " AND clock_timestamp() - query_start > make_interval(secs => :s)"),
                {"s": seconds})
            return int(result.scalar_one()) > 0

    deadline = asyncio.get_running_loop().time() + 60
    while not await blocked():
        assert asyncio.get_running_loop().time() < deadline, "no write waited on the lock"
        await asyncio.sleep(0.2)


SEEDED = 50_000


def test_failover_with_many_components_loads_them_and_publishes_totals(
        cluster: Cluster) -> None:
    """A new leader loads every component of the ledger (in chunks that yield) into the
    compact table: a total it publishes after the failover counts the loaded value plus
    the new usage, and the new usage is billed exactly once."""
    avoid_window_boundary(HOUR_MS, span_s=180)
    now = int(time.time() * 1000)
    start = now - now % HOUR_MS
    asyncio.run(seed_components(cluster.database_url, start=start, now=now))
    assert cluster.components_total("hand") == 3 * SEEDED
    # Every total goes to its serving nodes from the first unit on (7 of 1000 is cold
    # under the default share); ids like hand.1 are not subject tokens, so theirs travel
    # on the shared totals subject this test listens to.
    cluster.env["REGIONLIMIT_BROADCAST_SHARE"] = "0"
    first = cluster.central()
    wait_until(lambda: is_leader(first), timeout=60, what="the first replica leads")
    second = cluster.central()
    first.kill()
    wait_until(lambda: is_leader(second), timeout=60, what="the standby takes over")

    key = f"{SEEDED // 2:032x}"  # seeded with 3 by seed.1
    totals = asyncio.run(total_after_usage(cluster.nats.url, key))
    assert totals == (3 + 4, {"seed.1": 3, "hand.1": 4})
    wait_until(lambda: all_acked(cluster), timeout=60, what="the usage acked")
    assert cluster.components_total("hand") == 3 * SEEDED + 4
    assert cluster.billed("hand") == (4, 0)  # the seeded rows have no buckets


async def seed_components(database_url: str, *, start: int, now: int) -> None:
    """SEEDED components of node seed.1, 3 each, in the current hour's window."""
    engine = make_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO components SELECT 'hand', lpad(to_hex(i), 32, '0'), :start,"
                " 'seed.1', 'hand', :end, 3, 0, 1000, '1h', 'fixed_window', NULL, :now"
                " FROM generate_series(1, :n) AS i"),
                {"start": start, "end": start + HOUR_MS, "now": now, "n": SEEDED})
    finally:
        await engine.dispose()


async def total_after_usage(nats_url: str, key: str) -> tuple[int, dict[str, int]]:
    """Publish 4 for ``key`` from node hand.1; the first total central broadcasts for it."""
    nc = await nats.connect(nats_url)
    found: asyncio.Future[tuple[int, dict[str, int]]] = asyncio.get_running_loop(
        ).create_future()

    async def on_totals(msg: Msg) -> None:
        for total in decode_totals(msg.data).totals:
            # The takeover itself broadcasts every loaded key-window: wait for the
            # total that carries the new usage.
            if total.key_hash == key and "hand.1" in total.components and not found.done():
                found.set_result((total.total, dict(total.components)))

    sub = await nc.subscribe(TOTALS, cb=on_totals)
    try:
        await asyncio.to_thread(publish, nats_url, [batch("hand.1", key, 4)])
        return await asyncio.wait_for(found, timeout=60)
    finally:
        await sub.unsubscribe()
        await nc.close()
