"""Partition handover against real NATS and Postgres (central/service.py, issue 13).

Two central processes with four partitions share them two and two. Usage arrives on the
partition subjects (as a node that heard the partition count publishes it) and on the
per-region subject (an earlier release's node; split by partition 0's holder). One
replica is killed with SIGKILL: the other takes all four partitions, the stream redelivers
what the dead one had not checkpointed, and the ledger bills every key exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from sync.messages import UsageBatch, UsageEntry, encode_usage
from sync.partitions import partition_of, partition_token
from sync.policy import build_policy
from sync.publisher import UsagePublisher, ensure_usage_stream
from sync.subjects import USAGE_CONSUMER, USAGE_STREAM, usage_subject
from tests.support.cluster import (
    HOUR_MS,
    Cluster,
    avoid_window_boundary,
    metric_value,
    partitions_led,
    wait_until,
)
from tests.support.nats_server import NatsServer
from tests.support.processes import ManagedProcess

PARTITIONS = 4
NAMESPACE = "handover"
KEYS = [f"{i:032x}" for i in range(40)]


@pytest.fixture
def cluster(nats_server: NatsServer, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    system = Cluster(nats=nats_server, database_url=postgres_url, tmp=tmp_path,
                     env={"REGIONLIMIT_PARTITIONS": str(PARTITIONS),
                          "REGIONLIMIT_ACK_WAIT": "3s", "REGIONLIMIT_LEASE_TIMEOUT": "3s"})
    try:
        yield system
    finally:
        system.close()


def held_metric(central: ManagedProcess) -> float:
    body = httpx.get(central.url + "/metrics", timeout=2).text
    return metric_value(body, "regionlimit_central_partitions_held")


def publish_round(nats_url: str, window_start: int, counts: dict[str, int]) -> None:
    """Half the keys as a partition-aware node publishes them, half on the region's
    subject as an earlier release's node does."""
    policy = build_policy(limit=1000, duration="1h", algorithm="fixed_window")
    entries = [UsageEntry(NAMESPACE, key, window_start, count, 0, policy)
               for key, count in counts.items()]
    half = len(entries) // 2

    async def run() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_usage_stream(js)
        aware = UsagePublisher(js, node_id="node-a", region="eu", partitions=PARTITIONS)
        await aware.publish(int(time.time() * 1000), entries[:half])
        legacy = UsageBatch("node-b", "us", int(time.time() * 1000), entries[half:],
                            addressed=False)
        await js.publish(usage_subject("us"), encode_usage(legacy))
        await nc.close()
    asyncio.run(run())


def unfinished(nats_url: str) -> int:
    """Messages central's consumers have not yet acked (pending + ack pending)."""
    async def run() -> int:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            names = [USAGE_CONSUMER] + [f"{USAGE_CONSUMER}-p{partition_token(p)}"
                                        for p in range(PARTITIONS)]
            total = 0
            for name in names:
                info = await js.consumer_info(USAGE_STREAM, name)
                total += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            return total
        finally:
            await nc.close()
    return asyncio.run(run())


def test_a_dead_replicas_partitions_are_taken_over_and_billed_exactly_once(
        cluster: Cluster) -> None:
    assert len({partition_of(NAMESPACE, k, partitions=PARTITIONS) for k in KEYS}) == PARTITIONS
    avoid_window_boundary(HOUR_MS, span_s=180)
    now = int(time.time() * 1000)
    window = now - now % HOUR_MS

    first = cluster.central()
    wait_until(lambda: partitions_led(first) == list(range(PARTITIONS)), timeout=30,
               what="the only replica to hold every partition")
    second = cluster.central()
    wait_until(lambda: len(partitions_led(first)) == 2 and len(partitions_led(second)) == 2,
               timeout=30, what="two replicas to share the partitions two and two")
    assert sorted(partitions_led(first) + partitions_led(second)) == list(range(PARTITIONS))
    assert held_metric(first) == 2 and held_metric(second) == 2

    # Round 1 while both lead; cumulative counts, so round 2 raises them.
    round1 = {key: 1 + i % 3 for i, key in enumerate(KEYS)}
    publish_round(cluster.nats.url, window, round1)
    wait_until(lambda: cluster.billed(NAMESPACE)[0] == sum(round1.values()), timeout=30,
               what="round 1 billed")

    second.kill()
    round2 = {key: 10 + i for i, key in enumerate(KEYS)}
    publish_round(cluster.nats.url, window, round2)
    wait_until(lambda: partitions_led(first) == list(range(PARTITIONS)), timeout=30,
               what="the survivor to take the dead replica's partitions")
    wait_until(lambda: cluster.billed(NAMESPACE)[0] == sum(round2.values()), timeout=60,
               what="round 2 billed by the survivor")
    wait_until(lambda: unfinished(cluster.nats.url) == 0, timeout=30,
               what="every message acked")
    # Nothing billed twice, nothing lost: per key, the ledger holds the final count.
    rows = cluster.query("SELECT key_hash, SUM(admitted) FROM usage_hourly "
                         "WHERE namespace = :ns GROUP BY key_hash", ns=NAMESPACE)
    assert {row[0]: int(row[1]) for row in rows} == round2
    assert cluster.components_total(NAMESPACE) == sum(round2.values())
    assert held_metric(first) == PARTITIONS


def test_three_replicas_each_lead_some_of_four_partitions(cluster: Cluster) -> None:
    """ceil(4 / 3) = 2 lets the first two replicas take everything (2, 2, 0); the one
    below floor(4 / 3) = 1 gets a partition handed back."""
    replicas = [cluster.central()]
    wait_until(lambda: partitions_led(replicas[0]) == list(range(PARTITIONS)), timeout=30,
               what="the first replica to lead every partition")
    replicas.append(cluster.central())
    wait_until(lambda: [len(partitions_led(r)) for r in replicas] == [2, 2], timeout=30,
               what="two replicas to lead two partitions each")
    replicas.append(cluster.central())
    wait_until(lambda: sorted(len(partitions_led(r)) for r in replicas) == [1, 1, 2],
               timeout=60, what="the third replica to get a partition")
    led = [p for r in replicas for p in partitions_led(r)]
    assert sorted(led) == list(range(PARTITIONS))
